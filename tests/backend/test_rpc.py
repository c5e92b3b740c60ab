"""llama.cpp's RPC backend through backend/rpc.py: this build has it, workers answer with their
memory, faults are one-line RpcErrors naming the worker, and a worker killed mid-generation does
not take the client process down (tests/conftest.py starts real workers on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qwq_local.backend import binding as backend
from qwq_local.backend import rpc
from qwq_local.errors import RpcError, UsageError
from tests.conftest import free_port, start_worker


def test_this_build_has_rpc_in_the_ggml_registry():
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    assert list(lib_dir.glob("*ggml-rpc*")), "the wheel was built without GGML_RPC"
    assert rpc.has_rpc() and rpc.rpc_reg() is not None
    assert "--force-reinstall --no-cache-dir" in rpc.no_rpc_message()


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:50052", ["127.0.0.1:50052"]),
    (" a:1 , b:02 ", ["a:1", "b:2"]),
    (["h:7"], ["h:7"]),
])
def test_endpoints_parse(text, expected):
    assert rpc.parse_endpoints(text) == expected


@pytest.mark.parametrize("text", ["localhost", "h:", ":5", "h:0", "h:70000", "h:x", "::1:5", "a:1,a:1"])
def test_bad_endpoints_are_usage_errors(text):
    with pytest.raises(UsageError):
        rpc.parse_endpoints(text)


def test_probe_asks_the_worker_for_its_memory(rpc_workers):
    devices = rpc.probe(rpc_workers[0])
    assert len(devices) == 1
    assert devices[0].endpoint == rpc_workers[0] and 0 < devices[0].free <= devices[0].total


def test_unreachable_worker_is_one_line_error_naming_it():
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(RpcError, match=f"RPC worker {endpoint} is unreachable") as info:
        rpc.connect([endpoint])
    assert "\n" not in str(info.value)


def test_busy_worker_is_reported_not_waited_for(rpc_workers, tiny_gguf):
    """A worker serves one client at a time: a second client's probe gets an answer-less
    connection, which must end in an error within the probe timeout."""
    proc, endpoint = start_worker()
    try:
        devs = rpc.connect([endpoint])
        guard = rpc.RpcGuard([endpoint], timeout=30)
        model = backend.Model.load(tiny_gguf, n_gpu_layers=99, devices=[devs[0].ptr], guard=guard)
        t0 = time.monotonic()
        with pytest.raises(RpcError, match="serving another client"):
            rpc.probe(endpoint, timeout=3)
        assert time.monotonic() - t0 < 10
        model.close()
    finally:
        proc.kill()
        proc.wait()


def test_killed_worker_mid_generation_is_an_error_and_the_model_loads_again(tiny_gguf):
    from qwq_local.runtime.model import QwQ

    # Own workers: a lost model makes its workers unusable for the rest of this process.
    survivor_proc, survivor = start_worker()
    rpc_workers = [survivor]
    proc, doomed = start_worker()
    messages = [{"role": "user", "content": "Count to twenty."}]
    try:
        llm = QwQ.load(tiny_gguf, n_ctx=256, rpc=[rpc_workers[0], doomed], gpu_layers=2, seed=1)
        assert len(llm._model.devices) == 2
        events = llm.stream(messages, temperature=0, max_tokens=200, ignore_eos=True)
        next(events)
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        with pytest.raises(RpcError) as info:
            for _ in events:
                pass
        assert time.monotonic() - t0 < 5
        message = str(info.value)
        assert message.startswith(f"lost the RPC worker {doomed}:") and "\n" not in message
        assert f"other workers ({rpc_workers[0]}) were released" in message
        llm.close()  # abandons the model; must not hang
    finally:
        proc.kill()
    # This process loads again without the workers; the surviving worker serves a new process.
    local = QwQ.load(tiny_gguf, n_ctx=256, gpu_layers=0, seed=1)
    b = local.chat(messages, temperature=0, max_tokens=12)
    local.close()
    with pytest.raises(RpcError, match="lost earlier"):
        rpc.probe(doomed)
    with pytest.raises(RpcError, match="lost earlier"):
        rpc.probe(rpc_workers[0])
    code = ("import sys, json; from qwq_local.runtime.model import QwQ; "
            f"m = QwQ.load(sys.argv[1], n_ctx=256, rpc=[{rpc_workers[0]!r}], gpu_layers=2, seed=1); "
            f"r = m.chat({messages!r}, temperature=0, max_tokens=12); print(json.dumps([r.thinking, r.content]))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], capture_output=True, text=True, timeout=120)
    survivor_proc.kill()
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [b.thinking, b.content]


def test_split_across_local_and_two_workers_matches_local_logits(rpc_workers, tiny_gguf_f32):
    from qwq_local.plan.devices import load_options_for_workers

    tokens = list(range(5, 45))
    local = backend.Model.load(tiny_gguf_f32, n_gpu_layers=0)
    ctx = backend.Context(local, n_ctx=128, n_threads=1, logits_all=True)
    ctx.decode(tokens, logits="all")
    ref = np.stack([ctx.logits(i).copy() for i in range(len(tokens))])
    ctx.close()
    local.close()
    # 2 of the 3 offloadable layers: block 0 stays local, block 1 and the output go one per worker
    layers, _why, extra = load_options_for_workers(tiny_gguf_f32, rpc_workers, n_ctx=128, gpu_layers=2)
    assert layers == 2 and extra["tensor_split"] == [1.0, 1.0]
    with backend.capture_log() as log:
        model = backend.Model.load(tiny_gguf_f32, n_gpu_layers=layers, **extra)
    text = "".join(log)
    for endpoint in rpc_workers:
        assert f"RPC0[{endpoint}] model buffer size" in text
    ctx = backend.Context(model, n_ctx=128, n_threads=1, logits_all=True)
    ctx.decode(tokens, logits="all")
    got = np.stack([ctx.logits(i).copy() for i in range(len(tokens))])
    ctx.close()
    model.close()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_a_worker_that_dies_between_calls_is_an_error_at_the_next_call(tiny_gguf, monkeypatch):
    """ggml-rpc's connection thread sees a dropped socket at once, between two of our calls: the
    next call must not wait on that connection (until QWQ_LOCAL_RPC_TIMEOUT) but fail now."""
    from qwq_local import constants
    from qwq_local.runtime.model import QwQ

    monkeypatch.setenv(constants.ENV_RPC_TIMEOUT, "60")
    proc, endpoint = start_worker()
    messages = [{"role": "user", "content": "Count to twenty."}]
    try:
        llm = QwQ.load(tiny_gguf, n_ctx=256, rpc=[endpoint], gpu_layers=2, seed=1)
        llm.chat(messages, temperature=0, max_tokens=4)
        proc.kill()
        proc.wait()
        time.sleep(1)
        t0 = time.monotonic()
        with pytest.raises(RpcError, match=f"lost the RPC worker {endpoint}"):
            llm.chat(messages, temperature=0, max_tokens=4)
        assert time.monotonic() - t0 < 10
        llm.close()  # abandons the model; must not hang
    finally:
        proc.kill()
