"""Every default and environment variable of qwq-local, in one place.

Values here come from QwQ-32B's model card and released files (see README "Model facts").
Other modules import from here instead of repeating literals.
"""

from __future__ import annotations

import os
from pathlib import Path

# --- Model identity -------------------------------------------------------------------------
QWQ_REPO_ID = "Qwen/QwQ-32B"
QWQ_GGUF_REPO_ID = "Qwen/QwQ-32B-GGUF"
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
GGUF_ARCH = "qwen2"
GGUF_TOKENIZER_MODEL = "gpt2"
GGUF_TOKENIZER_PRE = "qwen2"

# Special token strings (ids differ between the real model and the tiny test models, so code
# resolves ids by tokenizing these strings).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
STOP_STRINGS = (IM_END, ENDOFTEXT)
# What the runtime appends when a thinking budget runs out.
THINKING_CLOSE_TEXT = "\n" + THINK_CLOSE + "\n\n"

# --- Sampling (model card: never greedy, no repeat penalty, this sampler order) -------------
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.0
DEFAULT_PRESENCE_PENALTY = 0.0
DEFAULT_REPEAT_PENALTY = 1.0
SAMPLER_ORDER = ("top_k", "top_p", "min_p", "temperature")

# --- Context and YaRN (model card: static YaRN only above the native window) ----------------
NATIVE_CONTEXT = 32768
MAX_CONTEXT = 131072
MAX_YARN_FACTOR = 4.0
DEFAULT_N_CTX = 8192
DEFAULT_N_BATCH = 512
DEFAULT_N_UBATCH = 512
KV_TYPES = ("f16", "q8_0", "q4_0")

# --- Conversion -----------------------------------------------------------------------------
DEFAULT_OUTTYPE = "bf16"
OUTTYPES = ("bf16", "f16", "f32", "q8_0")
GGUF_ALIGNMENT = 32
# Bound on a safetensors header (the format's own reference limit is 100 MB).
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
COPY_CHUNK_BYTES = 16 * 1024 * 1024
DISK_SPACE_MARGIN_BYTES = 64 * 1024 * 1024

# --- Environment variables ------------------------------------------------------------------
ENV_DEBUG = "QWQ_LOCAL_DEBUG"
ENV_CACHE_DIR = "QWQ_LOCAL_CACHE"
ENV_NO_PROGRESS = "QWQ_LOCAL_NO_PROGRESS"
ENV_AMX = "QWQ_LOCAL_AMX"  # "on" | "off" | unset (probe)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def debug_enabled() -> bool:
    return _truthy(os.environ.get(ENV_DEBUG))


def progress_disabled() -> bool:
    return _truthy(os.environ.get(ENV_NO_PROGRESS))


def cache_dir() -> Path:
    """Where qwq-local keeps its own small caches (probe results, validated-file records)."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwq-local"
