"""Shared fixtures: tiny QwQ-shaped checkpoints and the GGUFs made from them, built once per
test session with the project's own converter and quantizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwq_local.synthetic.factory import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint converted to a bf16 GGUF."""
    from qwq_local.convert.pipeline import convert

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-bf16.gguf"
    convert(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf_f32(tmp_path_factory, tiny_checkpoint) -> Path:
    from qwq_local.convert.pipeline import convert

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-f32.gguf"
    convert(tiny_checkpoint, out, outtype="f32")
    return out


@pytest.fixture(scope="session")
def tiny_gguf_q4km(tmp_path_factory, tiny_gguf) -> Path:
    """Q4_K_M of the tiny model: the quantized case that trips llama.cpp's AMX kernel."""
    from qwq_local.quantize.quantizer import quantize

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-Q4_K_M.gguf"
    quantize(tiny_gguf, out, qtype="Q4_K_M")
    return out


@pytest.fixture(scope="session")
def k_gguf(tmp_path_factory) -> Path:
    """A tiny bf16 GGUF with 256-wide rows, so k-quants and i-quants apply without fallbacks."""
    from qwq_local.convert.pipeline import convert

    d = tmp_path_factory.mktemp("k-ckpt")
    ckpt = make_tiny_checkpoint(d / "ckpt", hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                intermediate_size=768)
    return convert(ckpt, d / "tiny256-bf16.gguf")
