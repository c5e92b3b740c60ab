"""The `qwq-local` command line: parses options, calls the public library, prints.

Library errors (QwQLocalError) become one line on stderr and the error's exit code;
QWQ_LOCAL_DEBUG=1 shows the traceback instead.
"""


import contextlib
import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import cli_format, constants
from . import cli_support as opts
from .cli_support import convert_progress, progress_bar  # noqa: F401  (scripts use them)
from .errors import QwQLocalError

app = typer.Typer(
    name="qwq-local",
    help="Run Qwen's QwQ-32B locally: convert, quantize, fit to your machine, chat. Offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click output: usage errors as `Error: ...` lines rather than rich panels.
    rich_markup_mode=None,
)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _one_line(text: str) -> str:
    """Error text can quote a model file's bytes: escape control characters, so a crafted
    file cannot move the cursor or recolour the terminal, and the error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def command(*names: str, **kwargs):
    """`app.command`, plus the error mapping: a QwQLocalError prints one line and exits with
    its code (so CliRunner tests see the same behaviour as the console script)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except QwQLocalError as exc:
                if constants.debug_enabled():
                    raise
                _err(f"error: {_one_line(str(exc))}")
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                # typer would turn this into a silent exit 130; say what happened instead.
                if constants.debug_enabled():
                    raise
                _err("interrupted")
                raise typer.Exit(130) from None

        return app.command(*names, **kwargs)(wrapper)

    return decorate


# ============================================================================================
# convert (issue: convert)
# ============================================================================================


@command("convert")
def convert_cmd(
    src: str = typer.Argument(constants.QWQ_REPO_ID, help="Checkpoint directory or Hugging Face repo id."),
    output: Path = typer.Option(..., "-o", "--output", help="The GGUF file to write."),
    outtype: str = typer.Option(constants.DEFAULT_OUTTYPE, "--outtype",
                                help=f"Tensor type: {' | '.join(constants.OUTTYPES)} (bf16 is lossless for QwQ)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    name: Optional[str] = typer.Option(None, "--name", help="general.name to record in the file."),
) -> None:
    """Convert a Hugging Face QwQ/Qwen2 checkpoint (safetensors) to GGUF, streaming and atomically."""
    import time

    from .convert import convert
    from .fileutil import human_bytes

    started = time.perf_counter()
    with progress_bar("convert") as bar:
        path = convert(src, output, outtype=outtype, revision=revision, name=name, **convert_progress(bar))
    elapsed = time.perf_counter() - started
    from .gguf_check import inspect_gguf

    typer.echo(f"wrote {path} ({human_bytes(path.stat().st_size)}, {len(inspect_gguf(path).tensors)} tensors, "
               f"{outtype.lower()}) in {elapsed:.1f} s")


# ============================================================================================
# quantize / eval (issue: quantize)
# ============================================================================================


@command("quantize")
def quantize_cmd(
    input: Optional[Path] = typer.Argument(None, help="The GGUF to quantize (bf16/f16/f32)."),
    output: Optional[Path] = typer.Argument(None, help="The quantized GGUF to write."),
    qtype: Optional[str] = typer.Option(None, "--type", "-t", help="Q4_K_M, Q8_0, IQ4_XS, ... (--list shows all)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix .gguf or .dat)."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="ggml type for output.weight."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                       help="ggml type for token_embd.weight."),
    pure: bool = typer.Option(False, "--pure", help="No k-quant mixture: every tensor gets the base type."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantizer threads (default: physical cores)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print predicted sizes; write nothing."),
    list_types: bool = typer.Option(False, "--list", help="List every type with bpw and predicted size "
                                                          "(for IN if given, else for QwQ-32B)."),
) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (identical to llama-quantize's output)."""
    from .errors import UsageError
    from .fileutil import human_bytes
    from .quantize import plan_quantize, predict_sizes, quantize

    if list_types:
        source = "QwQ-32B (published shape)" if input is None else input
        typer.echo(cli_format.prediction_table(predict_sizes(input), None, source))
        return
    if input is None or qtype is None:
        raise UsageError("usage: qwq-local quantize IN.gguf OUT.gguf --type Q4_K_M (or --list)")
    options = dict(qtype=qtype, imatrix=imatrix, output_tensor_type=output_tensor_type,
                   token_embedding_type=token_embedding_type, pure=pure)
    if dry_run:
        plan = plan_quantize(input, output=output, **options)
        table = predict_sizes(input, has_imatrix=True if imatrix else None, pure=pure,
                              output_tensor_type=plan.output_tensor_type,
                              token_embedding_type=plan.token_embedding_type)
        typer.echo(cli_format.prediction_table(table, plan.qtype.name, input))
        mix = ", ".join(f"{t} x{n}" for t, n in plan.type_counts.items())
        typer.echo(f"\n{plan.qtype.name}: {human_bytes(plan.predicted_bytes)} ({plan.bpw:.2f} bpw); tensors: {mix}")
        for w in plan.warnings:
            typer.echo(f"warning: {w}", err=True)
        typer.echo("dry run: nothing written")
        return
    if output is None:
        raise UsageError("give the output file: qwq-local quantize IN.gguf OUT.gguf --type " + qtype)
    with progress_bar(f"quantize {qtype}", unit="tensor") as progress:
        result = quantize(input, output, threads=threads, progress=progress, **options)
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"wrote {result.output} ({result.qtype}, {human_bytes(result.bytes)}, predicted "
               f"{human_bytes(result.predicted_bytes)}) in {result.seconds:.1f} s")


@command("eval")
def eval_cmd(
    model: List[Path] = typer.Option(..., "--model", "-m", help="A quantized GGUF to score (repeatable)."),
    reference: Path = typer.Option(..., "--reference", "-r", help="The reference GGUF (usually bf16)."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text to score on (default: shipped text)."),
    ctx: int = typer.Option(constants.DEFAULT_EVAL_CTX, "--ctx", help="Window size in tokens."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Score at most this many windows."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    gpu_layers: int = typer.Option(0, "--gpu-layers", help="Layers to offload to a GPU (GPU builds of llama.cpp)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    plot: Optional[Path] = typer.Option(None, "--plot",
                                        help="Write KLD vs file size: .svg (built in) or .png (matplotlib)."),
) -> None:
    """Quality of quants vs a reference: mean/99% KL divergence, top-1 agreement, perplexities."""
    import json

    from .evaluate import evaluate, format_table

    if plot is not None:
        from .evalplot import check_plot_target

        check_plot_target(plot)
    with progress_bar("eval", unit="window") as progress:
        results = evaluate(model, reference=reference, text=text, n_ctx=ctx, chunks=chunks, threads=threads,
                           n_gpu_layers=gpu_layers, progress=progress)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        typer.echo(format_table(results))
    if plot is not None:
        from .evalplot import write_plot

        write_plot(results, plot)
        if not as_json:
            typer.echo(f"wrote {plot}")


# ============================================================================================
# run / chat / bench / demo (issue: runtime)
# ============================================================================================


def _load_model(model: str, *, ctx: int, gpu_layers: str, threads: Optional[int], seed: Optional[int],
                template: str, kv_type: str, flash_attn: Optional[bool] = None):
    import warnings

    from .runtime import QwQ

    # The library warns (altered template in the GGUF, context shortened to fit memory); on the
    # command line that is one "warning: ..." line, not Python's file:line and source echo.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        llm = QwQ.load(model, n_ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=seed, template=template,
                       kv_type=kv_type, flash_attn=flash_attn)
    for warning in caught:
        _err(f"warning: {warning.message}")
    return llm


def _sampling_options(*, max_tokens, thinking_budget, temperature, top_p, top_k, min_p, presence_penalty, seed,
                      ignore_eos) -> dict:
    return {"max_tokens": max_tokens, "thinking_budget": thinking_budget, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "min_p": min_p, "presence_penalty": presence_penalty, "seed": seed,
            "ignore_eos": ignore_eos}


@command("run")
def run_cmd(
    prompt: str = typer.Argument(..., help="The user message ('-' reads it from stdin)."),
    model: str = opts.MODEL,
    system: Optional[str] = opts.SYSTEM,
    ctx: int = opts.CTX,
    gpu_layers: str = opts.GPU,
    threads: Optional[int] = opts.THREADS,
    max_tokens: Optional[int] = opts.MAX,
    thinking_budget: Optional[int] = opts.BUDGET,
    temperature: float = opts.TEMP,
    top_p: float = opts.TOP_P,
    top_k: int = opts.TOP_K,
    min_p: float = opts.MIN_P,
    presence_penalty: float = opts.PRESENCE,
    seed: Optional[int] = opts.SEED,
    template: str = opts.TEMPLATE,
    kv_type: str = opts.KV,
    flash_attn: Optional[bool] = opts.FA,
    ignore_eos: bool = opts.IGNORE_EOS,
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the thought."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (thinking, content, tool_calls, "
                                                      "finish_reason, usage, timings)."),
) -> None:
    """Answer one prompt: the thought on stderr (dimmed), the answer on stdout."""
    import json

    from .cli_chat import Printer, length_note, stream_reply

    from_stdin = prompt == "-"
    if from_stdin:
        prompt = sys.stdin.read()
    if not prompt.strip():
        from .errors import UsageError

        raise UsageError("the prompt is empty" + (" (nothing came on stdin)" if from_stdin else ""))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    options = _sampling_options(max_tokens=max_tokens, thinking_budget=thinking_budget, temperature=temperature,
                                top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty, seed=seed,
                                ignore_eos=ignore_eos)
    with _load_model(model, ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=seed, template=template,
                     kv_type=kv_type, flash_attn=flash_attn) as llm:
        if as_json:
            reply = llm.chat(messages, **options)
            typer.echo(json.dumps(reply.to_dict(), ensure_ascii=False))
            return
        printer = Printer(thought_stream=sys.stderr, answer_stream=sys.stdout, show_thinking=not hide_thinking)
        reply = stream_reply(llm, messages, printer, options=options)
        n_ctx = llm.n_ctx
    if reply.tool_calls:
        for call in reply.tool_calls:
            typer.echo(f"tool call: {call['function']['name']}({call['function']['arguments']})")
    if reply.finish_reason == "length":
        _err(length_note(reply, n_ctx=n_ctx))


@command("chat")
def chat_cmd(
    model: str = opts.MODEL,
    system: Optional[str] = opts.SYSTEM,
    ctx: int = opts.CTX,
    gpu_layers: str = opts.GPU,
    threads: Optional[int] = opts.THREADS,
    max_tokens: Optional[int] = opts.MAX,
    thinking_budget: Optional[int] = opts.BUDGET,
    temperature: float = opts.TEMP,
    top_p: float = opts.TOP_P,
    top_k: int = opts.TOP_K,
    min_p: float = opts.MIN_P,
    presence_penalty: float = opts.PRESENCE,
    seed: Optional[int] = opts.SEED,
    template: str = opts.TEMPLATE,
    kv_type: str = opts.KV,
    flash_attn: Optional[bool] = opts.FA,
    ignore_eos: bool = opts.IGNORE_EOS,
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Start with the thought hidden (/think show)."),
) -> None:
    """Interactive chat with history (/help inside for commands; Ctrl-C stops an answer)."""
    from .cli_chat import repl

    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    options = _sampling_options(max_tokens=max_tokens, thinking_budget=thinking_budget, temperature=temperature,
                                top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty, seed=seed,
                                ignore_eos=ignore_eos)
    with _load_model(model, ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=seed, template=template,
                     kv_type=kv_type, flash_attn=flash_attn) as llm:
        code = repl(llm, system=system, options=options, show_thinking=not hide_thinking)
    raise typer.Exit(code)


@command("bench")
def bench_cmd(
    model: str = opts.MODEL,
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Prompt length for pp (tokens/s, batched)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", help="Tokens to generate for tg (tokens/s, one at a time)."),
    threads: Optional[int] = opts.THREADS,
    gpu_layers: str = opts.GPU,
    kv_type: str = opts.KV,
    repetitions: int = typer.Option(1, "--repetitions", "-r", help="Runs to average."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Prompt (pp) and generation (tg) speed, like llama-bench."""
    import json

    from .errors import UsageError

    if prompt_tokens < 1 or gen_tokens < 1:
        raise UsageError("--prompt-tokens and --gen-tokens must be >= 1")
    ctx = prompt_tokens + gen_tokens + 16
    if ctx > constants.MAX_CONTEXT:
        # Checked here: the context is derived, and "n_ctx must be ..." would name no option the user gave.
        raise UsageError(f"--prompt-tokens + --gen-tokens must stay under the {constants.MAX_CONTEXT}-token "
                         f"context limit, not {prompt_tokens} + {gen_tokens}")
    with _load_model(model, ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=0, template="original",
                     kv_type=kv_type) as llm:
        result = llm.bench(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repetitions=repetitions)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"model      {result['model']}")
    typer.echo(f"threads    {result['threads']}   gpu layers {result['gpu_layers']}   "
               f"extra buffers (AMX/repack) {'on' if result['extra_bufts'] else 'off'}")
    typer.echo(f"pp{prompt_tokens:<7} {result['pp_tps']:10.1f} tokens/s")
    typer.echo(f"tg{gen_tokens:<7} {result['tg_tps']:10.1f} tokens/s")

# ============================================================================================
# demo (lead)
# ============================================================================================


@command("demo")
def demo_cmd(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where the demo files go (default: ~/.cache/qwq-local/demo)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens to generate in the chat turn."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Offline demo: tiny QwQ-shaped checkpoint -> GGUF -> Q4_K_M -> one chat turn."""
    from .demo import DEMO_QUESTION, run_demo

    typer.echo("qwq-local demo: the QwQ-32B pipeline on a tiny random-weight model (offline)")

    def show(stage) -> None:
        typer.echo(f"[{stage.name:>10}] {stage.seconds:7.2f}s  {stage.detail}")

    result = run_demo(workdir=workdir, max_tokens=max_tokens, seed=seed, on_stage=show)
    reply = result.reply
    typer.echo(f"\nuser: {DEMO_QUESTION}")
    typer.echo(f"thinking ({reply.usage.get('thinking_tokens', '?')} tokens): {reply.thinking!r}")
    typer.echo(f"answer: {reply.content!r}")
    timings = reply.timings
    typer.echo(f"speed: prompt {timings.get('prompt_tps', 0):.1f} tok/s, generation {timings.get('gen_tps', 0):.1f} tok/s")
    typer.echo("(random weights: the words are noise; the template, thinking split and pipeline are real)")
    typer.echo(f"try: qwq-local run -m {result.workdir / 'tiny-qwq-Q4_K_M.gguf'} \"Hello\"")


# ============================================================================================
# info / plan / doctor (issue: plan + untrusted files)
# ============================================================================================

@command("info")
def info_cmd(
    model: str = typer.Argument(..., help="A .gguf file or a cached model name (qwq:q4_k_m)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    load_check: bool = typer.Option(
        False, "--load-check", help="Also test-load it with llama.cpp in a child process (remembered per file)."),
) -> None:
    """Validate a GGUF file (header, tensors, vocabulary, chat template) and summarise it."""
    import json

    from .gguf_check import inspect_gguf
    from .hub import resolve_model
    from .safe_load import ensure_loadable, is_validated

    path = resolve_model(model)
    info = ensure_loadable(path) if load_check else inspect_gguf(path)
    summary = info.summary()
    summary["load_checked"] = is_validated(path, info)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    typer.echo(cli_format.info_table(summary))


@command("plan")
def plan_cmd(
    model: str = typer.Option(..., "-m", "--model", help="A .gguf file or a model name (qwq:q4_k_m)."),
    ctx: int = typer.Option(constants.DEFAULT_N_CTX, "--ctx", help="Context length in tokens."),
    kv_type: str = opts.KV,
    flash_attn: Optional[bool] = typer.Option(
        None, "--flash-attn/--no-flash-attn", help="Flash attention (default: auto, which is on)."),
    gpu_layers: str = typer.Option("0", "--gpu-layers", help="auto, all, or a number of layers."),
    n_batch: int = typer.Option(constants.DEFAULT_N_BATCH, "--batch", help="Logical batch size."),
    n_ubatch: int = typer.Option(constants.DEFAULT_N_UBATCH, "--ubatch", help="Physical batch size."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Free GPU memory to plan for (24G, 8GiB...); default: this machine's."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Available RAM to plan for; default: this machine's."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Take compute buffers from llama.cpp itself (metadata-only load, no weights read)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show the memory llama.cpp will need per device for MODEL with these settings."""
    import json

    from .hardware import parse_size
    from .hub import resolve_model
    from .plan import plan

    p = plan(resolve_model(model), n_ctx=ctx, kv_type=kv_type, flash_attn=flash_attn,
             n_batch=n_batch, n_ubatch=n_ubatch, gpu_layers=gpu_layers,
             vram=parse_size(vram) if vram else None, ram=parse_size(ram) if ram else None, dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=2))
    else:
        typer.echo(cli_format.plan_table(p.to_dict()))
    if not p.fits:  # scripts can test the exit code, as for a refused load
        from .errors import InsufficientMemoryError

        raise typer.Exit(InsufficientMemoryError.exit_code)


@command("doctor")
def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check this machine: llama.cpp backend, GPU offload, memory, AMX, and what QwQ-32B fits."""
    import json

    from .hardware import report

    r = report()
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(cli_format.doctor_report(r))


# ============================================================================================
# pull / list (issue: hub)
# ============================================================================================


@command("pull")
def hub_pull(
    quant: str = typer.Option(constants.DEFAULT_QUANT, "--quant", "-q", help="llama.cpp type of the GGUF to fetch."),
    repo: str = typer.Option(constants.QWQ_GGUF_REPO_ID, "--repo", help="Hub repository holding the GGUFs."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
) -> None:
    """Download a GGUF into the Hugging Face cache (resumable) and verify its sha256.
    Works offline for models already cached."""
    from .hub import pull, recorded_sha256, split_parts

    with progress_bar(f"pull {quant}") as progress:
        path = pull(quant=quant, repo_id=repo, revision=revision, progress=progress)
    for part in split_parts(path):
        typer.echo(f"verified sha256 {recorded_sha256(part)}  {part.name}")
    typer.echo(str(path))


@command("list")
def hub_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Show the GGUF models in the local Hugging Face cache."""
    import json

    from .hub import list_models
    from .hub_cache import hub_cache_dir

    models = list_models()
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no GGUF models in {hub_cache_dir()}; fetch one with `qwq-local pull --quant {constants.DEFAULT_QUANT}`")
        return
    typer.echo(cli_format.model_table(models))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        if constants.debug_enabled():
            raise
        _err("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
