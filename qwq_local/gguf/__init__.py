"""GGUF files as untrusted input: a bounded header reader that validates structure and
model-level rules (`inspect_gguf`), and a first real load in a child process so that a file
which would make llama.cpp abort() kills the child, not the caller (`ensure_loadable`).
"""

from __future__ import annotations

from .info import GGUFInfo, TensorInfo
from .check import inspect_gguf
from .safe_load import ensure_loadable, is_validated, load_model

__all__ = ["GGUFInfo", "TensorInfo", "inspect_gguf", "ensure_loadable", "is_validated", "load_model"]
