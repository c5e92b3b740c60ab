"""Prove a GGUF loads before the caller's process loads it.

llama.cpp reports most bad files by returning NULL, but some it meets with an assertion that
calls abort(), which no Python code can catch. So the first time a file is seen, after our own
checks (check.inspect_gguf) pass, a child process loads it exactly as far as llama.cpp's
model loader goes (hyperparameters, vocabulary, every tensor's name, shape and file range)
without reading the weights (`no_alloc`), and builds a small context on it (the graph builder
asserts on hyperparameters the loader accepts). The result is recorded in
`cache_dir()/validated.json`, keyed by the resolved path, size, mtime, a hash of the header
region and the llama-cpp-python version, so later loads skip the child.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants
from ..errors import BadModelFileError, RuntimeLoadError
from ..fileutil import read_json_record, sha256_file, write_json_record
from .check import GGUFInfo, inspect_gguf

if TYPE_CHECKING:
    from ..backend.binding import Model

# How many child loads this process has started (lets tests observe the cache working).
child_loads = 0
_OK_MARK = "qwq-local-load-ok"
_NULL_MARK = "llama_model_load_from_file returned NULL"
# Part of every record's key: files passed by an earlier, weaker child check are checked again.
_CHECK_REVISION = "load+context"
_SOURCE_PATH = re.compile(r"\S*/([\w.-]+\.(?:cpp|c|h):\d+)")


def ensure_loadable(path: Path | str, *, timeout_s: float | None = None) -> GGUFInfo:
    """Validate `path` with our checks, then (first time only) load it in a child process.

    Raises BadModelFileError (one line, ending with llama.cpp's own complaint) if either fails;
    returns the file's GGUFInfo otherwise.
    """
    path = Path(path).resolve()
    info = inspect_gguf(path)
    key = record_key(path, info)
    if key in _read_records():
        return info
    load_in_child(path, timeout_s=timeout_s)
    _add_record(key, path)
    return info


def is_validated(path: Path | str, info: GGUFInfo | None = None) -> bool:
    """Whether this exact file (same size, mtime and header) already passed a child load."""
    path = Path(path).resolve()
    info = info or inspect_gguf(path)
    return record_key(path, info) in _read_records()


def header_sha256(path: Path, data_offset: int) -> str:
    """sha256 of bytes [0, data_offset): every key/value and tensor description."""
    return sha256_file(path, limit=data_offset)


def record_key(path: Path, info: GGUFInfo) -> str:
    from ..backend.binding import llama_cpp_version

    st = path.stat()
    return "|".join((str(path), str(st.st_size), str(st.st_mtime_ns),
                     header_sha256(path, info.data_offset), llama_cpp_version(), _CHECK_REVISION))


def _records_path() -> Path:
    return constants.cache_dir() / constants.VALIDATED_RECORD_FILE


def _read_records() -> dict:
    records = read_json_record(_records_path()).get("records")
    return records if isinstance(records, dict) else {}


def _add_record(key: str, path: Path) -> None:
    records = _read_records()
    records[key] = {"path": str(path), "checked_at": time.time()}
    newest = sorted(records.items(), key=lambda kv: kv[1].get("checked_at", 0) if isinstance(kv[1], dict) else 0)
    records = dict(newest[-constants.VALIDATED_RECORD_MAX:])
    try:
        write_json_record(_records_path(), {"records": records})
    except OSError:
        pass  # a read-only cache only costs a repeated check next time; never fail a load over it


def load_in_child(path: Path, *, timeout_s: float | None = None) -> None:
    """Load `path` (metadata, vocabulary, tensor layout) with llama.cpp in a child process;
    raise BadModelFileError if the child fails or dies."""
    global child_loads
    timeout = constants.LOAD_CHECK_TIMEOUT_S if timeout_s is None else timeout_s
    child_loads += 1
    # Debug mode makes the backend echo llama.cpp's log to stderr as it comes (an abort leaves
    # no chance to print a buffer); GGML_NO_BACKTRACE skips ggml's gdb backtrace on abort.
    env = {**os.environ, constants.ENV_DEBUG: "1", "PYTHONUNBUFFERED": "1", constants.ENV_AMX: "off",
           "GGML_NO_BACKTRACE": "1"}
    # The child must import this very package, also when it is not installed (a source tree).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-m", "qwq_local.gguf", str(path)], capture_output=True,
                              text=True, errors="replace", timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeLoadError(
            f"{path}: the test load in a child process did not finish in {timeout:.0f}s; "
            "check that the disk is readable and retry") from None
    if proc.returncode == 0 and _OK_MARK in proc.stdout:
        return
    if proc.returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-proc.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-proc.returncode}"
    else:
        how = f"exited with code {proc.returncode}"
    log = proc.stderr.strip()
    error = BadModelFileError(f"{path}: llama.cpp cannot load this file: {_reason(log)} "
                              f"(a test load in a child process {how})")
    error.log = log  # type: ignore[attr-defined]
    raise error


def _reason(log: str) -> str:
    """The lines of llama.cpp's log that say what went wrong, joined into one."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for strong in (("GGML_ASSERT", "error loading model"), ("error", "failed", "exception", "invalid")):
        picked = [ln for ln in lines if any(m in ln for m in strong) and _NULL_MARK not in ln]
        if picked:
            break
    else:
        picked = lines
    # Build paths of the llama.cpp sources say nothing to a user: keep file:line only.
    text = " | ".join(" ".join(_SOURCE_PATH.sub(r"\1", ln).split()) for ln in picked[-2:]) or "no log output"
    return text if len(text) <= 600 else text[:600] + "..."


def _child_main(path: str) -> int:
    from ..backend import binding as backend
    from ..errors import RuntimeLoadError

    try:
        model = backend.Model.load(Path(path), metadata_only=True)
    except RuntimeLoadError:
        sys.stderr.write(f"error: {_NULL_MARK}\n")
        return 3
    try:
        # Some hyperparameter faults (e.g. a key_length that disagrees with the heads) pass the
        # model loader and abort() only when a context builds its first graph: build one here.
        # On a metadata-only model this allocates neither KV cache nor compute buffers.
        backend.Context(model, n_ctx=constants.LOAD_CHECK_N_CTX, n_batch=constants.LOAD_CHECK_N_BATCH,
                        n_threads=1).close()
    except RuntimeLoadError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 3
    finally:
        model.close()
    print(_OK_MARK)
    return 0


def load_model(path: Path | str, **options: Any) -> "Model":
    """The validated load every caller uses: `ensure_loadable(path)` (header checks, then a first
    load in a child process), then `backend.Model.load(path, **options)` in this process.

    Raises ModelNotFoundError, BadModelFileError or RuntimeLoadError."""
    from ..backend.binding import Model

    ensure_loadable(path)
    return Model.load(path, **options)


def child_main(argv: list[str]) -> int:
    """The load-check child's entry (`python -m qwq_local.gguf MODEL`)."""
    if len(argv) != 1:
        return 2
    return _child_main(argv[0])
