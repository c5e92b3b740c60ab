"""Synthetic QwQ-shaped models: tiny Hugging Face checkpoints (QwQ's config keys, tokenizer
layout, chat template, bf16 shards) and small qwen2 GGUFs with chosen tensor types. Random
weights; used by the demo, the tests, the benchmarks and the extra-buffer (AMX) probe.
"""

from __future__ import annotations

from .factory import TinySpec, make_tiny_checkpoint, load_tiny_weights, write_qwen2_gguf, qwen2_gguf_shapes

__all__ = ["TinySpec", "make_tiny_checkpoint", "load_tiny_weights", "write_qwen2_gguf", "qwen2_gguf_shapes"]
