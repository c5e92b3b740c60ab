"""The extra-buffer-type (AMX/repack) probe's bookkeeping, without llama.cpp: which native
libraries make up a build, the key a verdict is stored under, the record file, the CPU facts,
and how a probe child ended. binding.py loads llama.cpp, finds the loaded libraries and runs
the child (`python -m qwq_local.backend --probe-extra-bufts DIR`).

Why per build: two builds of the same llama-cpp-python version differ exactly where the probe
matters. One compiled with -march=native on an AMX CPU has llama.cpp's AMX kernels (ggml-cpu's
amx/ is compiled only when the compiler defines __AMX_INT8__); a portable one has only the
AVX2/AVX-512 repack kernels. A verdict from one build applied to the other either crashed
(`Segmentation fault` on the first prompt) or left CPU_REPACK off for nothing. So the key is the
loaded libraries themselves (real path, size, mtime_ns of libllama* and every libggml*), plus
the llama-cpp-python version and the CPU; a reinstall or rebuild changes it and the next load
probes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable, Sequence

from .. import constants
from ..fileutil import read_json_record, write_json_record


# ---------------------------------------------------------------------------------------------
# The CPU
# ---------------------------------------------------------------------------------------------

def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return model + "|" + hashlib.sha256(flags.encode()).hexdigest()[:16]


def cpu_advertises_amx() -> bool:
    return "amx_tile" in cpu_flags()


# ---------------------------------------------------------------------------------------------
# The build: native libraries and the key
# ---------------------------------------------------------------------------------------------

def _is_build_library(name: str) -> bool:
    stem = name[3:] if name.startswith("lib") else name
    return stem.startswith(("llama", "ggml")) and any(s in name for s in (".so", ".dylib", ".dll"))


def native_libraries(anchors: Iterable[Path | str]) -> list[Path]:
    """The files of a llama.cpp build: each anchor (a library the process has loaded) and every
    libllama*/libggml* beside it (backends a GGML_BACKEND_DL build loads later live there too),
    symlinks resolved, sorted. Missing anchors are skipped."""
    found: set[Path] = set()
    for anchor in anchors:
        anchor = Path(anchor)
        if not anchor.is_file():
            continue
        found.add(anchor.resolve())
        for sibling in anchor.parent.iterdir():
            if _is_build_library(sibling.name) and sibling.is_file():
                found.add(sibling.resolve())
    return sorted(found)


def library_fingerprint(libraries: Sequence[Path | str]) -> list[dict]:
    """[{"path", "size", "mtime_ns"}] per library: cheap (no hashing of a 500 MB CUDA library),
    and any reinstall or rebuild rewrites the files, which changes mtime_ns."""
    out = []
    for lib in libraries:
        st = Path(lib).stat()
        out.append({"path": str(lib), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def probe_key(libraries: Sequence[Path | str], *, version: str, cpu: str | None = None) -> str:
    """The record key: a sha256 (16 hex digits) over the library fingerprints, the
    llama-cpp-python version and the CPU identity."""
    blob = json.dumps({"libraries": library_fingerprint(libraries), "version": version,
                       "cpu": cpu_identity() if cpu is None else cpu}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Records: one verdict per key, in one small JSON file under cache_dir()
# ---------------------------------------------------------------------------------------------

def record_path() -> Path:
    return constants.cache_dir() / constants.PROBE_RECORD_FILE


def probe_records() -> dict[str, dict]:
    """Every stored verdict, by key ({} before the first probe or after damage)."""
    records = read_json_record(record_path()).get("records")
    if not isinstance(records, dict):
        return {}
    return {k: v for k, v in records.items() if isinstance(v, dict) and isinstance(v.get("ok"), bool)}


def store_probe_record(key: str, record: dict) -> dict:
    """Add (or replace) the verdict for `key`, keeping the newest PROBE_RECORD_MAX."""
    record = {**record, "key": key, "probed_at": time.time()}
    records = probe_records()
    records[key] = record
    newest = sorted(records.items(), key=lambda kv: kv[1].get("probed_at", 0), reverse=True)
    write_json_record(record_path(), {"records": dict(newest[:constants.PROBE_RECORD_MAX])})
    return record


# ---------------------------------------------------------------------------------------------
# The probe child
# ---------------------------------------------------------------------------------------------

def run_probe(command: Sequence[str], *, timeout: float = constants.PROBE_TIMEOUT_S) -> dict:
    """Run a probe child and classify how it ended: {"ok", "reason"}. The child prints
    "probe-ok" after decoding quantized batches with extra buffer types; a signal (SIGSEGV,
    SIGILL from the AMX kernel), another exit or a timeout means "not safe"."""
    try:
        proc = subprocess.run(list(command), capture_output=True, timeout=timeout, text=True,
                              env={**os.environ, constants.ENV_AMX: ""})
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"probe timed out after {timeout:.0f}s"}
    if proc.returncode == 0 and "probe-ok" in proc.stdout:
        return {"ok": True, "reason": "quantized batch decoded with extra buffer types"}
    if proc.returncode < 0:
        sig = -proc.returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return {"ok": False, "reason": f"probe child killed by {name} (llama.cpp's AMX/repack kernel faults here)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "reason": f"probe child exited {proc.returncode}: {' | '.join(tail)}"}
