"""The rope in effect, through the command line: `run --json`, `bench`, `plan`, `info` and
`doctor` show the model card's rule (no scaling at --ctx <= 8192, static YaRN x4 over 32768
above) and --rope-scaling overrides it; llama.cpp's own log is the witness of what it applied."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from qwq_local.backend import binding as backend
from qwq_local.cli import app

runner = CliRunner()
YARN = {"choice": "auto", "scaling": "yarn", "factor": 4.0, "freq_scale": 0.25, "orig_ctx": 32768}
NONE = {"choice": "auto", "scaling": "none", "factor": 1.0, "freq_scale": 1.0, "orig_ctx": None}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("ctx,extra,rope,freq_scale", [
    (8192, [], NONE, "1"), (8448, [], YARN, "0.25"),
    (16384, ["--rope-scaling", "none"], {**NONE, "choice": "none"}, "1"),
    (1024, ["--rope-scaling", "YARN"], {**YARN, "choice": "yarn"}, "0.25")])
def test_run_json_shows_the_rope_llama_cpp_applied(tiny_gguf, ctx, extra, rope, freq_scale):
    with backend.capture_log() as log:
        result = invoke("run", "-m", tiny_gguf, "hi", "--ctx", ctx, "--gpu-layers", "0", "--max-tokens", "2",
                        "--seed", "1", "--json", *extra)
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["n_ctx"] == ctx and model["rope"] == rope
    assert re.findall(r"llama_context: freq_scale\s+=\s+(\S+)", "".join(log)) == [freq_scale]


def test_unknown_rope_choice_is_a_usage_error(tiny_gguf):
    result = invoke("run", "-m", tiny_gguf, "hi", "--rope-scaling", "dynamic", "--gpu-layers", "0")
    assert result.exit_code == 2
    assert "rope_scaling must be one of auto, none, yarn, not 'dynamic'" in result.output


def test_bench_shows_the_rope(tiny_gguf):
    args = ["bench", "-m", tiny_gguf, "--prompt-tokens", "16", "--gen-tokens", "4", "--gpu-layers", "0"]
    data = json.loads(invoke(*args, "--json").stdout)
    assert data["rope"] == NONE  # bench's context is prompt + gen + 16 tokens
    table = invoke(*args, "--rope-scaling", "yarn").stdout
    assert "rope YaRN x4 (orig ctx 32768) [--rope-scaling yarn]" in table


@pytest.mark.parametrize("ctx,extra,scaling", [("8192", [], "none"), ("16384", [], "yarn"),
                                               ("16384", ["--rope-scaling", "none"], "none")])
def test_plan_shows_the_rope(tiny_gguf, ctx, extra, scaling):
    res = invoke("plan", "-m", tiny_gguf, "--ctx", ctx, "--vram", "0", "--json", *extra)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rope"]["scaling"] == scaling
    table = invoke("plan", "-m", tiny_gguf, "--ctx", ctx, "--vram", "0", *extra).stdout
    line = next(ln for ln in table.splitlines() if ln.startswith("rope"))
    assert ("YaRN x4 (orig ctx 32768)" in line) == (scaling == "yarn")


def test_plan_memory_does_not_depend_on_the_rope(tiny_gguf):
    from qwq_local.plan.memory import plan

    yarn = plan(tiny_gguf, n_ctx=4096, vram=0, ram=1 << 40, rope_scaling="yarn").to_dict()
    none = plan(tiny_gguf, n_ctx=4096, vram=0, ram=1 << 40).to_dict()
    assert yarn.pop("rope")["scaling"] == "yarn" and none.pop("rope")["scaling"] == "none"
    assert yarn == none


def test_plan_shortened_by_auto_fit_reports_the_rope_of_the_shortened_context(tiny_gguf):
    from qwq_local.plan.memory import plan

    at_8192 = plan(tiny_gguf, n_ctx=8192, vram=0, ram=1 << 40).total("cpu")
    from qwq_local import constants

    p = plan(tiny_gguf, n_ctx=16384, gpu_layers="auto", vram=0, ram=at_8192 + constants.PLAN_RAM_MARGIN_BYTES)
    assert p.n_ctx <= 8192 and p.rope["scaling"] == "none"


def test_info_shows_the_files_rope_and_the_rule(tmp_path, tiny_gguf):
    import gguf
    from gguf_craft import write_tiny_qwen2

    T = gguf.GGUFValueType
    path = write_tiny_qwen2(tmp_path / "yarn-meta.gguf", extra={
        "qwen2.rope.scaling.type": ("yarn", T.STRING), "qwen2.rope.scaling.factor": (4.0, T.FLOAT32),
        "qwen2.rope.scaling.original_context_length": (32768, T.UINT32)})
    rope = json.loads(invoke("info", path, "--json").stdout)["rope"]
    assert rope["gguf"] == {"scaling": "yarn", "factor": 4.0, "orig_ctx": 32768}
    assert rope["at_default_ctx"]["scaling"] == "none" and rope["at_max_ctx"] == YARN
    plain = json.loads(invoke("info", tiny_gguf, "--json").stdout)["rope"]
    assert plain["gguf"] is None
    table = invoke("info", path).stdout
    assert "rope (file)     yarn x4.0 (orig ctx 32768), not used as such" in table
    assert "rope (applied)  none at n_ctx <= 8192, static YaRN x4 (orig ctx 32768) above" in table


def test_doctor_shows_the_rope_rule():
    data = json.loads(invoke("doctor", "--json").stdout)
    assert data["rope"]["default_ctx"] == NONE and data["rope"]["max_ctx"] == YARN
    rec = data["recommendation"]
    if rec["quant"]:
        assert rec["rope"]["scaling"] == ("yarn" if rec["n_ctx"] > 8192 else "none")
    assert "rope              none at n_ctx <= 8192, static YaRN x4 (orig ctx 32768) above" in invoke("doctor").stdout
