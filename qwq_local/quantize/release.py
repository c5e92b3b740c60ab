"""The release pipeline a maintainer runs once per model: checkpoint (local directory or Hub
repo id) -> bf16 GGUF -> a list of quants -> manifest.json (sizes, sha256, llama.cpp version,
and the command lines that reproduce each file)."""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Callable, Sequence

from .. import constants
from ..errors import UsageError
from ..fileutil import sha256_file

MANIFEST_NAME = "manifest.json"


def release_name(source: str | Path) -> str:
    """'Qwen/QwQ-32B' -> 'qwq-32b'; a directory -> its name, lower-case."""
    base = str(source).rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-") or "model"


def build_release(source: str | Path, out_dir: Path | str, *, quants: Sequence[str] = constants.RELEASE_QUANTS,
                  imatrix: Path | str | None = None, name: str | None = None, revision: str | None = None,
                  threads: int | None = None,
                  on_step: Callable[[str], None] | None = None) -> dict:
    """Convert `source` to bf16 GGUF in `out_dir`, quantize it to each of `quants`, write
    `out_dir/manifest.json` and return the manifest. `on_step(message)` reports each stage."""
    from ..backend import binding as backend
    from ..convert.pipeline import convert
    from ..fileutil import check_output_dir
    from .types import resolve_type
    from .quantizer import quantize

    out = Path(out_dir)
    types = [resolve_type(q) for q in quants]  # fail on a bad name before hours of converting
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; give a directory for the release files")
    check_output_dir(out / MANIFEST_NAME)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or release_name(source)
    say = on_step or (lambda message: None)

    bf16 = out / f"{stem}-bf16.gguf"
    say(f"convert {source} -> {bf16.name}")
    convert(str(source), bf16, outtype="bf16", revision=revision)
    files = [_entry(bf16, "BF16", [f"qwq-local convert {source} -o {bf16} --outtype bf16"
                                   + (f" --revision {revision}" if revision else "")])]
    for qt in types:
        target = out / f"{stem}-{qt.name.lower()}.gguf"
        say(f"quantize {bf16.name} -> {target.name}")
        result = quantize(bf16, target, qtype=qt.name, imatrix=imatrix, threads=threads)
        ours = f"qwq-local quantize {bf16} {target} --type {qt.name}" + (f" --imatrix {imatrix}" if imatrix else "")
        files.append(_entry(target, qt.name, [ours, result.command], predicted=result.predicted_bytes))

    manifest = {
        "name": stem,
        "source": str(source),
        "revision": revision,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llama_cpp_python": backend.llama_cpp_version(),
        "llama_cpp": _llama_cpp_version(backend.llama()),
        "llama_cpp_system_info": backend.system_info().strip(),
        "imatrix": str(imatrix) if imatrix else None,
        "files": files,
    }
    from ..fileutil import atomic_output

    with atomic_output(out / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"wrote {out / MANIFEST_NAME}")
    return manifest


def _llama_cpp_version(lib) -> str | None:
    fn = getattr(lib, "llama_version", None)  # newer llama.cpp builds only
    return fn().decode("utf-8", errors="replace") if fn is not None else None


def _entry(path: Path, qtype: str, commands: list[str], *, predicted: int | None = None) -> dict:
    entry = {"file": path.name, "type": qtype, "bytes": path.stat().st_size, "sha256": sha256_file(path),
             "commands": commands}
    if predicted is not None:
        entry["predicted_bytes"] = predicted
    return entry
