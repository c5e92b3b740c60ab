"""Every default and environment variable of qwq-local, in one place.

Values here come from QwQ-32B's model card and released files (config.json, generation_config.json).
Other modules import from here instead of repeating literals.
"""

from __future__ import annotations

import os
from pathlib import Path

# Files shipped in the package (QwQ's template, added tokens, eval text, the tiny tokenizer).
DATA_DIR = Path(__file__).parent / "data"

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

# --- Chat template sandbox (a template inside a GGUF is untrusted code) ----------------------
TEMPLATE_CHOICES = ("original", "gguf")  # or a path to a .jinja file
DEFAULT_TEMPLATE_CHOICE = "original"
TEMPLATE_RENDER_TIMEOUT_S = 5.0
# Bound on the rendered prompt and on any string/list a template builds while rendering:
# far above what fits 131072 tokens, far below what hurts memory.
TEMPLATE_MAX_CHARS = 8_000_000
TEMPLATE_MAX_SOURCE_CHARS = 1_000_000
# Variables transformers passes to every template (the tokenizer's special_tokens_map).
TEMPLATE_SPECIAL_TOKENS = {"eos_token": IM_END, "pad_token": ENDOFTEXT}

# The llama-cpp-python release whose low-level ctypes API (struct layouts, function
# signatures) qwq-local drives; pyproject pins the same version.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

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
# Type conversion works on row chunks of this many source bytes, in parallel threads (each
# holds one chunk and its temporaries, about 8x its size for q8_0).
CONVERT_CHUNK_BYTES = 4 * 1024 * 1024
CONVERT_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Source dtypes the converter reads (safetensors spelling) and the files it downloads.
CONVERT_SOURCE_DTYPES = ("BF16", "F16", "F32")
HF_ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "README.md")
# Qwen2's pre-tokenizer split; tokenizer.ggml.pre=qwen2 makes llama.cpp apply exactly this.
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DISK_SPACE_MARGIN_BYTES = 64 * 1024 * 1024

# --- Hub: pull / list / model names ---------------------------------------------------------
DEFAULT_QUANT = "Q4_K_M"
# "qwq" alone or "qwq:<quant>" names a quant of QWQ_GGUF_REPO_ID; other repos are "owner/name:<quant>".
MODEL_NAME_PREFIX = "qwq"
# Records of GGUFs whose sha256 matched (under cache_dir()), keyed by blob path + size + mtime.
VERIFIED_RECORD_FILE = "verified.json"
# huggingface_hub's own switch; read again at call time so setting it after import still counts.
ENV_HF_OFFLINE = "HF_HUB_OFFLINE"

# --- Untrusted model files (gguf/check.py, gguf/safe_load.py) ------------------------------------------
# One GGUF string (a key, a token, the chat template) larger than this is refused: real ones
# are at most a few hundred KB, and the bound keeps a hostile header from filling memory.
GGUF_MAX_STRING_BYTES = 64 * 1024 * 1024
# Bound on the whole header region (key/values + tensor infos); QwQ-32B's is under 7 MB.
GGUF_MAX_HEADER_BYTES = 512 * 1024 * 1024
# Bound on one metadata array (QwQ's vocabulary has 152064 tokens): each element becomes a
# Python object, so this, not the byte bound, is what limits memory for arrays of tiny items.
GGUF_MAX_ARRAY_LENGTH = 4 * 1024 * 1024
# Records of GGUFs that loaded in a child process (under cache_dir()), keyed by path + size +
# mtime + header hash + llama-cpp-python version.
VALIDATED_RECORD_FILE = "validated.json"
VALIDATED_RECORD_MAX = 256
# The child load is metadata-only (no_alloc), so even a 20 GB file takes seconds.
LOAD_CHECK_TIMEOUT_S = 300.0
# The context the child load check builds (metadata-only: nothing is allocated for it).
LOAD_CHECK_N_CTX = 256
LOAD_CHECK_N_BATCH = 32

# --- Quantization and quality evaluation ----------------------------------------------------
# QwQ-32B's dimensions (config.json), for size predictions without the 65 GB input.
QWQ_32B_DIMS = {"n_layer": 64, "hidden": 5120, "ffn": 27648, "vocab": 152064, "n_head": 40, "n_head_kv": 8}
DEFAULT_QUANT_TYPE = "Q4_K_M"
# The quants a release publishes by default (Qwen/QwQ-32B-GGUF's set).
RELEASE_QUANTS = ("Q4_K_M", "Q5_0", "Q5_K_M", "Q6_K", "Q8_0")
DEFAULT_EVAL_CTX = 512
QUANTIZE_POLL_S = 0.1

# --- Memory plan and doctor -----------------------------------------------------------------
# Published QwQ-32B GGUF sizes in bytes (reference README): official Qwen/QwQ-32B-GGUF, then
# community imatrix quants. The doctor and InsufficientMemoryError suggest quants from these.
QWQ_GGUF_SIZES = {
    "Q8_0": 34_800_000_000, "Q6_K": 26_900_000_000, "Q5_K_M": 23_300_000_000,
    "Q5_0": 22_600_000_000, "Q4_K_M": 19_900_000_000,
}
QWQ_COMMUNITY_GGUF_SIZES = {
    "Q4_K_S": 18_900_000_000, "IQ4_XS": 17_800_000_000, "Q3_K_M": 16_000_000_000,
    "IQ3_XXS": 12_900_000_000, "Q2_K": 12_400_000_000, "IQ2_M": 11_400_000_000,
    "IQ2_XXS": 9_100_000_000,
}
# 64 layers x 8 KV heads x 128 x 2 (K,V) x 2 bytes.
QWQ_KV_BYTES_PER_TOKEN_F16 = 256 * 1024
# llama.cpp rounds n_ctx up to a multiple of this (llama-context.cpp: GGML_PAD(n_ctx, 256)).
LLAMA_CTX_PAD = 256
# Kept free on each device beyond the plan: CUDA/Metal contexts and driver buffers take a few
# hundred MiB of VRAM; the OS, Python and page-cache churn need some RAM.
PLAN_VRAM_MARGIN_BYTES = 768 * 1024 * 1024
PLAN_RAM_MARGIN_BYTES = 1024 * 1024 * 1024
# Contexts the automatic fit tries, largest first, before giving up at its floor.
PLAN_MIN_CTX = 4096
# Weight types this llama.cpp repacks into CPU_REPACK buffers on x86-64 with AVX2/AVX-512
# (observed: Q4_0 and Q4_K are repacked, Q8_0/Q6_K/F16/BF16 are not).
CPU_REPACK_TYPES = ("Q4_0", "Q4_K", "IQ4_NL")
# Apple GPUs may use about this share of unified memory (Metal's recommendedMaxWorkingSetSize
# is ~2/3 of RAM on small machines and ~3/4 on 36 GB and up; llama.cpp reports that value).
METAL_WORKING_SET_SHARE_SMALL = 2 / 3
METAL_WORKING_SET_SHARE_LARGE = 3 / 4
METAL_LARGE_MEMORY_BYTES = 36 * 1024**3

# --- Speculative decoding (runtime/speculative.py) -------------------------------------------
# The drafter QwQ.load uses when none is named (None: plain decoding; see docs/speculative.md
# for the measurement behind the choice).
DEFAULT_DRAFT = None
DRAFT_NGRAM = "ngram"
# Proposals per verification batch: at most DRAFT_MAX (llama.cpp's --draft-max default), and a
# proposal shorter than DRAFT_MIN is not verified (plain decoding instead).
DEFAULT_DRAFT_MAX = 16
DEFAULT_DRAFT_MIN = 1
# n-gram self-speculation: the longest suffix of NGRAM_MAX down to NGRAM_MIN tokens that occurred
# before in the context proposes what followed it (prompt lookup, as llama.cpp's ngram modes).
NGRAM_MIN = 2
NGRAM_MAX = 4
# Adaptive draft length (speculative.AdaptiveLength): prior per-token acceptance rate and
# extra cost of one more position in a verification batch (relative to a one-token decode),
# both replaced by measurements as rounds go; the decay weighs recent rounds.
SPEC_PRIOR_ACCEPT = 0.5
SPEC_PRIOR_BATCH_COST = 0.2
SPEC_DECAY = 0.85
# When speculation does not pay off, plain decoding for a pause that doubles up to this many
# tokens before the next probe.
SPEC_MAX_PAUSE = 256
# Proposals asked for by a probe round after a pause.
SPEC_PROBE_LENGTH = 4
# A one-token decode is re-timed after this many rounds (its cost drifts with the context).
SPEC_RETIME_ROUNDS = 64
# Target and draft vocabularies may differ in size by this many (padding) rows, as llama.cpp's
# common/speculative.cpp allows (QwQ-32B: 152064 rows, Qwen2.5-0.5B: 151936).
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128

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
