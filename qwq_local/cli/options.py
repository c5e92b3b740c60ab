"""Pieces the CLI's commands share: terminal progress bars and the run/chat options."""

import contextlib
import sys

import typer

from .. import constants


@contextlib.contextmanager
def progress_bar(desc: str, *, unit: str = "B"):
    """Yield a `progress(done, total)` callback for library functions: a tqdm bar on an
    interactive stderr, nothing otherwise (pipes, CI, QWQ_LOCAL_NO_PROGRESS=1). An optional
    third argument, `detail` (e.g. "tensor 3/771"), is shown after the bar."""
    if not sys.stderr.isatty() or constants.progress_disabled():
        yield None
        return
    from tqdm import tqdm

    # counts of tensors or windows read better unscaled ("3/75", not "3.00/75.0")
    bar = tqdm(desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
               leave=False, file=sys.stderr)

    def update(done: int, total: int, detail: str | None = None) -> None:
        if bar.total != total:
            bar.total = total
        if detail is not None and detail != bar.postfix:
            bar.set_postfix_str(detail, refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def convert_progress(bar) -> dict:
    """convert()'s progress keywords for a progress_bar: bytes on the bar, "tensor i/N" after it."""
    if bar is None:
        return {}
    current = [""]

    def on_tensor(i: int, n: int, name: str) -> None:
        current[0] = f"tensor {i}/{n}"

    return {"progress": lambda done, total: bar(done, total, current[0]), "on_tensor": on_tensor}


def _lower(value: str) -> str:
    return value.lower()


# Options shared by `run`, `chat`, `bench` and `plan` (typer needs them as parameter defaults).
MODEL = typer.Option(..., "-m", "--model", help="A .gguf file or a cached name such as qwq:q4_k_m.")
CTX = typer.Option(constants.DEFAULT_N_CTX, "--ctx", help=f"Context length in tokens (up to {constants.MAX_CONTEXT}; "
                                                          f"static YaRN above {constants.YARN_MIN_CTX}, see --rope-scaling).")
ROPE = typer.Option(constants.DEFAULT_ROPE_SCALING, "--rope-scaling", callback=_lower,
                    help=f"auto (the model card: no scaling at --ctx <= {constants.YARN_MIN_CTX}, static YaRN "
                         f"x{constants.YARN_FACTOR:g} over {constants.YARN_ORIG_CTX} above), none, or yarn (at any --ctx).")
GPU = typer.Option("auto", "--gpu-layers", help="Layers to offload to the GPU: auto, or a number (0: CPU only, -1: all).")
THREADS = typer.Option(None, "--threads", help="CPU threads (default: physical cores).")
TEMPLATE = typer.Option(constants.DEFAULT_TEMPLATE_CHOICE, "--template",
                     help="Chat template: original (QwQ's released one), gguf (the file's), or a .jinja path.")
KV = typer.Option("f16", "--kv-type", callback=_lower, help="KV cache type: f16, q8_0 or q4_0.")
FA = typer.Option(None, "--flash-attn/--no-flash-attn", help="Flash attention (default: llama.cpp decides).")
MAX = typer.Option(None, "--max-tokens", "-n", help="Cap on generated tokens, thought included (default: until the context is full).")
BUDGET = typer.Option(None, "--thinking-budget", help="Cap on thinking tokens; then the thought is closed and the model answers.")
TEMP = typer.Option(constants.DEFAULT_TEMPERATURE, "--temperature")
TOP_P = typer.Option(constants.DEFAULT_TOP_P, "--top-p")
TOP_K = typer.Option(constants.DEFAULT_TOP_K, "--top-k")
MIN_P = typer.Option(constants.DEFAULT_MIN_P, "--min-p")
PRESENCE = typer.Option(constants.DEFAULT_PRESENCE_PENALTY, "--presence-penalty")
SEED = typer.Option(None, "--seed", help="Sampling seed (default: random).")
SYSTEM = typer.Option(None, "--system", help="System prompt.")
# llama.cpp RPC workers (`qwq-local worker` on each host): run, chat, bench, plan, serve.
RPC = typer.Option(None, "--rpc", help="RPC workers to offload layers to: HOST:PORT[,HOST:PORT...] "
                                       "(start each with `qwq-local worker`; see docs/rpc.md).")
IGNORE_EOS = typer.Option(False, "--ignore-eos", help="Keep generating past end tokens (until --max-tokens or "
                                                 "the context end), as llama.cpp's --ignore-eos.")
SPECIAL_IN_CONTENT = typer.Option(False, "--special-in-content",
                                  help="Read control/tag token text in messages (<|im_start|>, </think>) as tokens, "
                                       "as raw llama.cpp does (default: plain text; only the template makes tokens).")
DRAFT = typer.Option(constants.DEFAULT_DRAFT, "--draft",
                     help="Speculative decoding: ngram (self-speculation from the context) or a small GGUF with "
                          "QwQ's vocabulary (e.g. a Qwen2.5-0.5B quant). Same output, sometimes faster.")
DRAFT_MAX = typer.Option(constants.DEFAULT_DRAFT_MAX, "--draft-max", help="Most tokens proposed per verification batch.")
DRAFT_MIN = typer.Option(constants.DEFAULT_DRAFT_MIN, "--draft-min", help="Fewest tokens worth verifying as a batch.")
DRAFT_GPU = typer.Option(None, "--draft-gpu-layers",
                         help="Draft model layers on the GPU (default: all where a GPU is usable, else 0).")
