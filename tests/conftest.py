"""Shared fixtures: tiny QwQ-shaped checkpoints and the GGUFs made from them, built once per
test session with the project's own converter and quantizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwq_local.synthetic.factory import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint converted to a bf16 GGUF."""
    from qwq_local.convert.pipeline import convert

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-bf16.gguf"
    convert(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf_f32(tmp_path_factory, tiny_checkpoint) -> Path:
    from qwq_local.convert.pipeline import convert

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-f32.gguf"
    convert(tiny_checkpoint, out, outtype="f32")
    return out


@pytest.fixture(scope="session")
def tiny_gguf_q4km(tmp_path_factory, tiny_gguf) -> Path:
    """Q4_K_M of the tiny model: the quantized case that trips llama.cpp's AMX kernel."""
    from qwq_local.quantize.quantizer import quantize

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-Q4_K_M.gguf"
    quantize(tiny_gguf, out, qtype="Q4_K_M")
    return out


@pytest.fixture(scope="session")
def k_gguf(tmp_path_factory) -> Path:
    """A tiny bf16 GGUF with 256-wide rows, so k-quants and i-quants apply without fallbacks."""
    from qwq_local.convert.pipeline import convert

    d = tmp_path_factory.mktemp("k-ckpt")
    ckpt = make_tiny_checkpoint(d / "ckpt", hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                intermediate_size=768)
    return convert(ckpt, d / "tiny256-bf16.gguf")


# --- llama.cpp RPC workers on 127.0.0.1 (issue #12) ----------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(port: int | None = None):
    """`qwq-local worker` in a subprocess on a free loopback port; returns (process, "HOST:PORT")
    once it accepts connections."""
    import socket
    import subprocess
    import sys
    import time

    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwq_local", "worker", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("worker did not start listening in 30 s")


@pytest.fixture(scope="session")
def rpc_workers():
    """Two workers for the whole session: ["127.0.0.1:P1", "127.0.0.1:P2"]."""
    started = [start_worker(), start_worker()]
    yield [endpoint for _proc, endpoint in started]
    for proc, _endpoint in started:
        proc.kill()
        proc.wait()
