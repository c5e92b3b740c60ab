"""Machine facts and `qwq-local doctor` (real llama.cpp build, real psutil)."""

from __future__ import annotations

import json

import psutil
from typer.testing import CliRunner

from qwq_local import constants
from qwq_local.plan import hardware
from qwq_local.cli import app

GiB = 1024**3


def test_ram_matches_psutil():
    r = hardware.ram()
    assert r.total == psutil.virtual_memory().total
    assert 0 < r.available <= r.total


def test_build_reports_what_llama_cpp_says():
    from qwq_local.backend import binding as backend

    b = hardware.build()
    says = bool(backend.llama().llama_supports_gpu_offload())
    # Local offload needs a GPU backend; llama.cpp also says yes for a CPU build with RPC.
    assert b.gpu_offload == (says and len(b.backends) > 1)
    if b.backends == ("CPU",) and any("rpc" in name for name in b.libs):
        assert says and not b.gpu_offload
    assert b.backends[0] == "CPU"
    assert "CPU" in b.system_info
    assert any("ggml" in name for name in b.libs)
    if not b.gpu_offload:
        assert hardware.offload_memory_free() == 0


def test_nvml_library_without_the_functions_is_no_gpu(monkeypatch):
    # A libnvidia-ml.so.1 from an old driver lacks the _v2 entry points: no GPU, no traceback.
    monkeypatch.setattr(hardware.ctypes, "CDLL", lambda name: object())
    assert hardware._nvml_gpus() is None


def test_parse_nvidia_smi():
    text = "0, NVIDIA GeForce RTX 4090, 24564, 23012\n1, NVIDIA A100-SXM4-80GB, 81920, 100\nbogus line\n"
    gpus = hardware.parse_nvidia_smi(text)
    assert [(g.index, g.name, g.total, g.free) for g in gpus] == [
        (0, "NVIDIA GeForce RTX 4090", 24564 * 1024**2, 23012 * 1024**2),
        (1, "NVIDIA A100-SXM4-80GB", 81920 * 1024**2, 100 * 1024**2),
    ]


def test_metal_working_set_rule():
    assert hardware.metal_working_set(16 * GiB) == int(16 * GiB * 2 / 3)
    assert hardware.metal_working_set(64 * GiB) == int(64 * GiB * 3 / 4)


def test_recommendation_from_published_sizes():
    big = hardware.recommend_qwq(80 * GiB, offload=True)
    assert (big["quant"], big["n_ctx"]) == ("Q8_0", 32768)
    # 22 GiB: Q5_0 (22.6 GB) + 8K of KV (2 GiB) + compute does not fit; Q4_K_M (19.9 GB) does.
    mid = hardware.recommend_qwq(22 * GiB, offload=True)
    assert mid["quant"] == "Q4_K_M" and mid["n_ctx"] >= constants.DEFAULT_N_CTX
    assert mid["need_bytes"] <= 22 * GiB
    small = hardware.recommend_qwq(12 * GiB, offload=False)
    assert small["quant"] in constants.QWQ_COMMUNITY_GGUF_SIZES and not small["official"]
    assert hardware.recommend_qwq(4 * GiB, offload=False)["quant"] is None


def test_doctor_json():
    res = CliRunner().invoke(app, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    for key in ("backends", "gpu_offload", "reinstall", "ram", "gpus", "amx", "recommendation"):
        assert key in d
    assert d["ram"]["total"] == psutil.virtual_memory().total
    assert set(d["amx"]) >= {"advertised", "extra_buffer_types", "probe_reason"}
    from qwq_local.backend import binding as backend

    assert d["amx"]["advertised"] == backend.cpu_advertises_amx()
    assert d["amx"]["extra_buffer_types"] == backend.extra_bufts_allowed()
    if not d["gpu_offload"]:
        assert any("-DGGML_CUDA=on" in cmd for cmd in d["reinstall"].values()) or d["reinstall"]


def test_doctor_table():
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "llama-cpp-python" in out and "GPU offload" in out and "AMX" in out and "QwQ-32B" in out
    if not hardware.build().gpu_offload:
        assert "NOT supported" in out
        assert ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                f'llama-cpp-python=={constants.LLAMA_CPP_PYTHON_VERSION}') in out


def test_doctor_shows_the_amx_override(monkeypatch):
    monkeypatch.setenv("QWQ_LOCAL_AMX", "off")
    res = CliRunner().invoke(app, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    amx = json.loads(res.output)["amx"]
    assert amx["extra_buffer_types"] is False and amx["override"] == "QWQ_LOCAL_AMX=off"
