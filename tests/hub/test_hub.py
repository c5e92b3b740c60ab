"""pull / list / name resolution against a local fake of the Hub's HTTP API (no internet).

The fake serves what huggingface_hub 2.x asks for: `GET /api/models/<repo>[/revision/<rev>]`
(model info with LFS sha256 and size), and `HEAD`/`GET /<repo>/resolve/<rev>/<file>` with the
Hub's headers and Range support.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from qwq_local import errors
from qwq_local.hub import cache as hub_cache, download as hub

REPO = "Qwen/QwQ-32B-GGUF"
COMMIT = "a" * 40


def _fake_gguf(seed: int, size: int = 300_000) -> bytes:
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    return (b"GGUF" + bytes([3, 0, 0, 0]) + body)[:size]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """A threaded http.server that answers like huggingface.co for a few repos."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.served_bytes = 0
        self.drop_after: int | None = None  # cut the next file transfer after this many bytes
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub_._handle(self, head=False)

            def do_HEAD(self):
                hub_._handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def add_repo(self, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> None:
        self.repos[repo_id] = {"commit": commit, "files": {k: {"data": v, "served": v} for k, v in files.items()}}

    def serve_instead(self, repo_id: str, filename: str, data: bytes) -> None:
        """Serve `data` while the metadata keeps advertising the original file's sha256."""
        self.repos[repo_id]["files"][filename]["served"] = data

    def gets(self, kind: str = "resolve") -> list[dict]:
        return [r for r in self.requests if r["method"] == "GET" and f"/{kind}/" in r["path"]]

    def start(self) -> "FakeHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _send(self, h, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _handle(self, h, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append({"method": h.command, "path": path, "range": h.headers.get("Range")})
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            return self._model_info(h, parts[2:], head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(h, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._send(h, 404, {}, b"not found", head)

    def _model_info(self, h, parts: list[str], head: bool) -> None:
        repo = self.repos.get("/".join(parts[:2]))
        if repo is None:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"}, b'{"error":"Repository not found"}', head)
        if len(parts) == 4 and parts[3] not in ("main", repo["commit"]):
            return self._send(h, 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error":"Invalid rev id"}', head)
        siblings = [
            {
                "rfilename": name,
                "size": len(f["data"]),
                "blobId": hashlib.sha1(f["data"]).hexdigest(),
                "lfs": {"sha256": _sha(f["data"]), "size": len(f["data"]), "pointerSize": 134},
            }
            for name, f in repo["files"].items()
        ]
        body = json.dumps({"id": "/".join(parts[:2]), "sha": repo["commit"], "siblings": siblings}).encode()
        self._send(h, 200, {"Content-Type": "application/json"}, body, head)

    def _resolve(self, h, repo_id: str, rev: str, filename: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"}, b"", head)
        if rev not in ("main", repo["commit"]):
            return self._send(h, 404, {"X-Error-Code": "RevisionNotFound"}, b"", head)
        f = repo["files"].get(filename)
        if f is None:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo["commit"]}, b"", head)
        etag = f'"{_sha(f["data"])}"'
        headers = {
            "X-Repo-Commit": repo["commit"],
            "ETag": etag,
            "X-Linked-Etag": etag,
            "X-Linked-Size": len(f["data"]),
            "Accept-Ranges": "bytes",
        }
        data = f["served"]
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(rng.split("=")[1].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if head:
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, str(v))
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            return
        if self.drop_after is not None:
            # Promise the whole body, send part of it, hang up: a dropped connection.
            cut, self.drop_after = self.drop_after, None
            h.send_response(206 if start else 200)
            for k, v in headers.items():
                h.send_header(k, str(v))
            h.send_header("Content-Length", str(len(data) - start))
            h.end_headers()
            h.wfile.write(data[start : start + cut])
            h.wfile.flush()
            h.close_connection = True
            self.served_bytes += cut
            return
        self.served_bytes += len(data) - start
        self._send(h, 206 if start else 200, headers, data[start:])


FILES = {
    "qwq-32b-q4_k_m.gguf": _fake_gguf(1),
    "qwq-32b-q8_0.gguf": _fake_gguf(2, 200_000),
    "README.md": b"# fake\n",
}
SPLIT = {f"qwq-32b-fp16-0000{i}-of-00003.gguf": _fake_gguf(10 + i, 100_000) for i in (1, 2, 3)}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private HF cache and qwq-local cache; huggingface_hub pointed at a closed port."""
    from huggingface_hub import constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("QWQ_LOCAL_CACHE", str(tmp_path / "qwq-cache"))
    _point_at(monkeypatch, "http://127.0.0.1:9")  # nothing listens on the discard port
    return tmp_path


def _point_at(monkeypatch, url: str) -> None:
    from huggingface_hub import constants as hf

    # huggingface_hub captured HF_ENDPOINT at import in these two module globals.
    monkeypatch.setattr(hf, "ENDPOINT", url)
    monkeypatch.setattr(hf, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def fake_hub(env, monkeypatch):
    server = FakeHub()
    server.add_repo(REPO, {**FILES, **SPLIT})
    server.start()
    _point_at(monkeypatch, server.url)
    yield server
    server.stop()


def _offline(monkeypatch) -> None:
    from huggingface_hub import constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)


def _blobs(env: Path) -> list[str]:
    d = env / "hf" / "hub" / "models--Qwen--QwQ-32B-GGUF" / "blobs"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _populate_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Write files in huggingface_hub's cache layout: blobs/<sha256>, snapshots/<rev>/<file>
    symlinks, refs/main."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = storage / "blobs" / _sha(data)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


# --- names and file groups ------------------------------------------------------------------


def test_quant_labels_and_names():
    assert hub_cache.quant_of("qwq-32b-q4_k_m.gguf") == "Q4_K_M"
    assert hub_cache.quant_of("sub/QwQ-32B-Q8_0-00002-of-00009.gguf") == "Q8_0"
    assert hub_cache.quant_of("model.IQ4_XS.gguf") == "IQ4_XS"
    assert hub_cache.quant_of("tiny-bf16.gguf") == "BF16"
    assert hub_cache.quant_of("notes.gguf") is None
    ref = hub_cache.parse_model_name("qwq:q4_k_m")
    assert (ref.repo_id, ref.quant, ref.name) == (REPO, "Q4_K_M", "qwq:q4_k_m")
    assert hub_cache.parse_model_name("QwQ").quant == "Q4_K_M"
    assert hub_cache.parse_model_name("bartowski/Qwen_QwQ-32B-GGUF:Q6_K").repo_id == "bartowski/Qwen_QwQ-32B-GGUF"
    assert hub_cache.parse_model_name("models/qwq.gguf") is None
    assert hub_cache.parse_model_name("owner/repo") is None  # repos need a quant: could be a path
    for bad in ("qwq:", "qwq:../../x", "QwQ:q4 k m"):
        with pytest.raises(errors.UsageError, match="invalid model name"):
            hub_cache.parse_model_name(bad)
    groups = hub_cache.group_gguf_files([*SPLIT, "qwq-32b-q4_k_m.gguf", "README.md"])
    assert [(g.filenames[0], g.quant, g.complete, len(g.filenames)) for g in groups] == [
        ("qwq-32b-fp16-00001-of-00003.gguf", "F16", True, 3),
        ("qwq-32b-q4_k_m.gguf", "Q4_K_M", True, 1),
    ]
    assert hub_cache.normalize_quant("fp16") == "F16"


def test_split_quant_label_and_incomplete_split():
    groups = hub_cache.group_gguf_files(["m-Q8_0-00001-of-00003.gguf", "m-Q8_0-00003-of-00003.gguf"])
    assert len(groups) == 1 and groups[0].quant == "Q8_0" and not groups[0].complete


# --- pull -----------------------------------------------------------------------------------


def test_pull_downloads_verifies_and_lists(fake_hub, env):
    seen = []
    path = hub.pull(quant="q4_k_m", progress=lambda done, total: seen.append((done, total)))
    data = FILES["qwq-32b-q4_k_m.gguf"]
    assert path == env / "hf/hub/models--Qwen--QwQ-32B-GGUF/snapshots" / COMMIT / "qwq-32b-q4_k_m.gguf"
    assert path.read_bytes() == data
    assert path.resolve().name == _sha(data)
    assert (env / "hf/hub/models--Qwen--QwQ-32B-GGUF/refs/main").read_text() == COMMIT
    assert hub.recorded_sha256(path) == _sha(data)
    # progress counts the download and the hash of the file
    assert seen[-1] == (2 * len(data), 2 * len(data))
    assert json.loads((env / "qwq-cache" / "verified.json").read_text())[str(path.resolve())]["sha256"] == _sha(data)

    models = hub.list_models()
    assert [(m.name, m.quant, m.size, m.verified, m.path) for m in models] == [
        ("qwq:q4_k_m", "Q4_K_M", len(data), True, path)
    ]
    assert hub.resolve_model("qwq:q4_k_m") == path

    # A second pull finds the verified blob: metadata calls only, no file transfer.
    before = len(fake_hub.gets())
    assert hub.pull() == path
    assert len(fake_hub.gets()) == before


def test_files_fetched_by_huggingface_hub_itself_resolve_and_verify(fake_hub, env):
    """A model put in the cache by `hf download` / hf_hub_download is found, listed and then
    verified by pull without downloading it again."""
    from huggingface_hub import hf_hub_download

    theirs = Path(hf_hub_download(REPO, "qwq-32b-q8_0.gguf", cache_dir=env / "hf" / "hub"))
    assert hub.resolve_model("qwq:q8_0") == theirs
    assert [(m.name, m.verified) for m in hub.list_models()] == [("qwq:q8_0", False)]
    gets = len(fake_hub.gets())
    assert hub.pull(quant="Q8_0") == theirs
    assert len(fake_hub.gets()) == gets
    assert hub.recorded_sha256(theirs) == _sha(FILES["qwq-32b-q8_0.gguf"])
    assert [(m.name, m.verified) for m in hub.list_models()] == [("qwq:q8_0", True)]


def test_pull_split_gguf_downloads_every_part(fake_hub, env):
    quant = hub_cache.quant_of(next(iter(SPLIT)))
    path = hub.pull(quant=quant)
    assert path.name == "qwq-32b-fp16-00001-of-00003.gguf"
    parts = hub.split_parts(path)
    assert [p.read_bytes() for p in parts] == list(SPLIT.values())
    assert all(hub.recorded_sha256(p) == _sha(SPLIT[p.name]) for p in parts)
    [model] = hub.list_models()
    assert model.parts == tuple(parts) and model.size == sum(map(len, SPLIT.values())) and model.verified
    assert hub.resolve_model(f"qwq:{quant.lower()}") == path


def test_corrupted_download_is_removed(fake_hub, env):
    good = FILES["qwq-32b-q4_k_m.gguf"]
    fake_hub.serve_instead(REPO, "qwq-32b-q4_k_m.gguf", good[:-1] + b"\x00")
    with pytest.raises(errors.HubError) as exc:
        hub.pull()
    message = str(exc.value)
    assert "removed" in message and "qwq-local pull --quant Q4_K_M" in message and _sha(good) in message
    assert _blobs(env) == []  # neither a blob nor a partial file is left
    assert hub.list_models() == []
    with pytest.raises(errors.ModelNotFoundError):
        hub.resolve_model("qwq:q4_k_m")


def test_resume_continues_partial_blob_with_range(fake_hub, env):
    data = FILES["qwq-32b-q4_k_m.gguf"]
    blobs = env / "hf/hub/models--Qwen--QwQ-32B-GGUF/blobs"
    blobs.mkdir(parents=True)
    (blobs / (_sha(data) + ".incomplete")).write_bytes(data[:120_000])
    path = hub.pull()
    [get] = fake_hub.gets()
    assert get["range"] == "bytes=120000-"
    assert fake_hub.served_bytes == len(data) - 120_000
    assert path.read_bytes() == data and hub.recorded_sha256(path) == _sha(data)
    assert _blobs(env) == [_sha(data)]


def test_interrupted_pull_resumes_on_the_next_run(fake_hub, env, monkeypatch):
    """Ctrl-C mid-download keeps the partial blob; the next pull asks only for the rest."""
    from huggingface_hub import constants as hf

    monkeypatch.setattr(hf, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    data = FILES["qwq-32b-q4_k_m.gguf"]

    def interrupt(done, total):
        if done > 100_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull(progress=interrupt)
    partial = env / "hf/hub/models--Qwen--QwQ-32B-GGUF/blobs" / (_sha(data) + ".incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < len(data)
    path = hub.pull()
    assert fake_hub.gets()[-1]["range"] == f"bytes={kept}-"
    assert path.read_bytes() == data and not partial.exists()


def test_dropped_connection_is_continued_with_range(fake_hub, env, monkeypatch):
    """huggingface_hub's own retry continues from the last chunk it wrote to our partial file."""
    from huggingface_hub import constants as hf

    chunk = 16 * 1024
    monkeypatch.setattr(hf, "DOWNLOAD_CHUNK_SIZE", chunk)
    data = FILES["qwq-32b-q4_k_m.gguf"]
    fake_hub.drop_after = 50_000
    path = hub.pull()
    written = 50_000 // chunk * chunk  # the tail of an unfinished chunk is fetched again
    first, second = fake_hub.gets()
    assert first["range"] is None and second["range"] == f"bytes={written}-"
    assert fake_hub.served_bytes == 50_000 + len(data) - written
    assert path.read_bytes() == data and hub.recorded_sha256(path) == _sha(data)


def test_resume_of_a_bad_partial_is_caught_by_the_hash(fake_hub, env):
    data = FILES["qwq-32b-q4_k_m.gguf"]
    blobs = env / "hf/hub/models--Qwen--QwQ-32B-GGUF/blobs"
    blobs.mkdir(parents=True)
    (blobs / (_sha(data) + ".incomplete")).write_bytes(b"\xff" * 1000)
    with pytest.raises(errors.HubError, match="removed"):
        hub.pull()
    assert _blobs(env) == []
    assert hub.pull().read_bytes() == data  # the re-run the message asks for works


def test_disk_space_is_checked_before_any_download(fake_hub, env, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(errors.DiskSpaceError, match="free"):
        hub.pull()
    assert fake_hub.gets() == []
    assert _blobs(env) == []


def test_unknown_quant_repo_and_revision(fake_hub, env):
    with pytest.raises(errors.ModelNotFoundError, match=r"available quants: .*Q4_K_M.*Q8_0"):
        hub.pull(quant="Q2_K")
    with pytest.raises(errors.ModelNotFoundError, match="not found on the Hub"):
        hub.pull(repo_id="nobody/nothing-GGUF")
    with pytest.raises(errors.ModelNotFoundError, match="no revision"):
        hub.pull(revision="v9")
    with pytest.raises(errors.UsageError):
        hub.pull(quant="q4 k m")
    with pytest.raises(errors.UsageError, match="invalid --repo"):
        hub.pull(repo_id="not a repo")


def test_pull_by_revision_commit(fake_hub, env):
    path = hub.pull(quant="Q8_0", revision=COMMIT)
    assert path.read_bytes() == FILES["qwq-32b-q8_0.gguf"]


# --- offline --------------------------------------------------------------------------------


def test_offline_pull_uses_cache_and_names_the_command(fake_hub, env, monkeypatch):
    path = hub.pull()
    fake_hub.stop()
    n = len(fake_hub.requests)
    _offline(monkeypatch)
    assert hub.pull() == path
    assert hub.resolve_model("qwq:Q4_K_M") == path
    with pytest.raises(errors.ModelNotFoundError) as exc:
        hub.pull(quant="Q8_0")
    assert "qwq-local pull --quant Q8_0` with HF_HUB_OFFLINE unset" in str(exc.value)
    assert len(fake_hub.requests) == n


def test_offline_env_var_set_after_import_is_honoured(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        hub.pull()


def test_unreachable_hub_falls_back_to_cache(fake_hub, env):
    path = hub.pull()
    fake_hub.stop()  # no offline flag: the connection itself fails
    assert hub.pull() == path
    with pytest.raises(errors.ModelNotFoundError) as exc:
        hub.pull(quant="Q8_0")
    assert "unreachable" in str(exc.value) and "qwq-local pull --quant Q8_0" in str(exc.value)


def test_resolve_from_prepopulated_cache_without_a_server(env):
    cache = env / "hf" / "hub"
    snapshot = _populate_cache(cache, REPO, {"qwq-32b-q4_k_m.gguf": FILES["qwq-32b-q4_k_m.gguf"]})
    other = _populate_cache(
        cache, "someone/Other-GGUF", {"sub/other-Q5_K_S.gguf": _fake_gguf(7, 5000), "mystery.gguf": b"GGUF"}
    )
    expected = snapshot / "qwq-32b-q4_k_m.gguf"
    for name in ("qwq:q4_k_m", "qwq:Q4_K_M", "Qwen/QwQ-32B-GGUF:q4_k_m", "qwq"):
        assert hub.resolve_model(name) == expected
    assert hub.resolve_model("someone/Other-GGUF:q5_k_s") == other / "sub/other-Q5_K_S.gguf"

    models = {m.name: m for m in hub.list_models()}
    assert set(models) == {"qwq:q4_k_m", "someone/Other-GGUF:q5_k_s", None}  # None: no quant in its name
    assert models[None].path == other / "mystery.gguf"
    assert not models["qwq:q4_k_m"].verified  # nothing hashed it yet

    # Offline pull verifies the cached blob against the sha256 it is stored under.
    from huggingface_hub import constants as hf

    hf.HF_HUB_OFFLINE = True
    try:
        assert hub.pull() == expected
    finally:
        hf.HF_HUB_OFFLINE = False
    assert {m.name: m.verified for m in hub.list_models()}["qwq:q4_k_m"]


def test_list_shows_what_resolves_despite_a_broken_link_or_stray_files(env):
    """huggingface_hub's scan_cache_dir drops a whole repo over one broken snapshot link;
    `list` must still show the repo's other models, which `-m NAME` loads fine."""
    cache = env / "hf" / "hub"
    snapshot = _populate_cache(cache, REPO, {n: FILES[n] for n in ("qwq-32b-q4_k_m.gguf", "qwq-32b-q8_0.gguf")})
    (snapshot / "qwq-32b-q4_k_m.gguf").resolve().unlink()  # its blob removed by hand
    (cache / "models--stray-file").write_text("not a repo")
    (cache / "models--no--snapshots").mkdir()
    assert hub.resolve_model("qwq:q8_0") == snapshot / "qwq-32b-q8_0.gguf"
    [model] = hub.list_models()
    assert (model.name, model.path, model.size) == ("qwq:q8_0", snapshot / "qwq-32b-q8_0.gguf",
                                                    len(FILES["qwq-32b-q8_0.gguf"]))
    assert model.revision == COMMIT and model.complete and not model.verified


def test_revisions_and_refs_cannot_lead_outside_the_cache(env, tmp_path):
    cache = env / "hf" / "hub"
    _populate_cache(cache, REPO, {"qwq-32b-q8_0.gguf": FILES["qwq-32b-q8_0.gguf"]})
    outside = tmp_path / "outside"
    (outside / "snapshots" / "x").mkdir(parents=True)
    (outside / "snapshots" / "x" / "qwq-32b-q8_0.gguf").write_bytes(b"GGUF")
    (outside / "ref").write_text("../../../outside/snapshots/x")
    storage = cache / "models--Qwen--QwQ-32B-GGUF"
    (storage / "refs" / "evil").write_text("../../../../outside/snapshots/x")
    ref = hub_cache.parse_model_name("qwq:q8_0")
    for revision in ("evil", "../../../../outside/ref", str(outside / "ref")):
        with pytest.raises(errors.ModelNotFoundError, match="not in the local cache"):
            hub_cache.find_cached(ref, revision=revision)
    assert hub_cache.find_cached(ref) == [storage / "snapshots" / COMMIT / "qwq-32b-q8_0.gguf"]


def test_offline_pull_removes_a_corrupted_cached_blob(env, monkeypatch):
    cache = env / "hf" / "hub"
    snapshot = _populate_cache(cache, REPO, {"qwq-32b-q4_k_m.gguf": FILES["qwq-32b-q4_k_m.gguf"]})
    blob = (snapshot / "qwq-32b-q4_k_m.gguf").resolve()
    blob.write_bytes(b"bit rot" + blob.read_bytes()[7:])
    _offline(monkeypatch)
    with pytest.raises(errors.HubError, match="removed"):
        hub.pull()
    assert not blob.exists() and not (snapshot / "qwq-32b-q4_k_m.gguf").is_symlink()
    with pytest.raises(errors.ModelNotFoundError, match="qwq-local pull --quant Q4_K_M"):
        hub.resolve_model("qwq:q4_k_m")


def test_resolve_paths_and_missing_names(env, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve_model(f) == f
    assert hub.resolve_model(str(f)) == f
    with pytest.raises(errors.ModelNotFoundError, match="no such file: .*nope.gguf"):
        hub.resolve_model(tmp_path / "nope.gguf")
    with pytest.raises(errors.ModelNotFoundError, match="is a directory"):
        hub.resolve_model(tmp_path)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(errors.BadModelFileError, match="fifo.gguf is not a regular file"):
        hub.resolve_model(fifo)
    # Any OSError from the file system is one clear error, not a traceback.
    with pytest.raises(errors.ModelNotFoundError, match="cannot use .*: File name too long"):
        hub.resolve_model(str(tmp_path / ("a" * 300)))
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    with pytest.raises(errors.ModelNotFoundError, match="symbolic links"):
        hub.resolve_model(loop)
    with pytest.raises(errors.ModelNotFoundError) as exc:
        hub.resolve_model("qwq:q8_0")
    assert "`qwq-local pull --quant Q8_0`" in str(exc.value)
    with pytest.raises(errors.ModelNotFoundError, match="--repo someone/x-GGUF"):
        hub.resolve_model("someone/x-GGUF:q4_0")


def test_incomplete_split_in_cache_says_to_finish_it(env):
    cache = env / "hf" / "hub"
    first, second = list(SPLIT)[:2]
    _populate_cache(cache, REPO, {first: SPLIT[first], second: SPLIT[second]})
    quant = hub_cache.quant_of(first)
    with pytest.raises(errors.ModelNotFoundError, match="only some parts"):
        hub.resolve_model(f"qwq:{quant}")
    [model] = hub.list_models()
    assert not model.complete


# --- CLI ------------------------------------------------------------------------------------


def test_cli_pull_and_list(fake_hub, env):
    from typer.testing import CliRunner

    from qwq_local.cli import app

    runner = CliRunner()
    data = FILES["qwq-32b-q4_k_m.gguf"]
    result = runner.invoke(app, ["pull", "--quant", "Q4_K_M"])
    assert result.exit_code == 0, result.output
    assert f"verified sha256 {_sha(data)}" in result.output
    path = hub.resolve_model("qwq:q4_k_m")
    assert str(path) in result.output

    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert row["name"] == "qwq:q4_k_m" and row["verified"] is True and row["path"] == str(path)
    assert row["size"] == len(data) and row["quant"] == "Q4_K_M"

    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    header, line = result.output.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "QUANT", "SIZE", "VERIFIED"]
    assert line.split()[0] == "qwq:q4_k_m" and "yes" in line.split() and str(path) in line


def test_cli_errors_and_empty_list(fake_hub, env):
    from typer.testing import CliRunner

    from qwq_local.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and "qwq-local pull" in result.output
    result = runner.invoke(app, ["pull", "--quant", "Q2_K"])
    assert result.exit_code == errors.ModelNotFoundError.exit_code
    assert "error: " in result.output and "available quants" in result.output
    fake_hub.serve_instead(REPO, "qwq-32b-q8_0.gguf", b"\x00" * len(FILES["qwq-32b-q8_0.gguf"]))
    result = runner.invoke(app, ["pull", "--quant", "q8_0"])
    assert result.exit_code == errors.HubError.exit_code and "removed" in result.output


def test_cli_subprocess_reads_hf_environment_variables(fake_hub, tmp_path):
    """The real entry point with HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE set before import."""
    env = {
        **os.environ,
        "HF_ENDPOINT": fake_hub.url,
        "HF_HOME": str(tmp_path / "home"),
        "QWQ_LOCAL_CACHE": str(tmp_path / "qc"),
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    run = lambda *args, **extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "qwq_local.cli", *args], env={**env, **extra}, capture_output=True, text=True, timeout=120
    )
    pulled = run("pull", "--quant", "Q8_0")
    assert pulled.returncode == 0, pulled.stderr
    assert str(tmp_path / "home" / "hub" / "models--Qwen--QwQ-32B-GGUF") in pulled.stdout
    fake_hub.stop()
    offline = run("pull", "--quant", "Q8_0", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    missing = run("pull", "--quant", "Q4_K_M", HF_HUB_OFFLINE="1")
    assert missing.returncode == errors.ModelNotFoundError.exit_code
    assert "qwq-local pull --quant Q4_K_M" in missing.stderr
