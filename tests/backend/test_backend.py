"""backend: the extra-buffer-type (AMX/repack) probe and its overrides, with real children and
real llama.cpp loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwq_local.backend import binding as backend
from qwq_local.backend import probe
from qwq_local import constants


@pytest.fixture
def fresh_probe_state(monkeypatch, tmp_path):
    monkeypatch.setenv(constants.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(constants.ENV_AMX, raising=False)
    saved = backend._STATE.pop("extra_bufts", None)
    yield tmp_path / "cache"
    backend._STATE.pop("extra_bufts", None)
    if saved is not None:
        backend._STATE["extra_bufts"] = saved


@pytest.fixture
def count_children(monkeypatch):
    calls: list[list[str]] = []
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


@pytest.fixture(scope="module")
def probe_model(tmp_path_factory):
    """A Q4_K_M model: the quantized case that llama.cpp repacks into extra buffer types."""
    return backend._write_probe_models(tmp_path_factory.mktemp("probe"))[1]


def stored(cache) -> dict:
    return json.loads((cache / constants.PROBE_RECORD_FILE).read_text())["records"]


def test_probe_runs_one_child_then_is_cached(fresh_probe_state, count_children):
    """The real probe on the real build: one child, a record under this build's key that lists
    the loaded libraries, then no child (in this process, and in a new one reading the file)."""
    first = backend.extra_bufts_allowed()
    assert len(count_children) == 1
    assert "--probe-extra-bufts" in count_children[0]
    key = backend.build_key()
    record = stored(fresh_probe_state)[key]
    assert record["ok"] is first and record["key"] == key and record["reason"]
    assert record["libraries"] == probe.library_fingerprint(backend.loaded_libraries())
    assert backend.probe_record() == record
    assert backend.extra_bufts_allowed() is first
    assert len(count_children) == 1  # second call: in-memory answer, no child
    backend._STATE.pop("extra_bufts")
    assert backend.extra_bufts_allowed() is first
    assert len(count_children) == 1  # a new process would read the file: still no child


def test_old_and_foreign_records_are_not_trusted(fresh_probe_state, count_children):
    fresh_probe_state.mkdir(parents=True)
    # The pre-build-key format (version + CPU only), then a record for another build's key.
    (fresh_probe_state / constants.PROBE_RECORD_FILE).write_text(json.dumps({"key": "0.3.36|cpu", "ok": True}))
    backend.extra_bufts_allowed()
    assert len(count_children) == 1
    backend._STATE.pop("extra_bufts")
    (fresh_probe_state / constants.PROBE_RECORD_FILE).write_text(
        json.dumps({"records": {"another build": {"ok": True, "reason": "x"}}}))
    backend.extra_bufts_allowed()
    assert len(count_children) == 2


def test_the_loaded_libraries_are_the_mapped_ones():
    """dladdr finds the files llama.cpp's code runs from: every libllama/libggml the process has
    mapped (Linux shows them in /proc/self/maps) is in the key, and libllama and ggml-cpu are."""
    libs = backend.loaded_libraries()
    names = [p.name for p in libs]
    assert any(n.startswith("libllama") for n in names) and any(n.startswith("libggml-cpu") for n in names)
    maps = Path("/proc/self/maps")
    if maps.exists():
        mapped = {Path(ln.split()[-1]).resolve() for ln in maps.read_text().splitlines()
                  if re.search(r"/lib(llama|ggml)[^/]*$", ln)}
        assert mapped and mapped <= set(libs)


def fake_build(directory: Path, *, cpu_bytes: bytes = b"cpu kernels") -> list[Path]:
    """A llama.cpp build's file layout with real (tiny) files: libllama + libggml* + symlinks,
    and neighbours that are not part of the key."""
    directory.mkdir(parents=True)
    for name, data in (("libllama.so.0.5.0", b"llama"), ("libggml-base.so", b"base"), ("libggml.so", b"ggml"),
                       ("libggml-cpu.so", cpu_bytes), ("libmtmd.so", b"mtmd"), ("libfoo.so", b"foo"),
                       ("notes.txt", b"x")):
        (directory / name).write_bytes(data)
    (directory / "libllama.so").symlink_to("libllama.so.0.5.0")
    return probe.native_libraries([directory / "libllama.so", directory / "libggml-base.so"])


def test_native_libraries_are_libllama_and_every_libggml_beside_it(tmp_path):
    libs = fake_build(tmp_path / "build")
    assert [p.name for p in libs] == ["libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so.0.5.0"]
    assert all(p.is_absolute() and not p.is_symlink() for p in libs)


OK = [sys.executable, "-c", "print('probe-ok')"]
CRASH = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


def test_two_builds_keep_a_verdict_each(fresh_probe_state, tmp_path, count_children):
    """The issue's case: two builds of one llama-cpp-python version, one whose AMX kernels
    crash (a native build on an AMX CPU) and one without them: each gets its own record, and
    neither verdict leaks to the other."""
    native = fake_build(tmp_path / "native", cpu_bytes=b"amx + repack kernels")
    portable = fake_build(tmp_path / "portable", cpu_bytes=b"repack kernels")
    assert backend.extra_bufts_allowed(libraries=native, command=CRASH) is False
    assert backend.extra_bufts_allowed(libraries=portable, command=OK) is True
    assert len(count_children) == 2
    records = stored(fresh_probe_state)
    assert len(records) == 2
    assert {r["ok"] for r in records.values()} == {False, True}
    assert "SIGSEGV" in records[backend.build_key(native)]["reason"]
    # Each verdict is read back for its own build (a probe now would flip them: none runs).
    assert backend.extra_bufts_allowed(libraries=native, command=OK) is False
    assert backend.extra_bufts_allowed(libraries=portable, command=CRASH) is True
    assert len(count_children) == 2


@pytest.mark.parametrize("change", ["mtime", "size", "new backend"])
def test_a_changed_build_is_probed_again(fresh_probe_state, tmp_path, count_children, change):
    libs = fake_build(tmp_path / "build")
    key = backend.build_key(libs)
    assert backend.extra_bufts_allowed(libraries=libs, command=OK) is True
    assert backend.extra_bufts_allowed(libraries=libs, command=CRASH) is True
    assert len(count_children) == 1
    cpu = tmp_path / "build" / "libggml-cpu.so"
    if change == "mtime":  # a rebuild that happens to produce the same size
        st = cpu.stat()
        os.utime(cpu, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif change == "size":
        cpu.write_bytes(b"rebuilt with other kernels")
    else:
        (tmp_path / "build" / "libggml-cuda.so").write_bytes(b"cuda")
    libs = probe.native_libraries([tmp_path / "build" / "libllama.so"])
    assert backend.build_key(libs) != key
    assert backend.extra_bufts_allowed(libraries=libs, command=CRASH) is False
    assert len(count_children) == 2
    assert len(stored(fresh_probe_state)) == 2


def test_records_are_bounded(fresh_probe_state, monkeypatch):
    monkeypatch.setattr(constants, "PROBE_RECORD_MAX", 3)
    for i in range(5):
        probe.store_probe_record(f"k{i}", {"ok": True, "reason": "r"})
    assert sorted(stored(fresh_probe_state)) == ["k2", "k3", "k4"]


def test_env_off_forces_no_extra_buffers_on_a_loaded_model(monkeypatch, probe_model, count_children):
    monkeypatch.setenv(constants.ENV_AMX, "off")
    assert backend.extra_bufts_allowed() is False
    with backend.capture_log() as log:
        model = backend.Model.load(probe_model)
    try:
        assert model.extra_bufts is False
        buffers = [ln for ln in "".join(log).splitlines() if "model buffer size" in ln]
        assert buffers and not [ln for ln in buffers if "REPACK" in ln or "AMX" in ln]
    finally:
        model.close()
    assert count_children == []  # the override needs no probe


def test_env_on_really_uses_extra_buffers(monkeypatch, probe_model):
    """The counterpart of the test above: shows the log check can see extra buffers."""
    monkeypatch.setenv(constants.ENV_AMX, "on")
    with backend.capture_log() as log:
        model = backend.Model.load(probe_model)
    try:
        assert model.extra_bufts is True
        assert [ln for ln in "".join(log).splitlines() if "model buffer size" in ln and ("REPACK" in ln or "AMX" in ln)]
    finally:
        model.close()


def test_env_off_reaches_the_runtime(monkeypatch, tiny_gguf_q4km):
    from qwq_local import QwQ

    monkeypatch.setenv(constants.ENV_AMX, "off")
    with QwQ.load(tiny_gguf_q4km, n_ctx=256, gpu_layers=0) as model:
        assert model.extra_bufts is False
        assert model.chat([{"role": "user", "content": "hi " * 20}], max_tokens=4).usage["prompt_tokens"] > 20


def test_crashing_child_is_classified_not_ok():
    result = backend.probe_extra_bufts(
        command=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert result["ok"] is False
    assert "SIGSEGV" in result["reason"]


def test_failing_and_passing_children_are_classified():
    failed = backend.probe_extra_bufts(command=[sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    assert failed["ok"] is False and "exited 3" in failed["reason"] and "boom" in failed["reason"]
    passed = backend.probe_extra_bufts(command=[sys.executable, "-c", "print('probe-ok')"])
    assert passed["ok"] is True


def test_hanging_child_times_out():
    result = backend.probe_extra_bufts(command=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=1.0)
    assert result["ok"] is False and "timed out" in result["reason"]


@pytest.mark.parametrize("text", ["a\ud800b", "a\udcffb"])
def test_text_that_is_not_unicode_is_a_usage_error(tiny_gguf, text):
    """A JSON "\\ud800" escape, or an argv byte that is not UTF-8 (kept as U+DCxx by Python),
    cannot be encoded for llama.cpp: a UsageError naming the character, not UnicodeEncodeError."""
    from qwq_local.errors import UsageError

    with backend.Model.load(tiny_gguf) as model:
        with pytest.raises(UsageError, match=r"not valid Unicode: it holds '\\ud[8c][0f]{2}', half of a UTF-16"):
            model.tokenize(text)
        assert model.tokenize("ab") == model.tokenize("ab")  # the model still works
