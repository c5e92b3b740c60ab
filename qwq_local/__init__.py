"""qwq-local: run Qwen's QwQ-32B on your own machine, offline.

The public API is small and imported lazily (llama.cpp loads only when a model does):

    from qwq_local import QwQ
    model = QwQ.load("qwq:q4_k_m")
    reply = model.chat([{"role": "user", "content": "How many r's in strawberry?"}])
    print(reply.thinking, reply.content)
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    BadModelFileError,
    CheckpointError,
    ContextOverflowError,
    DiskSpaceError,
    HubError,
    ImatrixError,
    InsufficientMemoryError,
    ModelNotFoundError,
    QuantizeError,
    QwQLocalError,
    RuntimeLoadError,
    TemplateError,
    UnsupportedModelError,
    UsageError,
)

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access.
_LAZY = {
    "QwQ": "runtime",
    "Reply": "runtime",
    "Event": "runtime",
    "Cancel": "runtime",
    "render_prompt": "chat",
    "inspect_gguf": "gguf",
    "ensure_loadable": "gguf",
    "pull": "hub",
    "resolve_model": "hub",
    "list_models": "hub",
    "create_app": "serve",
}

# These functions share their module's name: importing them here (cheap: their heavy
# dependencies load lazily) keeps `qwq_local.convert` the function even after
# `import qwq_local.convert` has run, which would otherwise rebind it to the module.
from .convert.pipeline import convert  # noqa: E402
from .quantize.evaluate import evaluate  # noqa: E402
from .plan.memory import plan  # noqa: E402
from .quantize.quantizer import quantize  # noqa: E402
from .serve.runner import serve  # noqa: E402

__all__ = [
    *_LAZY,
    "convert",
    "evaluate",
    "plan",
    "quantize",
    "serve",
    "BadModelFileError",
    "CheckpointError",
    "ContextOverflowError",
    "DiskSpaceError",
    "HubError",
    "ImatrixError",
    "InsufficientMemoryError",
    "ModelNotFoundError",
    "QuantizeError",
    "QwQLocalError",
    "RuntimeLoadError",
    "TemplateError",
    "UnsupportedModelError",
    "UsageError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwq_local' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
