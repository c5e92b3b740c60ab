"""The offline half of the hub: model names, quant labels, the Hugging Face cache layout and
the records of verified files. Nothing here opens a network connection, so resolving
`qwq:q4_k_m` works on a plane.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

from .. import constants
from ..errors import ModelNotFoundError, UsageError
from ..fileutil import read_json_record, write_json_record

Progress = Optional[Callable[[int, int], None]]

# Quant label at the end of a GGUF file name, before an optional split suffix:
# "qwq-32b-q4_k_m.gguf", "QwQ-32B-Q8_0-00001-of-00002.gguf", "model.IQ4_XS.gguf", "x-bf16.gguf".
_QUANT_RE = re.compile(
    r"(?:^|[-_.])((?:[it]?q\d+(?:_[0-9a-z]+)*)|bf16|fp?16|fp?32)(?:-\d{5}-of-\d{5})?\.gguf$", re.IGNORECASE
)
# Spellings of one type in file names; labels use llama.cpp's.
_LABEL_ALIASES = {"FP16": "F16", "FP32": "F32"}
# llama.cpp's gguf-split naming; llama.cpp finds the other parts from the first one's name.
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_QUANT_ARG_RE = re.compile(r"^[A-Za-z0-9][\w.]*$")


# --- names ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model name parsed: which repo, which quant."""

    repo_id: str
    quant: str

    @property
    def name(self) -> str:
        return display_name(self.repo_id, self.quant)


def normalize_quant(quant: str) -> str:
    quant = quant.strip()
    if not _QUANT_ARG_RE.match(quant):
        raise UsageError(f"invalid quant {quant!r}; use a llama.cpp type name such as {constants.DEFAULT_QUANT}")
    return _LABEL_ALIASES.get(quant.upper(), quant.upper())


def display_name(repo_id: str, quant: str) -> str:
    prefix = constants.MODEL_NAME_PREFIX if repo_id == constants.QWQ_GGUF_REPO_ID else repo_id
    return f"{prefix}:{quant.lower()}"


def parse_model_name(name: str) -> ModelRef | None:
    """`qwq`, `qwq:Q8_0`, `owner/repo:q4_k_m` -> ModelRef; anything else (a path) -> None."""
    base, sep, quant = name.strip().partition(":")
    if base.lower() == constants.MODEL_NAME_PREFIX:
        repo_id = constants.QWQ_GGUF_REPO_ID
    elif sep and _REPO_RE.match(base):
        repo_id = base
    else:
        return None
    if sep and not _QUANT_ARG_RE.match(quant):
        if repo_id == constants.QWQ_GGUF_REPO_ID:  # "qwq:..." is never a file name someone meant
            raise UsageError(f"invalid model name {name!r}; use {constants.MODEL_NAME_PREFIX}:QUANT such as "
                             f"{constants.MODEL_NAME_PREFIX}:{constants.DEFAULT_QUANT.lower()}")
        return None
    return ModelRef(repo_id, normalize_quant(quant) if sep else constants.DEFAULT_QUANT)


def pull_command(repo_id: str, quant: str, revision: str | None = None) -> str:
    """The exact command that fetches this model, for error messages."""
    cmd = f"qwq-local pull --quant {quant}"
    if repo_id != constants.QWQ_GGUF_REPO_ID:
        cmd += f" --repo {repo_id}"
    if revision:
        cmd += f" --revision {revision}"
    return cmd


def quant_of(filename: str) -> str | None:
    match = _QUANT_RE.search(Path(filename).name)
    return normalize_quant(match.group(1)) if match else None


# --- GGUF file groups (one model = one file or all parts of a split) ------------------------


@dataclasses.dataclass(frozen=True)
class GgufGroup:
    filenames: tuple[str, ...]  # repo-relative, first part first
    quant: str | None
    complete: bool  # every part of a split is present


def group_gguf_files(filenames: Iterable[str]) -> list[GgufGroup]:
    groups: dict[tuple[str, str], dict[int, str]] = {}
    counts: dict[tuple[str, str], int] = {}
    for filename in filenames:
        if not filename.lower().endswith(".gguf"):
            continue
        directory, _, base = filename.rpartition("/")
        split = _SPLIT_RE.match(base)
        if split:
            key = (directory, split["stem"] + "-split")
            groups.setdefault(key, {})[int(split["index"])] = filename
            counts[key] = int(split["count"])
        else:
            groups.setdefault((directory, base), {})[1] = filename
            counts[(directory, base)] = 1
    result = []
    for key in sorted(groups):
        parts = groups[key]
        names = tuple(parts[i] for i in sorted(parts))
        complete = sorted(parts) == list(range(1, counts[key] + 1))
        result.append(GgufGroup(names, quant_of(names[0]), complete))
    return result


def select_group(groups: list[GgufGroup], ref: ModelRef, *, where: str) -> GgufGroup | None:
    """The one group of `ref.quant`, None if there is none; several is a usage error."""
    matching = [g for g in groups if g.quant == ref.quant]
    if len(matching) > 1:
        names = ", ".join(g.filenames[0] for g in matching)
        raise UsageError(
            f"several {ref.quant} GGUFs in {where}: {names}; pass the path of the one you want instead of {ref.name}"
        )
    return matching[0] if matching else None


def split_parts(path: Path) -> list[Path]:
    """All parts of the split GGUF whose first part is `path` (just `path` if not split)."""
    path = Path(path)
    split = _SPLIT_RE.match(path.name)
    if not split:
        return [path]
    count = int(split["count"])
    return [path.with_name(f"{split['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


# --- the huggingface_hub cache layout -------------------------------------------------------


def hub_cache_dir() -> Path:
    # huggingface_hub resolved HF_HUB_CACHE / HF_HOME when it was imported; use its answer so
    # both libraries always agree on one cache.
    from huggingface_hub import constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE).expanduser()


def offline_mode() -> bool:
    from huggingface_hub import constants as hf_constants

    return hf_constants.is_offline_mode() or constants._truthy(os.environ.get(constants.ENV_HF_OFFLINE))


def repo_storage(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def candidate_commits(storage: Path, revision: str | None) -> list[str]:
    """Snapshot names to look in for `revision`, best first (None: refs/main, then the rest)."""
    snapshots = storage / "snapshots"
    if revision and _COMMIT_RE.match(revision):
        return [revision]
    name = revision or "main"
    commits = []
    # Git ref names never hold "..", and refs hold commit hashes: anything else (a crafted
    # --revision or cache) would lead outside the cache.
    if ".." not in name and not name.startswith("/"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            commit = (storage / "refs" / name).read_text().strip()
            if _COMMIT_RE.match(commit):
                commits.append(commit)
    if revision is None and snapshots.is_dir():
        # A cache filled by `hf download --revision X` has no refs/main: any snapshot will do,
        # newest first.
        others = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        commits += [p.name for p in others if p.name not in commits]
    return commits


def find_cached(ref: ModelRef, *, revision: str | None = None, reason: str = "") -> list[Path]:
    """Snapshot paths of every part of `ref` in the local cache, first part first; offline."""
    storage = repo_storage(ref.repo_id)
    online = f"with {constants.ENV_HF_OFFLINE} unset" if offline_mode() else "while online"
    fix = f"run `{pull_command(ref.repo_id, ref.quant, revision)}` {online}"
    incomplete: GgufGroup | None = None
    for commit in candidate_commits(storage, revision):
        snapshot = storage / "snapshots" / commit
        if not snapshot.is_dir():
            continue
        # is_file() follows the snapshot symlinks, so a pointer to a removed blob does not count.
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf") if p.is_file()]
        group = select_group(group_gguf_files(files), ref, where=str(snapshot))
        if group is None:
            continue
        if group.complete:
            return [snapshot / f for f in group.filenames]
        incomplete = group
    suffix = f" ({reason})" if reason else ""
    if incomplete is not None:
        raise ModelNotFoundError(
            f"only some parts of {ref.name} ({incomplete.filenames[0]}) are in the local cache "
            f"{storage}{suffix}; {fix} to fetch the rest"
        )
    raise ModelNotFoundError(f"{ref.name} is not in the local cache {storage}{suffix}; {fix}")


def remove_cached_file(pointer: Path) -> None:
    """Remove a bad blob and the snapshot link to it, so nothing points at bad bytes."""
    blob = pointer.resolve()
    for path in (blob, pointer):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    forget(blob)


def blob_sha256(path: Path) -> str | None:
    """The sha256 huggingface_hub named this file's blob after (its LFS sha256), if any."""
    name = Path(path).resolve().name
    return name if _SHA256_RE.match(name) else None


# --- hashing and verification records -------------------------------------------------------


def _records_path() -> Path:
    return constants.cache_dir() / constants.VERIFIED_RECORD_FILE


def _load_records() -> dict:
    return read_json_record(_records_path())


def _save_records(records: dict) -> None:
    write_json_record(_records_path(), records)


def _stat_key(path: Path) -> tuple[str, dict] | None:
    try:
        real = Path(path).resolve(strict=True)
        st = real.stat()
    except OSError:
        return None
    return str(real), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def record_verified(path: Path, sha256: str) -> None:
    key = _stat_key(path)
    if key is None:
        return
    records = _load_records()
    records[key[0]] = {**key[1], "sha256": sha256}
    _save_records(records)


def recorded_sha256(path: Path) -> str | None:
    """The sha256 this file was verified against, if the file is unchanged since then."""
    key = _stat_key(path)
    if key is None:
        return None
    record = _load_records().get(key[0])
    if not isinstance(record, dict):
        return None
    if record.get("size") != key[1]["size"] or record.get("mtime_ns") != key[1]["mtime_ns"]:
        return None
    return record.get("sha256")


def forget(path: Path) -> None:
    records = _load_records()
    if records.pop(str(Path(path).resolve()), None) is not None:
        _save_records(records)
