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
# Control tokens that open or close a turn: sampling any of them (or any token in llama.cpp's
# end-of-generation set) ends the generation, and none of it reaches the reply.
TURN_BOUNDARY_TOKENS = (IM_START, IM_END, ENDOFTEXT)
# What the runtime appends when a thinking budget runs out.
THINKING_CLOSE_TEXT = "\n" + THINK_CLOSE + "\n\n"

# GGUF key where `convert` records the Unicode normalizer of the checkpoint's tokenizer.json
# ("NFC" or "none"); llama.cpp ignores normalizers, so qwq-local applies it before tokenizing.
# A key of our own: GGUF's standard tokenizer keys have no normalizer field.
GGUF_NORMALIZER_KEY = "tokenizer.qwq_local.normalizer"
# Normalizers qwq-local reproduces exactly, and the one Qwen2-family tokenizers (QwQ's
# tokenizer.json) declare, used for GGUFs that lack the key (pre-tokenizer "qwen2").
NORMALIZERS = ("NFC", "none")
QWEN2_NORMALIZER = "NFC"

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

# --- Context and YaRN (model card: static YaRN x4 over 32768 for contexts above 8192) --------
NATIVE_CONTEXT = 32768
MAX_CONTEXT = 131072
# The card: "for prompts exceeding 8,192 tokens" enable static YaRN, factor 4.0,
# original_max_position_embeddings 32768 (llama.cpp: --rope-scaling yarn --rope-scale 4
# --yarn-orig-ctx 32768, i.e. freq_scale 0.25). No scaling at or below YARN_MIN_CTX.
YARN_MIN_CTX = 8192
YARN_FACTOR = 4.0
YARN_ORIG_CTX = 32768
ROPE_SCALING_CHOICES = ("auto", "none", "yarn")
DEFAULT_ROPE_SCALING = "auto"
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

# --- Extra buffer types (AMX/repack) probe (backend/probe.py) --------------------------------
# Verdicts by build key (loaded libllama*/libggml* + llama-cpp-python version + CPU), under
# cache_dir(); the newest PROBE_RECORD_MAX are kept (one per venv/build a user switches between).
PROBE_RECORD_FILE = "extra_bufts_probes.json"
PROBE_RECORD_MAX = 32
PROBE_TIMEOUT_S = 120.0
# This llama.cpp's x86 instruction-set CMake options (vendor/llama.cpp/ggml/CMakeLists.txt) and
# the /proc/cpuinfo flags each needs. With GGML_NATIVE=ON (the default) the build uses
# -march=native, which on an AMX CPU defines __AMX_INT8__ and compiles the AMX kernels whatever
# GGML_AMX_* say; those options act only with GGML_NATIVE=OFF. So the no-AMX build is
# GGML_NATIVE=OFF, these options set from the CPU's flags, GGML_AMX_*=OFF, GGML_CPU_REPACK=ON.
GGML_X86_ISA_OPTIONS = (
    ("SSE42", ("sse4_2",)), ("AVX", ("avx",)), ("AVX2", ("avx2",)), ("BMI2", ("bmi2",)),
    ("FMA", ("fma",)), ("F16C", ("f16c",)), ("AVX_VNNI", ("avx_vnni",)),
    ("AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("AVX512_VBMI", ("avx512vbmi",)), ("AVX512_VNNI", ("avx512_vnni",)), ("AVX512_BF16", ("avx512_bf16",)),
)
GGML_AMX_OPTIONS = ("AMX_TILE", "AMX_INT8", "AMX_BF16")
# --- RPC workers (llama.cpp's ggml-rpc backend) ----------------------------------------------
# `rpc-server`'s default port (llama.cpp tools/rpc/rpc-server.cpp).
DEFAULT_RPC_PORT = 50052
DEFAULT_RPC_HOST = "127.0.0.1"
DEFAULT_RPC_TIMEOUT_S = 300.0
# Connecting to and asking a worker for its devices; a worker serves one client at a time, so a
# busy one accepts the TCP connection and then does not answer.
RPC_PROBE_TIMEOUT_S = 15.0
# pip's wheel cache ignores CMAKE_ARGS: without --no-cache-dir a cached build without RPC is reused.
RPC_INSTALL_FIX = ('CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
                   f'llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}')
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
# Seconds one llama.cpp call on a model with RPC workers may take before the worker is declared
# lost (a host that vanished without closing its socket never answers; a killed one is seen at once).
ENV_RPC_TIMEOUT = "QWQ_LOCAL_RPC_TIMEOUT"


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

# --- Server (qwq-local serve) -----------------------------------------------------------------
# Default port: clashes with neither Ollama (11434), LM Studio (1234), llama-server (8080) nor
# vLLM (8000).
SERVE_DEFAULT_HOST = "127.0.0.1"
SERVE_DEFAULT_PORT = 8014
# Requests that may wait for a free slot; the next one gets 503 + Retry-After.
SERVE_QUEUE_SIZE = 16
# --parallel: slots sharing one context (llama.cpp's n_seq_max; its LLAMA_MAX_SEQ is 256), each
# with at least MIN_CTX_PER_SEQ positions of the KV cache.
MAX_PARALLEL = 64
# A request goes to the slot whose cached tokens share the longest prefix with its prompt when
# that prefix is at least this share of the prompt (llama-server's --slot-prompt-similarity
# default, 0.5); otherwise to the free slot that keeps the busy ones most contiguous, then the
# least recently used (serve/engine.py Engine._pick).
SERVE_SLOT_SIMILARITY = 0.5
MIN_CTX_PER_SEQ = 64
# Request body limit: far above any prompt that fits 131072 tokens.
SERVE_MAX_BODY_BYTES = 8 * 1024 * 1024
# Seconds between SSE comment pings on a quiet stream (a long prompt read), so proxies keep it.
SERVE_SSE_PING_S = 15
# How often a non-streamed request checks whether its client went away (a stream notices at once).
SERVE_DISCONNECT_CHECK_S = 0.2
ENV_API_KEY = "QWQ_LOCAL_API_KEY"
