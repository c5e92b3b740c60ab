"""Safe file output shared by convert, quantize and pull: free-space checks and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from . import constants
from .errors import DiskSpaceError, UsageError


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_free_space(directory: Path, needed: int, *, what: str = "the output") -> None:
    """Raise DiskSpaceError unless `needed` bytes (plus a margin) fit in `directory`."""
    directory = Path(directory)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + constants.DISK_SPACE_MARGIN_BYTES > free:
        raise DiskSpaceError(
            f"{what} needs {human_bytes(needed)} but only {human_bytes(free)} is free in {directory}; "
            "free some space or choose another output directory"
        )


def check_output_dir(output: Path) -> None:
    """Raise UsageError, before any work, when `output` is a directory or its directory can
    neither be used nor created (a path component is a file, or the nearest existing directory
    is read-only)."""
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; give a file name inside it")
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write {out}: {probe} is not a directory; choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: no write permission in {probe}; choose another output path")


def refuse_same_file(output: Path, *inputs: Path) -> None:
    """Writing over an input would destroy it mid-read: refuse before anything is opened."""
    out = Path(output)
    for src in inputs:
        src = Path(src)
        same = out.resolve() == src.resolve()
        if not same and out.exists() and src.exists():
            same = os.path.samefile(out, src)
        if same:
            raise UsageError(f"output {out} is the same file as input {src}; choose another output path")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    A failure or interruption removes the temporary file, so nothing incomplete is ever left
    under the final name (and an existing file there is untouched until the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def sha256_file(path: Path, *, limit: int | None = None,
                progress: Callable[[int], None] | None = None) -> str:
    """Stream-hash a file (or its first `limit` bytes) in fixed chunks: memory stays bounded
    for 20 GB files. `progress(n)` is told the size of each chunk hashed."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            size = constants.COPY_CHUNK_BYTES if remaining is None else min(remaining, constants.COPY_CHUNK_BYTES)
            chunk = f.read(size)
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def read_json_record(path: Path) -> dict:
    """A small JSON cache file as a dict; {} when it is missing, damaged or not an object (a
    lost record only costs redoing the work it remembered)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_record(path: Path, data: dict) -> None:
    """Replace a JSON cache file atomically, so concurrent readers never see half of it."""
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
