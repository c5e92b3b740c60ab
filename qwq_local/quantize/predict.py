"""Which ggml type llama.cpp's quantizer gives each tensor, and the file size that results.

A port of llama.cpp's src/llama-quant.cpp (`tensor_allows_quantization`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`) for dense decoder models such as
QwQ/Qwen2, so `--dry-run` and `--list` can predict sizes without writing anything (and, for
QwQ-32B, without the 65 GB input). Simplifications, all irrelevant to qwen2: Falcon's and
Llama-70B's special cases are left out; MoE expert counts are honoured only where the rules
read `n_expert`. The header is taken as the input's (the quantizer copies every key and
tensor record), so a file prediction is exact up to a few bytes of added metadata; tests
compare predictions with real quantizer output.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .. import constants
from ..errors import QuantizeError
from .types import QUANT_TYPES, QuantType, ggml_block, ggml_row_bytes, resolve_type

_QUANTIZED_BASES = {t.base for t in QUANT_TYPES} - {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]   # ggml order: ne[0] is the row length
    type: str             # ggml type name of the input tensor, e.g. "BF16"
    nbytes: int = 0


@dataclass
class ModelShape:
    """What the quantizer's type rules read: hyperparameters and the tensor list."""

    n_layer: int
    n_head: int
    n_head_kv: int
    tensors: list[TensorInfo]
    n_expert: int = 0
    header_bytes: int = 0
    alignment: int = constants.GGUF_ALIGNMENT

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_head_kv)

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.ne) for t in self.tensors)


@dataclass(frozen=True)
class Prediction:
    type: str
    bpw: float | None     # effective bits per weight for this input (whole file)
    bytes: int | None     # None: llama.cpp cannot make this type from this input
    requires_imatrix: bool
    note: str = ""


# --- reading shapes ---------------------------------------------------------------------------

def read_shape(path: Path | str) -> ModelShape:
    """The ModelShape of a GGUF file, from its validated header (tensor data is not read)."""
    from ..gguf.check import inspect_gguf

    return shape_from_info(inspect_gguf(path))


def shape_from_info(info) -> ModelShape:
    """A ModelShape from gguf.check's GGUFInfo."""
    tensors = [TensorInfo(t.name, tuple(int(x) for x in t.shape), t.type_name, int(t.nbytes)) for t in info.tensors]

    def arch_int(key: str, default: int) -> int:
        value = info.arch_value(key)
        if isinstance(value, list):  # per-layer arrays: the rules read the first layer's value
            value = value[0] if value else default
        return int(value) if isinstance(value, (int, float)) else default

    # The quantizer adds general.quantization_version when it is missing: one more aligned unit.
    extra = 0 if "general.quantization_version" in info.metadata else info.alignment
    return ModelShape(n_layer=arch_int("block_count", 0), n_head=arch_int("attention.head_count", 1),
                      n_head_kv=arch_int("attention.head_count_kv", 1), tensors=tensors,
                      n_expert=arch_int("expert_count", 0), header_bytes=int(info.data_offset) + extra,
                      alignment=int(info.alignment))


def qwen2_shape(*, n_layer: int, hidden: int, ffn: int, vocab: int, n_head: int, n_head_kv: int,
                tied: bool = False, dtype: str = "BF16", header_bytes: int = 0) -> ModelShape:
    """The tensor list convert writes for a Qwen2 checkpoint of these dimensions."""
    kv = n_head_kv * (hidden // n_head)
    t = [TensorInfo("token_embd.weight", (hidden, vocab), dtype), TensorInfo("output_norm.weight", (hidden,), "F32")]
    if not tied:
        t.append(TensorInfo("output.weight", (hidden, vocab), dtype))
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [TensorInfo(p + "attn_norm.weight", (hidden,), "F32"), TensorInfo(p + "ffn_norm.weight", (hidden,), "F32"),
              TensorInfo(p + "attn_q.weight", (hidden, hidden), dtype), TensorInfo(p + "attn_q.bias", (hidden,), "F32"),
              TensorInfo(p + "attn_k.weight", (hidden, kv), dtype), TensorInfo(p + "attn_k.bias", (kv,), "F32"),
              TensorInfo(p + "attn_v.weight", (hidden, kv), dtype), TensorInfo(p + "attn_v.bias", (kv,), "F32"),
              TensorInfo(p + "attn_output.weight", (hidden, hidden), dtype),
              TensorInfo(p + "ffn_gate.weight", (hidden, ffn), dtype), TensorInfo(p + "ffn_up.weight", (hidden, ffn), dtype),
              TensorInfo(p + "ffn_down.weight", (ffn, hidden), dtype)]
    return ModelShape(n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, tensors=t, header_bytes=header_bytes)


def qwq_32b_shape() -> ModelShape:
    """QwQ-32B's tensors (from constants.QWQ_32B_DIMS), for `--list` without an input file."""
    return qwen2_shape(**constants.QWQ_32B_DIMS)


# --- llama.cpp's rules ------------------------------------------------------------------------

def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                  "ssm_conv1d", "attn_rel_b.weight", "time_mix_", "position_embd", "token_types")


def allows_quantization(t: TensorInfo) -> bool:
    ne = list(t.ne)
    while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims ignores trailing unit dimensions
        ne.pop()
    return len(ne) >= 2 and t.name.endswith("weight") and not any(k in t.name for k in _NOT_QUANTIZED)


def _layer_sort_key(name: str):
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


@dataclass
class _State:
    shape: ModelShape
    tied: bool
    n_attn_v: int
    output_type: str | None
    token_embd_type: str | None
    has_imatrix: bool
    i_attn_v: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _rule(st: _State, new: str, t: TensorInfo, f: str, cat: str) -> str:  # noqa: C901 - mirrors llama.cpp
    s = st.shape
    low = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
    if cat == "output" or (st.tied and cat == "token_embd"):
        if st.output_type:
            return st.output_type
        if f == "MXFP4_MOE" or t.ne[0] % ggml_block(new)[0] != 0:
            return "Q8_0"
        if f in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K"
        return new if new == "Q8_0" else "Q6_K"
    if f == "MXFP4_MOE":
        return "MXFP4" if len(t.ne) > 2 and t.ne[2] > 1 else "Q8_0"
    if cat == "token_embd":
        if st.token_embd_type:
            return st.token_embd_type
        if f in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if f in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        if f in ("TQ1_0", "TQ2_0"):
            return "Q4_K"
        return new
    if f in low:
        if cat == "attn_v":
            new = "Q4_K" if s.n_gqa >= 4 or s.n_expert >= 4 else ("IQ3_S" if f in ("IQ2_S", "IQ2_M") else "Q2_K")
            st.i_attn_v += 1
        elif s.n_expert == 8 and cat == "attn_k":
            new = "Q4_K"
        elif cat == "ffn_down":
            if st.i_ffn_down < s.n_layer // 8:
                new = "IQ3_S" if f in ("IQ2_S", "IQ2_M") else "Q2_K"
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if s.n_expert == 8:
                new = "Q5_K"
            elif f in ("IQ1_S", "IQ1_M"):
                new = "IQ2_XXS"
            elif f in ("IQ2_S", "IQ2_M"):
                new = "IQ3_S"
        return new
    if cat == "attn_v":
        i = st.i_attn_v
        if f == "Q2_K":
            new = "Q4_K" if s.n_gqa >= 4 else "Q3_K"
        elif f == "Q2_K_S" and s.n_gqa >= 4:
            new = "Q4_K"
        elif f == "IQ3_XXS":
            new = "Q4_K" if s.n_gqa >= 4 else ("IQ3_S" if not st.has_imatrix else "IQ3_XXS")
        elif f in ("IQ3_XS", "IQ3_S") and s.n_gqa >= 4:
            new = "Q4_K"
        elif f == "IQ3_M":
            new = "Q4_K"
        elif f == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif f == "Q3_K_L":
            new = "Q5_K"
        elif f in ("IQ4_NL", "IQ4_XS") and s.n_gqa >= 4:
            new = "Q5_K"
        elif f in ("Q4_K_M", "Q5_K_M") and _more_bits(i, st.n_attn_v):
            new = "Q6_K"
        elif f == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if s.n_expert == 8:
            new = "Q8_0"
        st.i_attn_v += 1
    elif cat == "attn_k":
        if s.n_expert == 8:
            new = "Q8_0"
        elif f == "IQ3_XS":
            new = "IQ3_XXS"
        elif f == "IQ3_XXS":
            new = "IQ2_S"
    elif cat == "attn_q":
        if f == "IQ3_XS":
            new = "IQ3_XXS"
        elif f == "IQ3_XXS":
            new = "IQ2_S"
    elif cat == "ffn_down":
        i, n = _layer_of(st, st.i_ffn_down, t.name)
        if f == "Q2_K":
            new = "Q3_K"
        elif f == "Q2_K_S":
            if i < n // 8:
                new = "Q4_K"
        elif f == "IQ3_XXS" and not st.has_imatrix:
            new = "Q4_K" if i < n // 8 else "Q3_K"
        elif f == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif f == "IQ3_M" and (i < n // 8 or (s.n_expert == 8 and _more_bits(i, n))):
            new = "Q4_K"
        elif f == "Q3_K_L":
            new = "Q5_K"
        elif f == "Q4_K_M":
            if _more_bits(i, n):
                new = "Q6_K"
        elif i < n // 8 and f in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
            new = "Q5_K"
        elif f == "Q5_K_M" and _more_bits(i, n):
            new = "Q6_K"
        elif f == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        elif f in ("Q4_0", "Q5_0") and st.has_imatrix and i < n // 8:
            new = "Q4_1" if f == "Q4_0" else "Q5_1"
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if s.n_expert == 8:
            if f in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"):
                new = "Q5_K"
        else:
            new = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(f, new)
    elif cat in ("ffn_gate", "ffn_up"):
        attr = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i, n = _layer_of(st, getattr(st, attr), t.name)
        if f == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            new = "IQ3_XXS"
        setattr(st, attr, getattr(st, attr) + 1)
    return new


def _layer_of(st: _State, counter: int, name: str) -> tuple[int, int]:
    if st.shape.n_expert > 1:  # expert tensors are not consecutive: llama.cpp parses the name
        m = re.match(r"blk\.(\d+)\.", name)
        return (int(m.group(1)) if m else counter), st.shape.n_layer
    return counter, st.shape.n_layer


_FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
             "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
             "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _fallback(t: TensorInfo, new: str) -> str:
    if t.ne[0] % ggml_block(new)[0] == 0:
        return new
    ret = _FALLBACK.get(new)
    if ret is None:
        raise QuantizeError(f"{t.name} has rows of {t.ne[0]} values, not a multiple of {new}'s block of "
                            f"{ggml_block(new)[0]}, and llama.cpp has no fallback type for {new}; choose another type")
    return ret if t.ne[0] % ggml_block(ret)[0] == 0 else "F16"


def tensor_types(shape: ModelShape, qtype: str | QuantType, *, has_imatrix: bool = False,
                 output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                 pure: bool = False) -> dict[str, str]:
    """{tensor name: ggml type name} as llama_model_quantize would choose them."""
    qt = qtype if isinstance(qtype, QuantType) else resolve_type(qtype)
    ott = output_tensor_type.upper() if output_tensor_type else None
    tet = token_embedding_type.upper() if token_embedding_type else None
    names = {t.name for t in shape.tensors}
    st = _State(shape=shape, tied="output.weight" not in names,
                n_attn_v=sum(1 for t in shape.tensors if _category(t.name) == "attn_v"),
                output_type=ott, token_embd_type=tet, has_imatrix=has_imatrix)
    out: dict[str, str] = {}
    for t in sorted(shape.tensors, key=lambda x: _layer_sort_key(x.name)):
        if not allows_quantization(t):
            out[t.name] = t.type
            continue
        cat = _category(t.name)
        if tet and cat == "token_embd":
            out[t.name] = tet
            continue
        if ott and cat == "output":
            out[t.name] = ott
            continue
        new = qt.base
        if new in _QUANTIZED_BASES:
            if not pure:
                new = _rule(st, new, t, qt.name, cat)
            new = _fallback(t, new)
        out[t.name] = new
    return out


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def predict_size(shape: ModelShape, qtype: str | QuantType, **options) -> int:
    """Bytes of the file llama_model_quantize would write for this input and type."""
    types = tensor_types(shape, qtype, **options)
    total = _pad(shape.header_bytes, shape.alignment)
    for t in shape.tensors:
        rows = math.prod(t.ne[1:]) if len(t.ne) > 1 else 1
        total += _pad(rows * ggml_row_bytes(types[t.name], t.ne[0]), shape.alignment)
    return total


def predict_sizes(source: Path | str | ModelShape | None = None, *, qtypes=None, **options) -> list[Prediction]:
    """For each type (default: all), (type, effective bpw, predicted bytes) for this input.

    `source` is a GGUF path, a ModelShape, or None for QwQ-32B's published shape.
    `has_imatrix` (default: only for the types that require one) changes a few k-quant rules.
    """
    shape = source if isinstance(source, ModelShape) else (qwq_32b_shape() if source is None else read_shape(source))
    wanted = [resolve_type(q) for q in qtypes] if qtypes else list(QUANT_TYPES)
    n = shape.n_params or 1
    has_imatrix = options.pop("has_imatrix", None)
    result = []
    for qt in wanted:
        # types that cannot be made without an imatrix are predicted as made with one
        with_im = qt.requires_imatrix if has_imatrix is None else has_imatrix
        try:
            size = predict_size(shape, qt, has_imatrix=with_im, **options)
        except QuantizeError as exc:
            result.append(Prediction(qt.name, None, None, qt.requires_imatrix, str(exc)))
            continue
        result.append(Prediction(qt.name, round(size * 8 / n, 3), size, qt.requires_imatrix))
    return result
