"""`qwq-local worker` and `--rpc` end to end (real workers on 127.0.0.1, tests/conftest.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qwq_local.backend import rpc
from qwq_local.cli import app
from tests.conftest import free_port

runner = CliRunner()
OPTS = ["--ctx", "256", "--seed", "3", "--max-tokens", "12", "--temperature", "0", "--json"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_run_across_two_workers_prints_the_split_and_the_local_text(rpc_workers, tiny_gguf):
    local = invoke("run", "-m", tiny_gguf, "hello", "--gpu-layers", "0", *OPTS)
    remote = invoke("run", "-m", tiny_gguf, "hello", "--gpu-layers", "2", "--rpc", ",".join(rpc_workers), *OPTS)
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    for endpoint in rpc_workers:
        assert f"RPC0[{endpoint}]" in remote.stderr
    pick = lambda r: {k: json.loads(r.stdout)[k] for k in ("thinking", "content")}  # noqa: E731
    assert pick(remote) == pick(local)


def test_plan_with_workers_json(rpc_workers, tiny_gguf):
    result = invoke("plan", "-m", tiny_gguf, "--ctx", "256", "--rpc", ",".join(rpc_workers), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["device"] for d in data["devices"]] == [f"RPC0[{e}]" for e in rpc_workers] + ["CPU"]
    assert data["fits"] and data["n_gpu_layers"] == 3


def test_unreachable_worker_is_one_line(tiny_gguf):
    endpoint = f"127.0.0.1:{free_port()}"
    result = invoke("run", "-m", tiny_gguf, "hi", "--rpc", endpoint, *OPTS)
    assert result.exit_code == 13
    assert result.stderr.strip().count("\n") == 0 and endpoint in result.stderr
    # serve takes --rpc too (issue 12; docs/rpc.md): the same one line, before it listens
    served = invoke("serve", "-m", tiny_gguf, "--port", "0", "--ctx", "256", "--rpc", endpoint)
    assert served.exit_code == 13 and endpoint in served.stderr and "serving" not in served.output


def test_worker_refuses_a_port_in_use_and_an_unconfirmed_public_host():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "qwq_local", "worker", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert busy.returncode == 13 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    public = invoke("worker", "--host", "0.0.0.0", "--port", free_port())
    assert public.exit_code == 2 and "--expose" in public.stderr


def test_doctor_says_rpc_is_available():
    result = invoke("doctor", "--json")
    assert json.loads(result.stdout)["rpc"] == {"available": True, "fix": None}


@pytest.mark.parametrize("args", [
    ["worker", "--port", "1"],
    ["plan", "-m", "MODEL", "--rpc", "127.0.0.1:1"],
    ["run", "-m", "MODEL", "hi", "--rpc", "127.0.0.1:1"],
    ["bench", "-m", "MODEL", "--rpc", "127.0.0.1:1"],
    ["serve", "-m", "MODEL", "--port", "0", "--rpc", "127.0.0.1:1"],
])
def test_a_build_without_rpc_fails_with_the_rebuild_command(monkeypatch, args, tiny_gguf):
    args = [str(tiny_gguf) if a == "MODEL" else a for a in args]
    # This machine's build has RPC; a build without it cannot run here, so only the check is faked.
    monkeypatch.setattr(rpc, "has_rpc", lambda: False)
    result = invoke(*args)
    assert result.exit_code == 13
    assert 'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir' in result.stderr
