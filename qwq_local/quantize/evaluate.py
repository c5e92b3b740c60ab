"""How much a quantized model's predictions differ from the reference's (llama-perplexity's
KL-divergence mode, on llama.cpp through the backend).

Both models read the same tokens in windows of n_ctx; as llama-perplexity does, only the
second half of each window is scored (every scored token then has at least n_ctx/2 tokens of
context). Per scored position: log-softmax of both, KL(reference || model), whether the top
tokens agree, and each model's negative log-likelihood of the actual next token.

Memory stays bounded: one model is loaded at a time; the reference's log-probabilities for the
scored positions go to a temporary file (float32, on disk, one window at a time) and are read
back window by window; only per-position scalars are kept.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from .. import constants
from ..errors import UsageError
from ..gguf.safe_load import load_model

DEFAULT_TEXT = constants.DATA_DIR / "eval.txt"
_ROWS_PER_BLOCK = 32  # positions per numpy block: bounds temporaries to 32 x n_vocab floats


@dataclass
class EvalResult:
    model: Path
    file_bytes: int
    n_chunks: int
    n_scored: int
    mean_kld: float
    median_kld: float
    p99_kld: float
    max_kld: float
    top1_agreement: float
    ppl_ref: float
    ppl_model: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = str(self.model)
        return d


def default_text() -> str:
    return DEFAULT_TEXT.read_text(encoding="utf-8")


def evaluate(models: Sequence[Path | str] | Path | str, *, reference: Path | str, text: str | Path | None = None,
             n_ctx: int = constants.DEFAULT_EVAL_CTX, chunks: int | None = None, threads: int | None = None,
             n_gpu_layers: int = 0, progress: Callable[[int, int], None] | None = None) -> list[EvalResult]:
    """Score each model in `models` against `reference` on `text` (a string, a Path to a text
    file, or None for the shipped default text). Returns one EvalResult per model, in order.
    progress(done, total) counts decoded windows (the reference's, then each model's)."""
    import numpy as np

    from ..backend import binding as backend
    from ..fileutil import check_free_space

    if isinstance(models, (str, Path)):
        models = [models]
    models = [Path(m) for m in models]
    if not models:
        raise UsageError("give at least one model to evaluate (--model Q.gguf)")
    for path in [Path(reference), *models]:
        if not path.is_file():  # before the reference pass, which can take long
            from ..errors import ModelNotFoundError

            raise ModelNotFoundError(f"no model file at {path}")
    if n_ctx < 8 or n_ctx % 2:
        raise UsageError(f"--ctx must be an even number of at least 8 tokens, not {n_ctx}")
    if chunks is not None and chunks < 1:
        raise UsageError(f"--chunks must be at least 1, not {chunks}")
    body = _read_text(text)

    first = n_ctx // 2
    n_score = n_ctx - 1 - first          # positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1
    with load_model(reference, n_gpu_layers=n_gpu_layers) as ref_model:
        tokens = ref_model.tokenize(body, add_special=False, parse_special=False)
        n_vocab = ref_model.n_vocab
        n_windows = len(tokens) // n_ctx
        if chunks is not None:
            n_windows = min(n_windows, chunks)
        if n_windows < 1:
            raise UsageError(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}; "
                             "use a smaller --ctx or a longer --text")
        windows = [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(n_windows)]
        total_steps = n_windows * (1 + len(models))
        step = 0

        with tempfile.TemporaryDirectory(prefix="qwq-eval-") as tmp:
            store_path = Path(tmp) / "reference-logprobs.f32"
            check_free_space(Path(tmp), n_windows * n_score * n_vocab * 4, what="the reference log-probabilities")
            store = np.lib.format.open_memmap(store_path, mode="w+", dtype=np.float32,
                                              shape=(n_windows, n_score, n_vocab))
            ref_nll = np.empty((n_windows, n_score), dtype=np.float64)
            with _context(backend, ref_model, n_ctx, threads) as ctx:
                for w, lo, hi, logp, nxt in _scored_blocks(ctx, windows, n_ctx):
                    store[w, lo:hi] = logp
                    ref_nll[w, lo:hi] = -logp[np.arange(hi - lo), nxt]
                    if hi == n_score:
                        step += 1
                        if progress:
                            progress(step, total_steps)
            store.flush()
            ref_model.close()  # one model in memory at a time

            results = []
            for path in models:
                result, step = _score_model(backend, path, windows, store, ref_nll, n_ctx, n_vocab, threads,
                                            n_gpu_layers, progress, step, total_steps)
                results.append(result)
            del store
    return results


def _score_model(backend, path: Path, windows, store, ref_nll, n_ctx, n_vocab, threads, n_gpu_layers, progress,
                 step, total):
    import numpy as np

    first = n_ctx // 2
    n_score = n_ctx - 1 - first
    kld = np.empty((len(windows), n_score), dtype=np.float64)
    agree = np.empty((len(windows), n_score), dtype=bool)
    nll = np.empty((len(windows), n_score), dtype=np.float64)
    with load_model(path, n_gpu_layers=n_gpu_layers) as model:
        if model.n_vocab != n_vocab:
            raise UsageError(f"{path} has a vocabulary of {model.n_vocab} tokens but the reference has {n_vocab}; "
                             "compare quantizations of the same model")
        with _context(backend, model, n_ctx, threads) as ctx:
            for w, lo, hi, logq, nxt in _scored_blocks(ctx, windows, n_ctx):
                logp = np.asarray(store[w, lo:hi])
                kld[w, lo:hi] = np.sum(np.exp(logp) * (logp - logq), axis=1, dtype=np.float64)
                agree[w, lo:hi] = np.argmax(logp, axis=1) == np.argmax(logq, axis=1)
                nll[w, lo:hi] = -logq[np.arange(hi - lo), nxt]
                if hi == n_score:
                    step += 1
                    if progress:
                        progress(step, total)
    flat = kld.reshape(-1)
    result = EvalResult(
        model=path, file_bytes=path.stat().st_size, n_chunks=len(windows), n_scored=int(flat.size),
        mean_kld=float(flat.mean()), median_kld=float(np.median(flat)), p99_kld=float(np.percentile(flat, 99)),
        max_kld=float(flat.max()), top1_agreement=float(agree.mean()),
        ppl_ref=float(math.exp(ref_nll.mean())), ppl_model=float(math.exp(nll.mean())))
    return result, step


def _context(backend, model, n_ctx: int, threads: int | None):
    # the whole window in one batch, so every position's logits are available after one decode
    return backend.Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, constants.DEFAULT_N_UBATCH),
                           n_threads=threads, logits_all=True)


def _scored_blocks(ctx, windows, n_ctx: int):
    """Decode each window and yield (window index, lo, hi, log-probs of scored positions
    lo..hi, the tokens that follow them): the second half of each window is scored."""
    import numpy as np

    first = n_ctx // 2
    n_score = n_ctx - 1 - first
    for w, window in enumerate(windows):
        ctx.truncate(0)  # each window starts from an empty cache, as llama-perplexity's do
        ctx.decode(window, start_pos=0, logits="all")
        for lo in range(0, n_score, _ROWS_PER_BLOCK):
            hi = min(n_score, lo + _ROWS_PER_BLOCK)
            logp = _log_softmax(np.stack([ctx.logits(first + j) for j in range(lo, hi)]))
            yield w, lo, hi, logp, np.asarray(window[first + 1 + lo:first + 1 + hi])


def _log_softmax(x):
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    m = x.max(axis=1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)


def _read_text(text: str | Path | None) -> str:
    if text is None:
        return default_text()
    if isinstance(text, Path):
        if not text.is_file():
            raise UsageError(f"no text file at {text}; pass an existing UTF-8 text file to --text")
        return text.read_text(encoding="utf-8", errors="replace")
    return str(text)


def format_table(results: Sequence[EvalResult]) -> str:
    """The results as an aligned text table (what `qwq-local eval` prints)."""
    from ..fileutil import human_bytes

    header = ("model", "size", "mean KLD", "99% KLD", "top-1", "PPL ref", "PPL model")
    rows = [(r.model.name, human_bytes(r.file_bytes), f"{r.mean_kld:.6f}", f"{r.p99_kld:.6f}",
             f"{100 * r.top1_agreement:.2f}%", f"{r.ppl_ref:.4f}", f"{r.ppl_model:.4f}") for r in results]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(row))
             for row in [header, *rows]]
    n = results[0] if results else None
    if n is not None:
        lines.append(f"({n.n_scored} positions scored in {n.n_chunks} windows)")
    return "\n".join(lines)
