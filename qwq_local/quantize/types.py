"""llama.cpp's quantization types (file types, "ftypes") by their usual names.

The table mirrors llama-quantize's own list (tools/quantize/quantize.cpp, QUANT_OPTIONS) for the
llama.cpp bundled with llama-cpp-python; `ftype` values are the LLAMA_FTYPE_* constants of
llama_cpp.py (tests check every one). Left out on purpose: NVFP4 (this build's quantizer
rejects it: "invalid output file type") and Q2_0 (the gguf Python package cannot describe its
tensors, so sizes could not be predicted or files inspected).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import QuantizeError

# Why llama.cpp refuses these without an importance matrix (llama-quantize's own wording).
IMATRIX_REASON = (
    "{name} stores most weights in 1-3 bits; without an importance matrix llama.cpp's quantizer "
    "refuses it (\"this quantization requires an imatrix\") because the result would be garbage. "
    "Pass --imatrix FILE (made by llama-imatrix on representative text), or pick a type such "
    "as Q3_K_M, IQ3_S or Q4_K_M that works without one"
)


@dataclass(frozen=True)
class QuantType:
    name: str            # llama-quantize's spelling
    ftype: int           # LLAMA_FTYPE_* value
    base: str            # ggml type most weights get (llama_ftype_get_default_type)
    requires_imatrix: bool
    listed: str          # llama-quantize's description (bpw, or size/ppl @ a reference model)

    @property
    def bpw(self) -> float:
        """Nominal bits per weight of the base ggml type (mixes add a little: see predict)."""
        return ggml_type_bpw(self.base)


def _t(name, ftype, base, listed, imatrix=False):
    return QuantType(name, ftype, base, imatrix, listed)


QUANT_TYPES: tuple[QuantType, ...] = (
    _t("F32", 0, "F32", "26.00G @ 7B"),
    _t("BF16", 32, "BF16", "14.00G, -0.0050 ppl @ Mistral-7B"),
    _t("F16", 1, "F16", "14.00G, +0.0020 ppl @ Mistral-7B"),
    _t("Q8_0", 7, "Q8_0", " 7.96G, +0.0026 ppl @ Llama-3-8B"),
    _t("Q6_K", 18, "Q6_K", " 6.14G, +0.0217 ppl @ Llama-3-8B"),
    _t("Q5_K_M", 17, "Q5_K", " 5.33G, +0.0569 ppl @ Llama-3-8B"),
    _t("Q5_K_S", 16, "Q5_K", " 5.21G, +0.1049 ppl @ Llama-3-8B"),
    _t("Q5_1", 9, "Q5_1", " 5.65G, +0.1062 ppl @ Llama-3-8B"),
    _t("Q5_0", 8, "Q5_0", " 5.21G, +0.1316 ppl @ Llama-3-8B"),
    _t("Q4_K_M", 15, "Q4_K", " 4.58G, +0.1754 ppl @ Llama-3-8B"),
    _t("Q4_K_S", 14, "Q4_K", " 4.37G, +0.2689 ppl @ Llama-3-8B"),
    _t("Q4_1", 3, "Q4_1", " 4.78G, +0.4511 ppl @ Llama-3-8B"),
    _t("Q4_0", 2, "Q4_0", " 4.34G, +0.4685 ppl @ Llama-3-8B"),
    _t("MXFP4_MOE", 38, "MXFP4", "MXFP4 for MoE experts, Q8_0 elsewhere"),
    _t("IQ4_NL", 25, "IQ4_NL", "4.50 bpw non-linear quantization"),
    _t("IQ4_XS", 30, "IQ4_XS", "4.25 bpw non-linear quantization"),
    _t("Q3_K_L", 13, "Q3_K", " 4.03G, +0.5562 ppl @ Llama-3-8B"),
    _t("Q3_K_M", 12, "Q3_K", " 3.74G, +0.6569 ppl @ Llama-3-8B"),
    _t("Q3_K_S", 11, "Q3_K", " 3.41G, +1.6321 ppl @ Llama-3-8B"),
    _t("IQ3_M", 27, "IQ3_S", "3.66 bpw quantization mix"),
    _t("IQ3_S", 26, "IQ3_S", "3.44 bpw quantization"),
    _t("IQ3_XS", 22, "IQ3_S", "3.3 bpw quantization", imatrix=True),
    _t("IQ3_XXS", 23, "IQ3_XXS", "3.06 bpw quantization", imatrix=True),
    _t("Q2_K", 10, "Q2_K", " 2.96G, +3.5199 ppl @ Llama-3-8B"),
    _t("Q2_K_S", 21, "Q2_K", " 2.96G, +3.1836 ppl @ Llama-3-8B", imatrix=True),
    _t("IQ2_M", 29, "IQ2_S", "2.7  bpw quantization", imatrix=True),
    _t("IQ2_S", 28, "IQ2_XS", "2.5  bpw quantization", imatrix=True),
    _t("IQ2_XS", 20, "IQ2_XS", "2.31 bpw quantization", imatrix=True),
    _t("IQ2_XXS", 19, "IQ2_XXS", "2.06 bpw quantization", imatrix=True),
    _t("TQ2_0", 37, "TQ2_0", "2.06 bpw ternarization"),
    _t("TQ1_0", 36, "TQ1_0", "1.69 bpw ternarization"),
    _t("IQ1_M", 31, "IQ1_M", "1.75 bpw quantization", imatrix=True),
    _t("IQ1_S", 24, "IQ1_S", "1.56 bpw quantization", imatrix=True),
    _t("Q1_0", 40, "Q1_0", "1.125 bpw quantization"),
)

# llama-quantize's aliases.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

_BY_NAME = {t.name: t for t in QUANT_TYPES}


def type_names() -> list[str]:
    return [t.name for t in QUANT_TYPES]


def resolve_type(name: str) -> QuantType:
    """A QuantType by name, case-insensitively (llama-quantize's aliases included)."""
    key = str(name).strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    found = _BY_NAME.get(key)
    if found is None:
        raise QuantizeError(f"unknown quantization type {name!r}; valid types: {', '.join(type_names())}")
    return found


# --- ggml tensor types (for --output-tensor-type / --token-embedding-type and size arithmetic) -

def _ggml():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGMLQuantizationType, GGML_QUANT_SIZES


def ggml_type_id(name: str) -> int:
    """The ggml type number of a tensor type name (q6_k, Q8_0, f16...), case-insensitively."""
    types, _ = _ggml()
    try:
        return int(types[str(name).strip().upper()])
    except KeyError:
        valid = ", ".join(t.name for t in types if t.name not in {"Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"})
        raise QuantizeError(f"unknown tensor type {name!r}; valid tensor types: {valid}") from None


def ggml_type_name(type_id: int) -> str:
    types, _ = _ggml()
    return types(int(type_id)).name


def ggml_block(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    types, sizes = _ggml()
    return sizes[types[name]]


def ggml_type_bpw(name: str) -> float:
    block, size = ggml_block(name)
    return size * 8 / block


def ggml_row_bytes(name: str, ne0: int) -> int:
    block, size = ggml_block(name)
    return size * (int(ne0) // block)
