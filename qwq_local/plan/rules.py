"""llama.cpp's memory rules, as arithmetic on a GGUF header: layer placement, KV cache rows,
compute and output buffers. `memory.py` adds them up per device and fits them to a machine.

Rules followed (llama.cpp bundled with llama-cpp-python 0.3.x):
- Layer placement: with n GPU layers, the LAST n repeating layers go to the GPU; the output
  layer (output.weight, output_norm) follows only when n > n_layer (n_layer + 1 = "all");
  token_embd always stays on the CPU.
- n_ctx is rounded up to a multiple of 256; the KV cache holds n_ctx cells per layer of
  ggml_row_size(type, n_head_kv * head_dim) bytes for K and again for V (q8_0 is 34 bytes per
  32 values, q4_0 18 per 32), on the device of its layer (offload_kqv).
- A quantized V cache needs flash attention: "auto" turns it on, an explicit off is refused.
  Flash attention "auto" resolves to on (CPU, CUDA and Metal all support head_dim 128).
- Weights on the CPU are memory-mapped; llama.cpp logs the mapped buffer as the file span from
  the first to the last CPU tensor that is not repacked, plus a CPU_REPACK buffer holding the
  repacked copies (Q4_0/Q4_K on x86 with AVX2). `weights_logged` follows that accounting;
  `weights` counts every tensor once (what must be resident) and is what fitting uses.
- Output buffer: n_vocab floats per sequence (n_seq_max = 1), in host memory.
- Compute buffer (ggml-alloc's high-water mark for the worst-case graph, n_ubatch = T tokens,
  every token an output, the whole context visible). A formula calibrated on real loads here
  (E = n_embd, F = n_ff, V = n_vocab, H = n_head, Ekv = n_head_kv * head_dim, C = n_ctx,
  f32 = 4 bytes, mask = C*T*2 with flash attention, C*T*4 without):
      attention  = mask + (0 with FA, else H*C*T*4 for KQ) + (5*E + 2*Ekv)*T*4
      ffn        = mask + 3*F*T*4 + min(4, 1 + F/E)*E*T*4
      output     = V*T*4 + 2*E*T*4 (3*E*T*4 with a quantized KV cache)   (logits of T tokens)
      compute    = max(attention, ffn, output) + 14 KiB  (small inputs)
  On QwQ-32B's own shapes (benchmarks/bench_plan.py --qwq-layers 4) it matches llama.cpp to
  0.01 MiB with an f16 cache (317 MiB at T=512, 710 MiB without flash attention at 8K) and is
  10 MiB high with a quantized one. On deliberately odd synthetic shapes (2 layers, hidden
  256..1024) allocator fragmentation moves the real peak by -27%..+14% of the formula.
- GPU side (arithmetic only: not measured in this environment): the compute buffer of the GPU
  holds the graph of its layers (and the logits with the output layer); with a partial offload
  and batches of 32+ tokens llama.cpp also runs the CPU tensors' matrix products on the GPU,
  copying one CPU layer (or the output matrix plus its logits) into the GPU compute buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import constants
from ..errors import BadModelFileError, UsageError

_COMPUTE_FIXED = 14 * 1024
_BLK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a GGUF header."""

    path: Path
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    # (name, ggml type name, shape, offset in its file's data section, nbytes, split part index)
    tensors: tuple[tuple[str, str, tuple[int, ...], int, int, int], ...] = field(repr=False)

    @property
    def file_weights_bytes(self) -> int:
        return sum(t[4] for t in self.tensors)


def read_shape(model: Path | str | ModelShape) -> ModelShape:
    """Read the hyperparameters and tensor table of a GGUF (validated by gguf.check)."""
    if isinstance(model, ModelShape):
        return model
    from ..gguf.check import inspect_gguf

    info = inspect_gguf(model)
    arch = info.architecture or ""

    def num(key: str, default: int | None = None) -> int:
        value = info.arch_value(key)
        values = value if isinstance(value, list) else [value]
        # A crafted file may hold any type here; int() of a string or a float would crash
        # or silently plan nonsense.
        if value is not None and not (values and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                     for v in values)):
            raise BadModelFileError(f"{model}: {arch}.{key} is {_short(value)}, not a non-negative integer "
                                    f"({info.metadata_types.get(f'{arch}.{key}')}); the file is damaged or not "
                                    "a llama.cpp language model")
        if isinstance(value, list):  # per-layer arrays: the plan models uniform layers
            value = max(value)
        if value is None:
            if default is None:
                raise BadModelFileError(f"{model}: GGUF has no {arch}.{key}; cannot plan memory for it (is it a "
                                        "llama.cpp language model?)")
            return default
        return int(value)

    for key in ("block_count", "embedding_length", "attention.head_count"):
        if num(key) == 0:
            raise BadModelFileError(f"{model}: {arch}.{key} is 0; the file is damaged")

    n_embd = num("embedding_length")
    n_head = num("attention.head_count")
    n_head_kv = num("attention.head_count_kv", n_head)
    head_dim = n_embd // max(n_head, 1)
    n_vocab = info.vocab_size or 0
    embd = info.tensor("token_embd.weight")
    if not n_vocab and embd is not None:
        n_vocab = embd.shape[1]
    tensors = [(t.name, t.type_name, tuple(t.shape), t.offset, t.nbytes, 0) for t in info.tensors]
    n_split = info.metadata.get("split.count")
    if isinstance(n_split, int) and n_split > 1:
        # A split GGUF (name-0000k-of-0000n.gguf): each part holds its own tensors, and
        # llama.cpp maps each part as a buffer of its own.
        from ..errors import ModelNotFoundError
        from ..hub.cache import split_parts

        parts = split_parts(Path(model))
        if len(parts) != n_split:
            raise UsageError(f"{model} is part of a {n_split}-part split GGUF; pass its first part "
                             f"(named like name-00001-of-{n_split:05d}.gguf)")
        for index, part in enumerate(parts[1:], start=1):
            if not part.is_file():
                raise ModelNotFoundError(f"split GGUF part {part} is missing; download every part")
            tensors += [(t.name, t.type_name, tuple(t.shape), t.offset, t.nbytes, index)
                        for t in inspect_gguf(part).tensors]
    return ModelShape(
        path=Path(model), arch=arch, n_layer=num("block_count"), n_embd=n_embd, n_head=n_head,
        n_head_kv=n_head_kv, head_dim_k=num("attention.key_length", head_dim),
        head_dim_v=num("attention.value_length", head_dim), n_ff=num("feed_forward_length"),
        n_vocab=n_vocab, n_ctx_train=num("context_length", constants.NATIVE_CONTEXT), tensors=tuple(tensors))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def pad_ctx(n_ctx: int) -> int:
    pad = constants.LLAMA_CTX_PAD
    return -(-int(n_ctx) // pad) * pad


def kv_bytes_per_token(shape: ModelShape, kv_type: str = "f16", *, type_v: str | None = None) -> int:
    """KV cache bytes per context token over all layers (both K and V)."""
    from ..quantize.types import ggml_row_bytes

    per_layer = (ggml_row_bytes(kv_type.upper(), shape.n_head_kv * shape.head_dim_k)
                 + ggml_row_bytes((type_v or kv_type).upper(), shape.n_head_kv * shape.head_dim_v))
    return per_layer * shape.n_layer


def layer_of(name: str, n_layer: int) -> int:
    """-1 for the input layer (token_embd), n_layer for the output layer, else the block."""
    m = _BLK.match(name)
    if m:
        return int(m.group(1))
    return -1 if name.startswith("token_embd") else n_layer


def device_of_layer(layer: int, n_layer: int, gpu_layers: int) -> str:
    """llama.cpp's assignment: the last gpu_layers blocks, output only when all (n_layer + 1)."""
    if layer < 0 or gpu_layers <= 0:
        return "cpu"
    first_gpu = max(n_layer - gpu_layers, 0)
    if layer >= n_layer:
        return "gpu" if gpu_layers > n_layer else "cpu"
    return "gpu" if layer >= first_gpu else "cpu"


def is_repacked(name: str, type_name: str, shape: tuple[int, ...]) -> bool:
    # Only matrices used by MUL_MAT (not the embedding lookup) with rows in groups of 8.
    return (type_name in constants.CPU_REPACK_TYPES and len(shape) >= 2 and shape[1] % 8 == 0
            and not name.startswith("token_embd"))


def gpu_tensor_bytes(type_name: str, shape: tuple[int, ...], nbytes: int) -> int:
    # ggml-cuda pads quantized rows to 512 values (MATRIX_ROW_PADDING) once per tensor.
    from ..quantize.types import ggml_row_bytes

    if type_name not in ("F32", "F16", "BF16") and shape and shape[0] % 512:
        nbytes += ggml_row_bytes(type_name, 512 - shape[0] % 512)
    return -(-nbytes // 128) * 128


def compute_bytes(shape: ModelShape, *, n_ctx: int, n_ubatch: int, flash_attn: bool,
                   layers: bool, output: bool, quantized_kv: bool = False) -> int:
    """Compute-buffer formula (see module docstring); `layers`/`output`: which parts of the
    graph run on the device."""
    T, C, E, F = n_ubatch, n_ctx, shape.n_embd, shape.n_ff
    ekv = shape.n_head_kv * max(shape.head_dim_k, shape.head_dim_v)
    mask = C * T * (2 if flash_attn else 4)
    peaks = [E * T * 4]  # the embeddings of the batch at least
    if layers:
        kq = 0 if flash_attn else shape.n_head * C * T * 4
        peaks.append(mask + kq + (5 * E + 2 * ekv) * T * 4)
        peaks.append(int(mask + 3 * F * T * 4 + min(4.0, 1 + F / E) * E * T * 4))
    if output:
        # One more E*T*4 block stays live under the logits with a quantized KV cache (measured).
        peaks.append(shape.n_vocab * T * 4 + (3 if quantized_kv else 2) * E * T * 4)
    return int(max(peaks)) + _COMPUTE_FIXED
