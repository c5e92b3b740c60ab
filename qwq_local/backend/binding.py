"""The one place that drives llama.cpp (through llama-cpp-python's low-level ctypes API).

Everything that loads a model or a context goes through here, so that:
- llama.cpp's log goes to a ring buffer (library.py; shown with QWQ_LOCAL_DEBUG=1, quoted in errors);
- untrusted files are validated first by the caller (`qwq_local.gguf.load_model`: our own GGUF
  checks, and a first load in a child process, so an abort() inside llama.cpp cannot kill it);
- extra buffer types (weight repacking: AMX and friends) are used only where a cached probe in a
  child process showed that they work. On CPUs that advertise AMX, this llama.cpp's AMX kernel
  faults on quantized prompt batches (SIGSEGV/SIGILL in `ldtilecfg`), also inside many VMs.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .. import constants
from ..errors import RuntimeLoadError, UsageError
from . import probe
from .library import (  # noqa: F401  (part of the binding's API: backend.llama() etc.)
    GGML_TYPES, capture_log, default_threads, llama, llama_cpp_version, loaded_libraries, log_tail,
    system_info,
)

_STATE: dict[str, Any] = {}  # this process's extra-buffer verdict
_SHOWN_TAGS = frozenset({constants.THINK_OPEN, constants.THINK_CLOSE, constants.TOOL_CALL_OPEN,
                         constants.TOOL_CALL_CLOSE})


def guarded(guard, fn: Any, *args: Any) -> Any:
    """fn(*args), through `guard` (an rpc.RpcGuard: Model.guard of a model on RPC workers) when
    there is one: every llama.cpp call that may wait for a worker goes this way."""
    return guard.call(fn, *args) if guard is not None else fn(*args)


def through_guard(model: "Model", fn: Any) -> Any:
    """fn itself, or fn routed through the model's RPC guard: for hot loops that look the
    function up once (decode.run_loop's sampler call)."""
    return fn if model.guard is None else functools.partial(model.guard.call, fn)


def decode_batch(model: "Model", ctx_ptr: Any, batch: Any) -> None:
    """llama_decode of a filled batch (through the model's RPC guard); RuntimeLoadError when
    llama.cpp refuses it."""
    rc = guarded(model.guard, llama().llama_decode, ctx_ptr, batch)
    if rc != 0:
        raise RuntimeLoadError(f"llama_decode failed with code {rc}: {log_tail(3)}")


# ---------------------------------------------------------------------------------------------
# Extra buffer types (AMX / repack): probed once per llama.cpp build, in a child process
# ---------------------------------------------------------------------------------------------

def build_key(libraries: Sequence[Path] | None = None) -> str:
    """The probe record key of a build (default: the one loaded here); see probe.probe_key."""
    return probe.probe_key(loaded_libraries() if libraries is None else libraries, version=llama_cpp_version())


def probe_record(libraries: Sequence[Path] | None = None) -> dict:
    """The stored verdict for this build (or `libraries`): {"key", "ok", "reason", "libraries",
    "llama_cpp_python", "cpu", "probed_at"}, or {"key"} alone before its first probe."""
    key = build_key(libraries)
    return probe.probe_records().get(key) or {"key": key}


def extra_bufts_allowed(*, libraries: Sequence[Path] | None = None, command: Sequence[str] | None = None) -> bool:
    """Whether loading with extra buffer types is safe on this machine with this build.

    QWQ_LOCAL_AMX=off|on overrides; otherwise a child process decodes quantized batches with
    them on, once per build key (the loaded libllama*/libggml* files with their size and
    mtime_ns, the llama-cpp-python version, the CPU): a rebuild or reinstall probes again, and
    builds side by side (two venvs) keep a verdict each. A crash there means "not safe".
    libraries/command: another build's files and probe command (tests); the default verdict is
    also cached in this process (the loaded libraries cannot change under it).
    """
    forced = os.environ.get(constants.ENV_AMX, "").strip().lower()
    if forced in {"off", "0", "false", "no"}:
        return False
    if forced in {"on", "1", "true", "yes"}:
        return True
    default = libraries is None and command is None
    if default and _STATE.get("extra_bufts") is not None:
        return _STATE["extra_bufts"]
    libs = loaded_libraries() if libraries is None else list(libraries)
    key = probe.probe_key(libs, version=llama_cpp_version())
    record = probe.probe_records().get(key)
    if record is None:
        result = probe_extra_bufts(command=command)
        record = probe.store_probe_record(key, {
            **result, "libraries": probe.library_fingerprint(libs), "llama_cpp_python": llama_cpp_version(),
            "cpu": probe.cpu_identity()})
    if default:
        _STATE["extra_bufts"] = record["ok"]
    return record["ok"]


def probe_extra_bufts(*, command: Sequence[str] | None = None, timeout: float = constants.PROBE_TIMEOUT_S) -> dict:
    """Run the probe child (or `command`, for tests) and classify how it ended (probe.run_probe)."""
    if command is None:
        models = _write_probe_models(constants.cache_dir())
        command = [sys.executable, "-m", "qwq_local.backend", "--probe-extra-bufts", *map(str, models)]
    return probe.run_probe(command, timeout=timeout)


def _write_probe_models(directory: Path) -> list[Path]:
    """Small qwen2 GGUFs whose matrices are Q4_0, and Q4_K + Q6_K (a Q4_K_M mix): the types of
    the quants users run, with rows that llama.cpp's AMX and repack kernels accept."""
    import gguf
    import numpy as np

    from ..synthetic.factory import write_qwen2_gguf

    q4_0, q4_k_m = directory / "probe-q4_0.gguf", directory / "probe-q4_k_m.gguf"
    if q4_0.exists() and q4_k_m.exists():
        return [q4_0, q4_k_m]
    directory.mkdir(parents=True, exist_ok=True)
    dims = dict(n_embd=256, n_layer=1, n_head=4, n_head_kv=2, n_ff=512, n_vocab=257, context_length=512)

    def write(path: Path, matrix) -> Path:
        rng = np.random.default_rng(0)

        def tensor(name: str, shape: tuple[int, ...]):
            if len(shape) == 1:
                return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
            return matrix((rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32))

        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write_qwen2_gguf(tmp, tensor=tensor, **dims)
        os.replace(tmp, path)
        return path

    t = gguf.GGMLQuantizationType.Q4_0
    write(q4_0, lambda data: (gguf.quants.quantize(data, t), t))
    # K-quants cannot be made in numpy: quantize an f32 copy with llama.cpp (a file-to-file
    # operation that computes nothing, so it is safe in this process).
    f32 = write(directory / "probe-f32.gguf", lambda data: data)
    lib = llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = lib.LLAMA_FTYPE_MOSTLY_Q4_K_M
    tmp = q4_k_m.with_name(q4_k_m.name + f".tmp{os.getpid()}")
    rc = lib.llama_model_quantize(str(f32).encode(), str(tmp).encode(), ctypes.byref(params))
    f32.unlink()
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeLoadError(f"could not build the extra-buffer probe model: {log_tail(3)}")
    os.replace(tmp, q4_k_m)
    return [q4_0, q4_k_m]


def _probe_main(model_paths: Sequence[str]) -> int:
    for model_path in model_paths:
        model = Model.load(Path(model_path), extra_bufts=True)
        ctx = Context(model, n_ctx=256, n_batch=64, n_ubatch=64, n_threads=1)
        ctx.decode(list(range(64)), start_pos=0)  # a quantized prompt batch: where AMX faults
        ctx.decode_one(1)
        ctx.close()
        model.close()
    print("probe-ok")
    return 0


# ---------------------------------------------------------------------------------------------
# Models and contexts
# ---------------------------------------------------------------------------------------------

class Model:
    """A loaded llama.cpp model. Use `Model.load(...)`; close() (or `with`) frees it."""

    def __init__(self, ptr, path: Path, *, extra_bufts: bool, n_gpu_layers: int):
        lib = llama()
        self.ptr = ptr
        self.path = path
        self.extra_bufts = extra_bufts
        self.n_gpu_layers = n_gpu_layers
        self.vocab = lib.llama_model_get_vocab(ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(ptr)
        self.n_embd = lib.llama_model_n_embd(ptr)
        self.n_layer = lib.llama_model_n_layer(ptr)
        self._piece_cache: dict[int, bytes] = {}
        self._output_cache: dict[int, bytes] = {}  # see output_bytes
        # Set by load(guard=...) for models on RPC workers: every call that may talk to a worker
        # goes through guard.call (backend/rpc.py), and a lost model is never freed.
        self.guard = None
        self.devices: list[int] = []  # the offload devices asked for (ggml_backend_dev_t)

    @classmethod
    def load(cls, path: Path | str, *, n_gpu_layers: int = 0, use_mmap: bool = True,
             vocab_only: bool = False, extra_bufts: bool | None = None,
             metadata_only: bool = False, devices: Sequence[int] | None = None,
             tensor_split: Sequence[float] | None = None, guard=None) -> "Model":
        """Load a GGUF as it is. Untrusted files go through `qwq_local.gguf.load_model`, which
        validates them first (the binding sits below the validator).

        metadata_only: llama.cpp checks hyperparameters, vocabulary and every tensor's name,
        shape and file range but reads and allocates no weights (no_alloc); such a model can
        still size a context, not compute.

        devices: ggml_backend_dev_t pointers to offload to, in order (llama_model_params.devices;
        None: llama.cpp's default, every local GPU); tensor_split: layers (or shares) per device;
        guard: an rpc.RpcGuard through which llama.cpp is called (models on RPC workers)."""
        path = Path(path)
        if not path.is_file():
            from ..errors import ModelNotFoundError

            raise ModelNotFoundError(f"no model file at {path}")
        lib = llama()
        if metadata_only:
            extra_bufts = False  # nothing will be computed
        elif extra_bufts is None:
            extra_bufts = extra_bufts_allowed()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        # This llama.cpp has no use_mmap flag: load_mode AUTO maps the file where it can.
        params.load_mode = lib.LLAMA_LOAD_MODE_AUTO if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        params.vocab_only = vocab_only
        params.use_extra_bufts = bool(extra_bufts)
        if metadata_only:
            # no_alloc together with an mmap load trips GGML_ASSERT(!ml.no_alloc) here.
            params.no_alloc = True
            params.load_mode = lib.LLAMA_LOAD_MODE_NONE
        keep = []
        if devices is not None:
            keep.append((ctypes.c_void_p * (len(devices) + 1))(*devices, None))  # NULL-terminated
            params.devices = ctypes.cast(keep[-1], ctypes.c_void_p)
        if tensor_split is not None:
            split = list(tensor_split) + [0.0] * (lib.llama_max_devices() - len(tensor_split))
            keep.append((ctypes.c_float * len(split))(*split))
            params.tensor_split = ctypes.cast(keep[-1], ctypes.POINTER(ctypes.c_float))
        load = lib.llama_model_load_from_file
        ptr = guarded(guard, load, str(path).encode(), params)
        if not ptr:
            raise RuntimeLoadError(f"llama.cpp could not load {path}: {log_tail(3) or 'no log'}")
        model = cls(ptr, path, extra_bufts=bool(extra_bufts), n_gpu_layers=int(n_gpu_layers))
        model.guard = guard
        model.devices = list(devices or [])
        return model

    def close(self) -> None:
        if self.ptr and not (self.guard and self.guard.lost):
            llama().llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        with contextlib.suppress(Exception):
            self.close()

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(65536)
        n = llama().llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama().llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        lib = llama()
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # Lone UTF-16 surrogates: JSON's "\ud800" escapes, or argv bytes that are not UTF-8
            # (Python keeps them as U+DC80..U+DCFF). llama.cpp reads UTF-8 only.
            raise UsageError(f"the text is not valid Unicode: it holds {exc.object[exc.start]!r}, half of a "
                             "UTF-16 surrogate pair (or a byte that is not UTF-8); send UTF-8 text") from None
        cap = len(data) + 16
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = True) -> bytes:
        """The bytes a token stands for (cached: generation calls this once per token)."""
        key = token if special else -token - 1
        piece = self._piece_cache.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama().llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama().llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            piece = buf.raw[:n]
            self._piece_cache[key] = piece
        return piece

    def output_bytes(self, token: int) -> bytes:
        """The bytes a generated token shows (cached): its text, except that llama.cpp CONTROL
        tokens (`<|image_pad|>`, `<|fim_prefix|>`, ...: QwQ's added tokens marked special) show
        nothing, as in llama-server (token_to_piece with special=false) and vLLM
        (skip_special_tokens). QwQ's tags (`<think>`, `</tool_call>`, ...) always show, even in a
        GGUF that marks them CONTROL: the thought splitter and the tool-call parser read them."""
        piece = self._output_cache.get(token)
        if piece is None:
            lib = llama()
            piece = self.token_bytes(token)
            if lib.llama_vocab_get_attr(self.vocab, token) & lib.LLAMA_TOKEN_ATTR_CONTROL \
                    and piece.decode("utf-8", errors="replace") not in _SHOWN_TAGS:
                piece = b""
            self._output_cache[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """The text of `tokens`; special=False: as generation shows it (output_bytes)."""
        piece = self.token_bytes if special else self.output_bytes
        return b"".join(piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama().llama_vocab_is_eog(self.vocab, token))


class Context:
    """A llama.cpp context (KV cache + compute buffers) on a Model, with one reusable batch."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int = constants.DEFAULT_N_BATCH,
                 n_ubatch: int | None = None, n_threads: int | None = None,
                 n_threads_batch: int | None = None, type_k: str = "f16", type_v: str = "f16",
                 flash_attn: bool | None = None, rope: dict | None = None, logits_all: bool = False,
                 n_seq: int = 1):
        lib = llama()
        if type_k not in GGML_TYPES or type_v not in GGML_TYPES:
            raise UsageError(f"unknown KV cache type {type_k}/{type_v}; use one of {', '.join(constants.KV_TYPES)}")
        threads = n_threads or default_threads()
        params = lib.llama_context_default_params()
        params.n_ctx = int(n_ctx)
        params.n_batch = int(min(n_batch, n_ctx))
        params.n_ubatch = int(min(n_ubatch or n_batch, n_batch, n_ctx))
        # n_seq > 1: one KV stream of n_ctx/n_seq cells per sequence (llama.cpp's default,
        # kv_unified off), driven through backend/batched.py's SharedContext.
        params.n_seq_max = int(n_seq)
        params.n_threads = threads
        params.n_threads_batch = n_threads_batch or threads
        params.type_k = GGML_TYPES[type_k]
        params.type_v = GGML_TYPES[type_v]
        if flash_attn is not None:
            params.flash_attn_type = 1 if flash_attn else 0
        # rope: a rope.rope_params dict; None leaves the GGUF's own rope metadata in charge.
        if rope is not None and rope["scaling"] == "yarn":
            params.rope_scaling_type = lib.LLAMA_ROPE_SCALING_TYPE_YARN
            params.rope_freq_scale = float(rope["freq_scale"])
            params.yarn_orig_ctx = int(rope["orig_ctx"])
            # -1: llama.cpp picks ext_factor 1.0 for YaRN (llama-context.cpp), i.e. full YaRN.
            params.yarn_ext_factor = -1.0
        elif rope is not None:
            # Plain RoPE even if the GGUF carries rope scaling in its metadata: with
            # LLAMA_ROPE_SCALING_TYPE_NONE llama.cpp forces freq_scale 1 (llama-context.cpp).
            params.rope_scaling_type = lib.LLAMA_ROPE_SCALING_TYPE_NONE
        params.no_perf = False
        self.model = model
        self.params = params
        self.ptr = guarded(model.guard, lib.llama_init_from_model, model.ptr, params)
        if not self.ptr:
            raise RuntimeLoadError(
                f"llama.cpp could not create a context of {n_ctx} tokens for {model.path}: "
                f"{log_tail(3) or 'no log'} (try a smaller --ctx or a q8_0 KV cache)")
        self.n_ctx = lib.llama_n_ctx(self.ptr)
        # Each sequence's share of the KV cache (n_ctx // n_seq; llama.cpp may round n_ctx up).
        self.n_ctx_seq = int(lib.llama_n_ctx_seq(self.ptr)) if hasattr(lib, "llama_n_ctx_seq") \
            else self.n_ctx // max(1, int(n_seq))
        self.n_batch = lib.llama_n_batch(self.ptr)
        self.logits_all = logits_all
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self.n_past = 0
        # The batch row whose logits the next sample reads (-1: the last output); a
        # batched.SequenceView sets its own row in a shared batch.
        self.out_index = -1
        self.seq = 0  # the sequence id this object decodes into (see sequence())
        self._handle = False

    def sequence(self, seq: int) -> "Context":
        """A handle on sequence `seq` of this context (made with n_seq > 1): its own n_past and
        n_ctx // n_seq positions, decoded on its own (not batched with the other sequences, as
        batched.SharedContext does). It shares this context's pointer and batch, so calls on
        different handles must not overlap; closing a handle does nothing."""
        handle = copy.copy(self)
        handle.seq, handle.n_past, handle._handle, handle.n_ctx = int(seq), 0, True, self.n_ctx_seq
        return handle

    def output_row(self, i: int) -> int:
        """The llama.cpp output index of the i-th token with logits in the last decode (-1: the
        last), for llama_sampler_sample; a batched.SequenceView maps it into the shared batch."""
        return i

    def close(self) -> None:
        if self._handle:
            return
        lib = llama()
        if self.model.guard and self.model.guard.lost:
            self.ptr = None  # freeing would wait forever on the lost worker
            return
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self.ptr:
            lib.llama_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover
        with contextlib.suppress(Exception):
            self.close()

    def decode(self, tokens: Sequence[int], *, start_pos: int | None = None, logits: str = "last") -> None:
        """Feed tokens at positions start_pos.. (default: after what is cached), in batches.

        logits: "last" (only the final token's), "all" (every token's, read with logits(i)
        for i in range(len(tokens)) of the final batch), or "none".
        """
        pos = self.n_past if start_pos is None else start_pos
        if pos + len(tokens) > self.n_ctx:
            from ..errors import ContextOverflowError

            raise ContextOverflowError(
                f"{pos + len(tokens)} tokens do not fit the context of {self.n_ctx}; raise n_ctx or shorten the input")
        batch = self._batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last_chunk = start + self.n_batch >= len(tokens)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = pos + start + i
                batch.seq_id[i][0] = self.seq
                batch.logits[i] = logits == "all" or (logits == "last" and last_chunk and i == len(chunk) - 1)
            batch.n_tokens = len(chunk)
            decode_batch(self.model, self.ptr, batch)
        self.n_past = pos + len(tokens)

    def decode_one(self, token: int) -> None:
        """The generation hot path: one token, logits on, no Python loops."""
        batch = self._batch
        batch.token[0] = token
        batch.pos[0] = self.n_past
        batch.seq_id[0][0] = self.seq
        batch.logits[0] = True
        batch.n_tokens = 1
        decode_batch(self.model, self.ptr, batch)
        self.n_past += 1

    def synchronize(self) -> None:
        """Wait for the decode llama.cpp queued (llama_decode returns before async backends finish)."""
        guarded(self.model.guard, llama().llama_synchronize, self.ptr)

    def decode_verify(self, tokens: Sequence[int]) -> None:
        """Decode tokens (at most n_batch) after what is cached, in one llama_decode, with logits
        for every position: the verification batch of speculative decoding. Row i (output_row(i))
        holds the logits after tokens[i], until the next decode on this context."""
        n = len(tokens)
        if not 0 < n <= self.n_batch or self.n_past + n > self.n_ctx:
            raise UsageError(f"a verification batch of {n} tokens at position {self.n_past} does not fit "
                             f"n_batch {self.n_batch} / n_ctx {self.n_ctx}")
        self.decode(tokens, logits="all")

    def logits(self, i: int = -1):
        """A numpy float32 view of the logits of output i (-1: the last one decoded)."""
        import numpy as np

        ptr = guarded(self.model.guard, llama().llama_get_logits_ith, self.ptr, i)
        if not ptr:
            raise RuntimeLoadError(f"no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def truncate(self, n_keep: int) -> None:
        """Drop cached positions >= n_keep (keep a shared prefix between chat turns)."""
        lib = llama()
        mem = lib.llama_get_memory(self.ptr)
        guard = self.model.guard
        if guard is not None and guard.lost:
            pass  # an abandoned model (its RPC worker is gone): nothing to keep consistent
        elif n_keep <= 0 and not self._handle:
            guarded(guard, lib.llama_memory_clear, mem, True)  # clearing the buffers reaches RPC workers
        else:
            lib.llama_memory_seq_rm(mem, self.seq, max(0, n_keep), -1)
        self.n_past = max(0, min(self.n_past, n_keep))


def child_main(argv: Sequence[str]) -> int:
    """The probe child's entry (`python -m qwq_local.backend --probe-extra-bufts MODEL...`)."""
    if len(argv) >= 2 and argv[0] == "--probe-extra-bufts":
        return _probe_main(list(argv[1:]))
    return 2
