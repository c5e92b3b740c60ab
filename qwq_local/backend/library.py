"""Loading llama.cpp: the llama_cpp module imported once with its log routed to a ring buffer,
the build's facts (system info, version, the native library files actually loaded), and the
thread default. Everything else in backend/ reaches llama.cpp through `llama()`."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from .. import constants
from . import probe

_LOCK = threading.Lock()
_LOG: collections.deque[str] = collections.deque(maxlen=2000)
_CAPTURES: list[list[str]] = []
_LIB: dict[str, Any] = {}

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


def llama():
    """Import llama_cpp once, route its log to our buffer, initialise the backend."""
    lib = _LIB.get("lib")
    if lib is not None:
        return lib
    with _LOCK:
        if "lib" in _LIB:
            return _LIB["lib"]
        import llama_cpp

        @llama_cpp.llama_log_callback
        def _on_log(level: int, text: bytes, user_data) -> None:
            line = text.decode("utf-8", errors="replace") if text else ""
            _LOG.append(line)
            for sink in _CAPTURES:
                sink.append(line)
            if constants.debug_enabled():
                sys.stderr.write(line)

        _LIB["log_cb"] = _on_log  # a ctypes callback must outlive every call into llama.cpp
        llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _LIB["lib"] = llama_cpp
        return llama_cpp


def log_tail(lines: int = 20) -> str:
    """The last lines llama.cpp logged, for error messages."""
    text = "".join(list(_LOG)[-lines * 4:])
    return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect everything llama.cpp logs inside the block (used to read its buffer sizes)."""
    sink: list[str] = []
    _CAPTURES.append(sink)
    try:
        yield sink
    finally:
        _CAPTURES.remove(sink)


def system_info() -> str:
    return llama().llama_print_system_info().decode("utf-8", errors="replace")


def llama_cpp_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - editable builds
        return getattr(llama(), "__version__", "unknown")


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _file_of_symbol(address: int | None) -> Path | None:
    """The shared object that holds a code address (dladdr: glibc, musl and macOS have it)."""
    if not address:
        return None
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError, TypeError):  # Windows: no dladdr
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    info = _DlInfo()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return Path(os.fsdecode(info.dli_fname))


def loaded_libraries() -> list[Path]:
    """The native libraries of the llama.cpp this process runs: the files that hold libllama's
    and ggml's code (found with dladdr, so LLAMA_CPP_LIB_PATH or a system libggml count as
    they are) and every libllama*/libggml* beside them (probe.native_libraries)."""
    lib = llama()
    address = ctypes.cast(lib.llama_backend_init, ctypes.c_void_p).value
    libllama = _file_of_symbol(address)
    anchors = [libllama] if libllama else []
    if libllama:
        handle = ctypes.CDLL(str(libllama))  # the same, already loaded library: dlsym sees its dependencies
        for symbol in ("ggml_init", "ggml_backend_reg_count", "ggml_backend_cpu_reg"):
            fn = getattr(handle, symbol, None)  # ggml-base, ggml, ggml-cpu (absent in dynamic-backend builds)
            found = _file_of_symbol(ctypes.cast(fn, ctypes.c_void_p).value) if fn is not None else None
            if found:
                anchors.append(found)
    else:  # no dladdr: the package's own lib directory, where llama-cpp-python installs them
        libdir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(lib.__file__).parent / "lib")
        anchors = [p for p in libdir.glob("*") if p.is_file()] if libdir.is_dir() else []
    return probe.native_libraries(anchors)


def default_threads() -> int:
    """Physical-ish core count: llama.cpp generation slows down on hyperthreads."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil missing or unsupported platform
        n = None
    return max(1, n or os.cpu_count() or 1)
