"""backend: the extra-buffer-type (AMX/repack) probe and its overrides, with real children and
real llama.cpp loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwq_local.backend import binding as backend
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


def test_probe_runs_one_child_then_is_cached(fresh_probe_state, count_children):
    first = backend.extra_bufts_allowed()
    assert len(count_children) == 1
    assert "--probe-extra-bufts" in count_children[0]
    record = json.loads((fresh_probe_state / "extra_bufts_probe.json").read_text())
    assert record["ok"] is first and record["key"] and record["reason"]
    assert backend.extra_bufts_allowed() is first
    assert len(count_children) == 1  # second call: in-memory answer, no child
    backend._STATE.pop("extra_bufts")
    assert backend.extra_bufts_allowed() is first
    assert len(count_children) == 1  # a new process would read the file: still no child


def test_stale_probe_record_is_redone(fresh_probe_state, count_children):
    fresh_probe_state.mkdir(parents=True)
    (fresh_probe_state / "extra_bufts_probe.json").write_text(json.dumps({"key": "another build", "ok": True}))
    backend.extra_bufts_allowed()
    assert len(count_children) == 1


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
