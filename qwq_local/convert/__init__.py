"""Hugging Face checkpoint -> GGUF: the checkpoint's files read and validated as untrusted input,
tensors streamed (copied or converted in chunks) into a GGUF with llama.cpp's Qwen2 metadata,
written atomically and read back before it takes its final name.
"""

from __future__ import annotations

from .pipeline import convert, plan_tensors
from .checkpoint import Checkpoint, open_checkpoint

__all__ = ["convert", "plan_tensors", "Checkpoint", "open_checkpoint"]
