"""Pull official GGUFs from the Hugging Face Hub, list the cached ones, resolve model names.

Offline first: names resolve from the huggingface_hub cache without any network call, and
`pull` of a cached model works with HF_HUB_OFFLINE=1 or no network. Every pulled file is
checked against the sha256 the Hub publishes in its LFS metadata before it is used.

huggingface_hub 2.x downloads into a per-process temporary file that it deletes on any
failure, so an interrupted 20 GB download would restart from zero. `pull` therefore streams
the blob itself (with huggingface_hub's HTTP client and `http_get`) into
`blobs/<sha256>.incomplete` and continues it with a Range request next time; then
`hf_hub_download` links the finished blob into the snapshot and refs exactly as it always does.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import BadModelFileError, HubError, ModelNotFoundError, UsageError
from ..fileutil import check_free_space, human_bytes, sha256_file
from .cache import (
    ModelRef,
    Progress,
    blob_sha256,
    candidate_commits,
    display_name,
    find_cached,
    group_gguf_files,
    hub_cache_dir,
    normalize_quant,
    offline_mode,
    parse_model_name,
    pull_command,
    record_verified,
    recorded_sha256,
    remove_cached_file,
    repo_storage,
    select_group,
    split_parts,
)

__all__ = ["LocalModel", "list_models", "pull", "recorded_sha256", "resolve_model", "split_parts"]


@dataclasses.dataclass(frozen=True)
class LocalModel:
    """One GGUF model in the local cache (a single file, or every part of a split)."""

    name: str | None  # what resolve_model accepts; None when the file name has no quant label
    repo_id: str
    revision: str
    filename: str
    quant: str | None
    path: Path
    parts: tuple[Path, ...]
    size: int
    verified: bool
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["parts"] = [str(p) for p in self.parts]
        return data


# --- resolve --------------------------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """An existing file -> itself; `qwq:q4_k_m`, `qwq`, `owner/repo:Q8_0` -> the cached GGUF
    (its first part if split). Never touches the network."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    hint = f"pass an existing .gguf file or a model name such as qwq:{constants.DEFAULT_QUANT.lower()}"
    try:
        mode = path.stat().st_mode
    except OSError as exc:  # missing, but also a name too long for a path, a symlink loop...
        mode, problem = None, exc
    if mode is not None:
        if stat.S_ISREG(mode):
            return path
        if stat.S_ISDIR(mode):
            raise ModelNotFoundError(f"{path} is a directory; {hint}")
        # A FIFO, socket or device: reading it could block or never end.
        raise BadModelFileError(f"{path} is not a regular file; {hint}")
    ref = parse_model_name(text) if not isinstance(name_or_path, Path) else None
    if ref is None:
        if isinstance(problem, FileNotFoundError):
            raise ModelNotFoundError(f"no such file: {path}; {hint} (see `qwq-local list`)")
        raise ModelNotFoundError(f"cannot use {path}: {problem.strerror or problem}; {hint}")
    return find_cached(ref)[0]


# --- list -----------------------------------------------------------------------------------


def list_models() -> list[LocalModel]:
    """Every cached GGUF (any repo) with its quant, size and whether its sha256 was verified.

    Walks the cache the way names are resolved (find_cached), not with huggingface_hub's
    scan_cache_dir, which drops a whole repo over one broken link or a stray file: `list`
    must show every model that `-m NAME` can load."""
    models: list[LocalModel] = []
    seen: set[tuple[Path, ...]] = set()
    try:
        storages = sorted(p for p in hub_cache_dir().iterdir() if p.name.startswith("models--") and p.is_dir())
    except OSError:  # no cache yet
        return []
    for storage in storages:
        repo_id = storage.name.removeprefix("models--").replace("--", "/")
        for commit in candidate_commits(storage, None):
            snapshot = storage / "snapshots" / commit
            # is_file() follows the links: a pointer to a removed blob is no model.
            files = {p.relative_to(snapshot).as_posix(): p for p in snapshot.rglob("*.gguf") if p.is_file()}
            for group in group_gguf_files(files):
                paths = tuple(files[f] for f in group.filenames)
                blobs = tuple(p.resolve() for p in paths)
                if blobs in seen:  # the same bytes under an older snapshot
                    continue
                seen.add(blobs)
                models.append(
                    LocalModel(
                        name=display_name(repo_id, group.quant) if group.quant else None,
                        repo_id=repo_id,
                        revision=commit,
                        filename=group.filenames[0],
                        quant=group.quant,
                        path=paths[0],
                        parts=paths,
                        size=sum(b.stat().st_size for b in blobs),
                        verified=all(recorded_sha256(p) is not None for p in paths),
                        complete=group.complete,
                    )
                )
    return sorted(models, key=lambda m: (m.repo_id, m.quant or "", m.filename, m.revision))


# --- pull -----------------------------------------------------------------------------------


class _Counter:
    """Adds bytes from both downloading and hashing to one `progress(done, total)`.

    Passed to huggingface_hub as `tqdm_class`: it builds "bars" by calling it with tqdm's
    keyword arguments and then calls `update(n)`, so no bar is ever printed by the library."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    # --- the part of the tqdm interface huggingface_hub uses ---
    def __call__(self, *args: Any, **kwargs: Any) -> "_Counter":
        return self

    def update(self, n: int = 1) -> None:
        self.add(n)

    def __enter__(self) -> "_Counter":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def close(self) -> None:
        return None


def pull(
    *,
    quant: str = constants.DEFAULT_QUANT,
    repo_id: str = constants.QWQ_GGUF_REPO_ID,
    revision: str | None = None,
    progress: Progress = None,
) -> Path:
    """Download (or find in the cache) and verify the GGUF of `quant` in `repo_id`.

    Returns the snapshot path of the file (the first part of a split GGUF). Falls back to the
    cache with HF_HUB_OFFLINE=1 or when the Hub cannot be reached.
    """
    ref = ModelRef(_valid_repo_id(repo_id), normalize_quant(quant))
    if offline_mode():
        return _pull_from_cache(ref, revision, progress, reason=f"{constants.ENV_HF_OFFLINE} is set")
    try:
        info = _model_info(ref, revision)
    except _Unreachable as exc:
        return _pull_from_cache(ref, revision, progress, reason=f"the Hub is unreachable: {exc}")

    siblings = {s.rfilename: s for s in info.siblings or []}
    group = select_group(group_gguf_files(siblings), ref, where=f"{repo_id}@{info.sha}")
    if group is None:
        available = sorted({g.quant for g in group_gguf_files(siblings) if g.quant})
        raise ModelNotFoundError(
            f"{repo_id} has no {ref.quant} GGUF at {revision or 'main'}; available quants: "
            f"{', '.join(available) or 'none'}; run `{pull_command(repo_id, '<one of them>', revision)}`"
        )
    wanted = [_lfs_facts(siblings[f], repo_id) for f in group.filenames]
    return _download_group(ref, revision, info.sha or revision, wanted, progress)


class _Unreachable(Exception):
    pass


def _valid_repo_id(repo_id: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"invalid --repo {repo_id!r}: {exc}; use the form owner/name") from exc
    return repo_id


def _model_info(ref: ModelRef, revision: str | None):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return HfApi().model_info(ref.repo_id, revision=revision, files_metadata=True)
    except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
        raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
    except GatedRepoError as exc:
        raise HubError(
            f"{ref.repo_id} is gated: accept its terms on the Hub and log in with `hf auth login`, then re-run"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"{ref.repo_id} has no revision {revision!r}; check --revision") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(
            f"repository {ref.repo_id} not found on the Hub (or private: log in with `hf auth login`); check --repo"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status is not None and status >= 500:
            raise _Unreachable(f"HTTP {status}") from exc
        raise HubError(f"the Hub refused the request for {ref.repo_id}: {exc}") from exc


def _lfs_facts(sibling, repo_id: str) -> tuple[str, str, int]:
    if sibling.lfs is None:
        raise HubError(
            f"{repo_id}/{sibling.rfilename} has no LFS metadata, so its sha256 cannot be verified; "
            "download it by hand if you trust it and pass its path"
        )
    return sibling.rfilename, sibling.lfs.sha256, sibling.lfs.size


def _download_group(
    ref: ModelRef,
    revision: str | None,
    commit: str | None,
    wanted: list[tuple[str, str, int]],
    progress: Progress,
) -> Path:
    cache = hub_cache_dir()
    storage = repo_storage(ref.repo_id, cache)
    to_download = to_hash = 0
    for _, sha, size in wanted:
        blob = storage / "blobs" / sha
        if blob.exists():
            to_hash += 0 if recorded_sha256(blob) == sha else blob.stat().st_size
            continue
        partial = _partial_path(blob)
        have = partial.stat().st_size if partial.exists() else 0
        to_download += size - have if have <= size else size
        to_hash += size
    check_free_space(
        cache, to_download, what=f"pulling {ref.name} ({human_bytes(to_download)} left to download)"
    )
    counter = _Counter(progress, to_download + to_hash)
    pointers = []
    for filename, sha, size in wanted:
        _download_blob(ref, revision, commit, filename, sha, size, storage, counter)
        pointer = _link(ref, revision, filename, cache, counter)
        _verify(pointer, sha, ref, revision, counter)
        pointers.append(pointer)
    return pointers[0]


def _partial_path(blob: Path) -> Path:
    # Older huggingface_hub versions used this name for their resumable partial downloads.
    return blob.with_name(blob.name + ".incomplete")


def _download_blob(
    ref: ModelRef,
    revision: str | None,
    commit: str | None,
    filename: str,
    sha: str,
    size: int,
    storage: Path,
    counter: _Counter,
) -> None:
    """Stream one file into blobs/<sha256> via a resumable partial file, hash it, move it in."""
    import httpx2
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    blob = storage / "blobs" / sha
    partial = _partial_path(blob)
    lock = storage.parent / ".locks" / storage.name / f"{sha}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    again = f"run `{pull_command(ref.repo_id, ref.quant, revision)}` again"
    # The same lock huggingface_hub takes for this blob: a concurrent hf_hub_download waits.
    with WeakFileLock(lock):
        if blob.exists():
            return
        if partial.exists() and partial.stat().st_size > size:
            partial.unlink()  # longer than the file can be: not a prefix of it
        # The commit the metadata came from: a branch moving meanwhile cannot change the bytes.
        url = hf_hub_url(ref.repo_id, filename, revision=commit)
        try:
            with open(partial, "ab") as f:  # append mode: tell() is the resume offset
                http_get(
                    url,
                    f,
                    resume_size=f.tell(),
                    headers=build_hf_headers(),
                    expected_size=size,
                    displayed_filename=filename,
                    tqdm_class=counter,  # type: ignore[arg-type]
                )
        except (httpx2.HTTPError, OSError) as exc:
            have = partial.stat().st_size if partial.exists() else 0
            if have >= size:
                partial.unlink(missing_ok=True)
            raise HubError(
                f"downloading {ref.repo_id}/{filename} stopped at {human_bytes(have)} of {human_bytes(size)} "
                f"({type(exc).__name__}: {exc}); {again} to resume"
            ) from exc
        digest = sha256_file(partial, progress=counter.add)
        if digest != sha:
            partial.unlink(missing_ok=True)
            raise HubError(
                f"{ref.repo_id}/{filename} downloaded with sha256 {digest} but the Hub's LFS metadata says "
                f"{sha}; the download was removed, {again}"
            )
        os.replace(partial, blob)
        record_verified(blob, sha)


def _link(ref: ModelRef, revision: str | None, filename: str, cache: Path, counter: _Counter) -> Path:
    """Let huggingface_hub create the snapshot link and refs for the blob now in place."""
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        pointer = hf_hub_download(
            ref.repo_id, filename, revision=revision, cache_dir=cache, tqdm_class=counter  # type: ignore[arg-type]
        )
        return Path(pointer)
    except (httpx2.HTTPError, HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise HubError(
            f"linking {ref.repo_id}/{filename} into the cache failed ({type(exc).__name__}: {exc}); "
            f"run `{pull_command(ref.repo_id, ref.quant, revision)}` again"
        ) from exc


def _verify(pointer: Path, sha: str | None, ref: ModelRef, revision: str | None, counter: _Counter) -> None:
    """Hash `pointer` unless an unchanged earlier verification is on record; bad bytes are removed."""
    fix = f"run `{pull_command(ref.repo_id, ref.quant, revision)}` again"
    if sha is None:
        raise HubError(f"{pointer} is not stored under its sha256, so it cannot be verified offline; {fix} online")
    if recorded_sha256(pointer) == sha:
        return
    digest = sha256_file(pointer, progress=counter.add)
    if digest != sha:
        remove_cached_file(pointer)
        raise HubError(
            f"{pointer.name} in the cache has sha256 {digest}, expected {sha}; the file was removed, {fix}"
        )
    record_verified(pointer, sha)


def _pull_from_cache(ref: ModelRef, revision: str | None, progress: Progress, *, reason: str) -> Path:
    parts = find_cached(ref, revision=revision, reason=reason)
    pending = [p for p in parts if recorded_sha256(p) is None]
    counter = _Counter(progress, sum(p.stat().st_size for p in pending))
    for part in parts:
        # Offline there is no LFS metadata to ask; the blob's name is the sha256 the Hub sent
        # when it was downloaded.
        _verify(part, blob_sha256(part), ref, revision, counter)
    return parts[0]

