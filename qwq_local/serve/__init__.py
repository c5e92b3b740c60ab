"""The OpenAI-compatible server (`qwq-local serve`): protocol models (protocol.py), request
translation (handlers.py), slots and the queue (engine.py), answer grammars (grammar.py),
metrics, the ASGI app (app.py), the blocking `serve()` (runner.py) and the chat page (static/).

Importing the package is cheap: the web stack (FastAPI, pydantic, uvicorn) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ServeConfig", "create_app", "serve"]

_LAZY = {"ServeConfig": "app", "create_app": "app", "serve": "runner"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwq_local.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
