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
    from qwq_local import backend

    assert d["amx"]["advertised"] == backend.cpu_advertises_amx()
    assert d["amx"]["extra_buffer_types"] == backend.extra_bufts_allowed()
    assert d["amx"]["build_key"] == backend.build_key()
    assert [lib["path"] for lib in d["amx"]["libraries"]] == [str(p) for p in backend.loaded_libraries()]
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


# --- AMX: the probe key and the no-AMX rebuild ----------------------------------------------

SAPPHIRE_RAPIDS = {"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c", "avx_vnni", "avx512f", "avx512cd", "avx512vl",
                   "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                   "amx_bf16"}


def test_no_amx_build_keeps_the_cpus_instruction_sets_and_repack():
    args = hardware.no_amx_cmake_args(SAPPHIRE_RAPIDS).split()
    # -march=native would compile the AMX kernels on this CPU whatever GGML_AMX_* say.
    assert args[:2] == ["-DGGML_NATIVE=OFF", "-DGGML_CPU_REPACK=ON"]
    for opt in ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C", "AVX_VNNI", "AVX512", "AVX512_VBMI",
                "AVX512_VNNI", "AVX512_BF16"):
        assert f"-DGGML_{opt}=ON" in args
    for opt in ("AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{opt}=OFF" in args
    # AVX-512 in llama.cpp's sense needs all five of F, CD, VL, DQ, BW (it passes -mavx512* for each).
    partial = hardware.no_amx_cmake_args(SAPPHIRE_RAPIDS - {"avx512bw"}).split()
    assert "-DGGML_AVX512=OFF" in partial and "-DGGML_AVX2=ON" in partial
    assert "-DGGML_CUDA=on" in hardware.no_amx_cmake_args(SAPPHIRE_RAPIDS, ("CPU", "CUDA")).split()
    cmd = hardware.no_amx_reinstall(SAPPHIRE_RAPIDS)
    assert cmd.startswith('CMAKE_ARGS="-DGGML_NATIVE=OFF ') and cmd.endswith(
        f'" pip install --force-reinstall --no-cache-dir llama-cpp-python=={constants.LLAMA_CPP_PYTHON_VERSION}')


def test_doctor_prints_the_no_amx_rebuild_when_the_probe_failed(monkeypatch, tmp_path):
    """A real failing probe child for this build (it dies by SIGSEGV, as the AMX kernel does)
    makes doctor print the verdict, the build key and the exact rebuild command."""
    import sys

    from qwq_local.backend import binding as backend

    monkeypatch.setenv(constants.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(constants.ENV_AMX, raising=False)
    monkeypatch.setitem(backend._STATE, "extra_bufts", None)
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    assert backend.extra_bufts_allowed(command=crash) is False  # stored under this build's key
    res = CliRunner().invoke(app, ["doctor", "--json"])
    amx = json.loads(res.output)["amx"]
    assert amx["extra_buffer_types"] is False and amx["probe_ok"] is False and "SIGSEGV" in amx["probe_reason"]
    from qwq_local.backend.probe import cpu_flags

    expected = hardware.no_amx_reinstall(cpu_flags(), hardware.build().backends)
    assert amx["reinstall_without_amx"] == expected
    table = CliRunner().invoke(app, ["doctor"]).output
    assert f"probe key {backend.build_key()}:" in table
    assert "    " + expected in table.splitlines()


def test_doctor_prints_no_rebuild_when_the_probe_passed(monkeypatch, tmp_path):
    import sys

    from qwq_local.backend import binding as backend

    monkeypatch.setenv(constants.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(constants.ENV_AMX, raising=False)
    monkeypatch.setitem(backend._STATE, "extra_bufts", None)
    assert backend.extra_bufts_allowed(command=[sys.executable, "-c", "print('probe-ok')"]) is True
    amx = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).output)["amx"]
    assert amx["probe_ok"] is True and amx["reinstall_without_amx"] is None
    assert "GGML_NATIVE=OFF" not in CliRunner().invoke(app, ["doctor"]).output
