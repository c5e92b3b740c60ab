"""GGUF -> smaller GGUF and what it costs: llama.cpp's quant types and their size predicted
from the header, importance matrices, `llama_model_quantize`, the quality report against a
reference (KL divergence, top-1, perplexity) with its plot, and the release pipeline.
"""

from __future__ import annotations

from .quantizer import quantize, plan_quantize, QuantizeResult, QuantizePlan
from .predict import predict_size, predict_sizes
from .types import QuantType, resolve_type, type_names
from .imatrix import Imatrix, read_imatrix
from .evaluate import evaluate, EvalResult
from .release import build_release

__all__ = ["quantize", "plan_quantize", "QuantizeResult", "QuantizePlan", "predict_size", "predict_sizes", "QuantType", "resolve_type", "type_names", "Imatrix", "read_imatrix", "evaluate", "EvalResult", "build_release"]
