"""The README's main job: `qwq-local demo` runs the whole pipeline offline."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qwq_local.cli import app
from qwq_local.gguf.check import inspect_gguf


def test_demo_runs_every_stage(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--max-tokens", "24"])
    assert result.exit_code == 0, result.output
    for stage in ("checkpoint", "convert", "quantize", "load", "chat"):
        assert f"[{stage:>10}]" in result.output
    assert "answer:" in result.output and "thinking (" in result.output
    # The files the demo leaves behind are the real pipeline's outputs.
    ckpt = tmp_path / "tiny-qwq-checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert inspect_gguf(tmp_path / "tiny-qwq-bf16.gguf").quant == "BF16"
    assert inspect_gguf(tmp_path / "tiny-qwq-Q4_K_M.gguf").quant == "Q4_K_M"
