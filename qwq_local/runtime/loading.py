"""QwQ.load's option checks that need no model: the path of a GGUF or cached name, the GPU
layers (and context) of `gpu_layers`, and the draft model's choice."""

from __future__ import annotations

from pathlib import Path

from .. import constants
from ..errors import UsageError

__all__ = ["check_parallel", "draft_choice", "gpu_layers_choice", "resolve_path"]


def resolve_path(model: str | Path) -> Path:
    try:
        from ..hub.download import resolve_model
    except ImportError:  # pragma: no cover - hub is part of the package; kept for partial installs
        return Path(model).expanduser()
    return resolve_model(model)


def gpu_layers_choice(choice: int | str, path: Path, *, n_ctx: int, kv_type: str, flash_attn: bool | None,
                      n_batch: int, draft: Path | None = None, draft_gpu_layers: int = 0,
                      n_seq: int = 1) -> tuple[int, int, str]:
    """(gpu layers, context, why) for the gpu_layers option; "auto" asks the memory planner,
    which may also shorten the context when the asked one does not fit."""
    if isinstance(choice, str):
        if choice.strip().lower() != "auto":
            try:
                choice = int(choice)
            except ValueError:
                raise UsageError(f"gpu_layers must be 'auto' or a number of layers, not {choice!r}") from None
    if isinstance(choice, int):
        if choice < -1:
            raise UsageError(f"gpu_layers must be 'auto', -1 (all) or >= 0, not {choice}")
        return choice, n_ctx, f"{choice} GPU layers as asked"
    from ..plan.memory import auto_gpu_layers

    # Also on CPU-only builds: the planner then checks the model fits in RAM (and refuses
    # with alternatives) instead of letting the kernel kill the process mid-load.
    fit = auto_gpu_layers(path, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_batch=n_batch,
                          draft=draft, draft_gpu_layers=draft_gpu_layers, n_seq=n_seq)
    return int(fit.gpu_layers), min(int(fit.n_ctx), n_ctx), fit.reason


def draft_choice(draft: str | Path | None, gpu_layers: int | None, *, draft_min: int,
                 draft_max: int) -> tuple[Path | None, int]:
    """(the draft GGUF's path or None for none/"ngram", its GPU layers), checked before any load."""
    from .speculative import AdaptiveLength

    AdaptiveLength(draft_min=draft_min, draft_max=draft_max)  # range check
    if draft is None or str(draft).strip().lower() == constants.DRAFT_NGRAM:
        return None, 0
    if gpu_layers is None:
        from ..plan.hardware import build

        gpu_layers = -1 if build().gpu_offload else 0
    if gpu_layers < -1:
        raise UsageError(f"draft_gpu_layers must be -1 (all) or >= 0, not {gpu_layers}")
    return resolve_path(draft), int(gpu_layers)


def check_parallel(parallel: int, *, n_ctx: int) -> None:
    """QwQ.load's parallel: 1..MAX_PARALLEL sequences of at least MIN_CTX_PER_SEQ positions each."""
    if not 1 <= parallel <= constants.MAX_PARALLEL:
        raise UsageError(f"parallel must be between 1 and {constants.MAX_PARALLEL}, not {parallel}")
    if parallel > 1 and n_ctx // parallel < constants.MIN_CTX_PER_SEQ:
        raise UsageError(f"n_ctx {n_ctx} split across {parallel} sequences leaves {n_ctx // parallel} tokens "
                         f"each; give at least {constants.MIN_CTX_PER_SEQ * parallel}")
