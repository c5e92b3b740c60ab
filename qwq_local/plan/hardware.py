"""Facts about this machine that decide what fits: RAM, GPUs and their free memory, what this
llama-cpp-python was built with, and the AMX / extra-buffer-type status.

GPU memory: NVIDIA through NVML (libnvidia-ml.so.1 via ctypes), else `nvidia-smi`; Apple
Silicon through unified memory (`sysctl hw.memsize`) times Metal's usual working-set share
(constants.METAL_WORKING_SET_SHARE_*: ~2/3 below 36 GB, ~3/4 above; Metal's own
recommendedMaxWorkingSetSize is not reachable without Objective-C bindings).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import constants
from ..backend.rope import rope_params, rope_rule
from ..errors import UsageError


@dataclass(frozen=True)
class Ram:
    total: int
    available: int


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    backend: str  # "cuda" | "metal"
    total: int
    free: int
    source: str  # "nvml" | "nvidia-smi" | "sysctl"


@dataclass(frozen=True)
class Build:
    gpu_offload: bool
    backends: tuple[str, ...]  # e.g. ("CPU",) or ("CPU", "CUDA")
    system_info: str
    libs: tuple[str, ...]
    llama_cpp_version: str


def ram() -> Ram:
    import psutil

    vm = psutil.virtual_memory()
    return Ram(total=int(vm.total), available=int(vm.available))


def _nvml_gpus() -> list[Gpu] | None:
    try:
        return _nvml_query(ctypes.CDLL("libnvidia-ml.so.1"))
    except (OSError, AttributeError):  # no NVML, or one too old to have these functions
        return None


def _nvml_query(nvml) -> list[Gpu] | None:
    class _Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        gpus = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
                continue
            mem = _Memory()
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
                continue
            name = ctypes.create_string_buffer(96)
            nvml.nvmlDeviceGetName(handle, name, 96)
            gpus.append(Gpu(i, name.value.decode(errors="replace"), "cuda", int(mem.total), int(mem.free), "nvml"))
        return gpus
    finally:
        nvml.nvmlShutdown()


def _smi_gpus() -> list[Gpu] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return parse_nvidia_smi(out.stdout)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `index, name, total MiB, free MiB` (nvidia-smi's csv,noheader,nounits)."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit():
            continue
        try:
            total, free = int(float(parts[2]) * 1024**2), int(float(parts[3]) * 1024**2)
        except ValueError:
            continue
        gpus.append(Gpu(int(parts[0]), parts[1], "cuda", total, free, "nvidia-smi"))
    return gpus


def metal_working_set(memsize: int) -> int:
    share = (constants.METAL_WORKING_SET_SHARE_LARGE if memsize >= constants.METAL_LARGE_MEMORY_BYTES
             else constants.METAL_WORKING_SET_SHARE_SMALL)
    return int(memsize * share)


def unified_memory() -> bool:
    """Apple Silicon: GPU and CPU share one memory, so a plan's GPU bytes also come out of RAM."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _metal_gpus() -> list[Gpu] | None:
    if not unified_memory():
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=10)
        memsize = int(out.stdout.strip())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    working = metal_working_set(memsize)
    # Unified memory: what the GPU may use is also what the OS has free.
    free = min(working, ram().available)
    return [Gpu(0, "Apple GPU (unified memory)", "metal", working, free, "sysctl")]


def gpus() -> list[Gpu]:
    """GPUs visible to this machine (whether or not llama.cpp can use them: see build())."""
    for probe in (_nvml_gpus, _smi_gpus, _metal_gpus):
        found = probe()
        if found:
            return found
    return []


def build() -> Build:
    """What this llama-cpp-python can do, from llama.cpp itself and its shipped libraries."""
    from ..backend import binding as backend

    lib = backend.llama()
    info = backend.system_info()
    libdir = Path(lib.__file__).parent / "lib"
    libs = tuple(sorted(p.name for p in libdir.glob("*ggml*")) if libdir.is_dir() else ())
    joined = " ".join(libs).lower() + " " + info.lower()
    backends = ["CPU"]
    for name in ("CUDA", "Metal", "Vulkan", "HIP", "SYCL"):
        if name.lower() in joined:
            backends.append(name)
    # llama_supports_gpu_offload() is also true for a CPU build with the RPC backend (remote
    # devices); local GPU offload needs a GPU backend in this build as well.
    offload = bool(lib.llama_supports_gpu_offload()) and len(backends) > 1
    return Build(gpu_offload=offload, backends=tuple(backends),
                 system_info=info.strip(), libs=libs, llama_cpp_version=backend.llama_cpp_version())


def offload_memory_free() -> int:
    """Free bytes on the device llama.cpp would offload to (the first GPU), 0 if it cannot."""
    if not build().gpu_offload:
        return 0
    found = gpus()
    return found[0].free if found else 0


def amx_status(*, probe: bool = True) -> dict:
    """AMX advertised by the CPU, whether extra buffer types are on, the probe's verdict for this
    build and its key (the loaded libllama*/libggml* files), and, when the probe failed, the
    reinstall command that keeps the repack kernels without AMX."""
    from ..backend import binding as backend
    from ..backend.probe import cpu_advertises_amx, cpu_flags

    # Probe first (it writes the record on a first run), then read why it decided so.
    allowed = backend.extra_bufts_allowed() if probe else None
    record = backend.probe_record()
    libs = record.get("libraries") or [{"path": str(p)} for p in backend.loaded_libraries()]
    failed = record.get("ok") is False
    return {
        "advertised": cpu_advertises_amx(),
        "extra_buffer_types": allowed,
        "override": f"{constants.ENV_AMX}={os.environ[constants.ENV_AMX]}" if os.environ.get(constants.ENV_AMX) else None,
        "probe_ok": record.get("ok"),
        "probe_reason": record.get("reason"),
        "build_key": record["key"],
        "libraries": libs,
        "reinstall_without_amx": no_amx_reinstall(cpu_flags(), build().backends) if failed else None,
    }


REINSTALL = {
    name: f'CMAKE_ARGS="-DGGML_{flag}=on" pip install --force-reinstall --no-cache-dir '
          f'llama-cpp-python=={constants.LLAMA_CPP_PYTHON_VERSION}'
    for name, flag in (("CUDA", "CUDA"), ("Metal", "METAL"), ("Vulkan", "VULKAN"))
}


def no_amx_cmake_args(flags: frozenset[str] | set[str], backends: tuple[str, ...] = ("CPU",)) -> str:
    """CMAKE_ARGS for a llama.cpp build with this CPU's instruction sets and the repack kernels,
    but no AMX kernels. GGML_NATIVE must be OFF: -march=native on an AMX CPU compiles the AMX
    kernels whatever GGML_AMX_* say (vendor/llama.cpp/ggml/src/ggml-cpu/CMakeLists.txt); each
    GGML_<ISA> option is set from the CPU flags it needs (constants.GGML_X86_ISA_OPTIONS).
    GPU backends of the current build are kept."""
    args = ["-DGGML_NATIVE=OFF", "-DGGML_CPU_REPACK=ON"]
    for option, needs in constants.GGML_X86_ISA_OPTIONS:
        args.append(f"-DGGML_{option}={'ON' if all(f in flags for f in needs) else 'OFF'}")
    args += [f"-DGGML_{option}=OFF" for option in constants.GGML_AMX_OPTIONS]
    args += [f"-DGGML_{name.upper()}=on" for name in backends if name in ("CUDA", "Metal", "Vulkan")]
    return " ".join(args)


def no_amx_reinstall(flags: frozenset[str] | set[str], backends: tuple[str, ...] = ("CPU",)) -> str:
    """The pip command for no_amx_cmake_args. --no-cache-dir: pip's wheel cache ignores
    CMAKE_ARGS and would reinstall the cached (AMX) wheel; --force-reinstall: same version."""
    return (f'CMAKE_ARGS="{no_amx_cmake_args(flags, backends)}" pip install --force-reinstall --no-cache-dir '
            f'llama-cpp-python=={constants.LLAMA_CPP_PYTHON_VERSION}')


def recommend_qwq(budget: int, *, offload: bool) -> dict:
    """The best published QwQ-32B quant and the largest context (32K..4K) that fit `budget`
    bytes, from the published sizes and 256 KiB of f16 KV per token (+ ~0.5 GiB compute)."""
    compute = 512 * 1024 * 1024
    kv = constants.QWQ_KV_BYTES_PER_TOKEN_F16
    sizes = sorted({**constants.QWQ_GGUF_SIZES, **constants.QWQ_COMMUNITY_GGUF_SIZES}.items(), key=lambda x: -x[1])
    for min_ctx in (constants.DEFAULT_N_CTX, constants.PLAN_MIN_CTX):
        for quant, size in sizes:
            for ctx in (constants.NATIVE_CONTEXT, 16384, 8192, 4096):
                if ctx < min_ctx:
                    break
                need = size + kv * ctx + compute
                if need <= budget:
                    official = quant in constants.QWQ_GGUF_SIZES
                    return {"quant": quant, "n_ctx": ctx, "size_bytes": size, "need_bytes": need,
                            "budget_bytes": budget, "official": official,
                            "where": "GPU" if offload else "RAM",
                            "pull": f"qwq-local pull --quant {quant}" + ("" if official else " --repo <community repo>")}
    return {"quant": None, "n_ctx": None, "budget_bytes": budget, "where": "GPU" if offload else "RAM",
            "need_bytes": sizes[-1][1] + kv * 4096 + compute}


def report(*, probe: bool = True) -> dict:
    """Everything `qwq-local doctor` shows, as data."""
    b = build()
    r = ram()
    found = gpus()
    missing = []
    if not b.gpu_offload:
        if any(g.backend == "cuda" for g in found):
            missing.append("CUDA")
        elif any(g.backend == "metal" for g in found) or platform.system() == "Darwin":
            missing.append("Metal")
        else:  # no GPU seen: every way to get one, for the user who has it
            missing.extend(REINSTALL)
    usable_gpu = found[0].free - constants.PLAN_VRAM_MARGIN_BYTES if (b.gpu_offload and found) else 0
    ram_budget = r.available - constants.PLAN_RAM_MARGIN_BYTES
    if usable_gpu > 0:
        rec = recommend_qwq(usable_gpu, offload=True)
        if rec["quant"] is None or rec["n_ctx"] < constants.DEFAULT_N_CTX:
            # Partial offload: VRAM and RAM together.
            rec = recommend_qwq(usable_gpu + ram_budget, offload=False)
            rec["where"] = "GPU + RAM (partial offload: gpu_layers auto)"
    else:
        rec = recommend_qwq(ram_budget, offload=False)
    if rec["n_ctx"]:
        rec["rope"] = rope_params(rec["n_ctx"])
    return {
        "llama_cpp_python": b.llama_cpp_version,
        "backends": list(b.backends),
        "gpu_offload": b.gpu_offload,
        "reinstall": {name: REINSTALL[name] for name in missing},
        "system_info": b.system_info,
        "libs": list(b.libs),
        "ram": asdict(r),
        "gpus": [asdict(g) for g in found],
        "amx": amx_status(probe=probe),
        "rope": {"rule": rope_rule(), "default_ctx": rope_params(constants.DEFAULT_N_CTX),
                 "max_ctx": rope_params(constants.MAX_CONTEXT)},
        "rpc": rpc_status(),
        "recommendation": rec,
    }


def rpc_status() -> dict:
    """Whether this llama.cpp build has the RPC backend (`--rpc`, `worker`), and the command
    that rebuilds it with RPC when it does not."""
    from ..backend.rpc import has_rpc

    ok = has_rpc()
    return {"available": ok, "fix": None if ok else constants.RPC_INSTALL_FIX}


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'24G', '8GiB', '512M', '1.5T', '1000000' -> bytes. K/M/G/T and KiB/MiB/GiB/TiB are
    binary (as nvidia-smi and llama.cpp count); KB/MB/GB/TB are decimal."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"cannot read {text!r} as a size; write it like 24G, 8GiB or 512M")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = " kmgt".index(unit) if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base**power)

