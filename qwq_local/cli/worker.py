"""`qwq-local worker`: serve this machine's llama.cpp devices to other hosts over RPC."""

import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .. import constants
from .app import command, err


@command("worker")
def worker_cmd(
    host: str = typer.Option(constants.DEFAULT_RPC_HOST, "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(constants.DEFAULT_RPC_PORT, "--port", help="TCP port to listen on."),
    expose: bool = typer.Option(False, "--expose", help="Allow a non-loopback --host (the protocol has no authentication)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the CPU device (default: physical cores)."),
    device: Optional[List[str]] = typer.Option(
        None, "--device", help="Device to serve, as ggml names it (CPU, CUDA0, Metal...); repeat or comma-separate. "
                               "Default: every GPU, else the CPU."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Keep received tensors here by hash, so the next load of the same model sends hashes, not weights."),
) -> None:
    """Serve this machine's CPU/GPU to `--rpc HOST:PORT` clients (llama.cpp's RPC backend), until Ctrl-C."""
    from ..backend import rpc
    from ..errors import UsageError
    from ..netutil import is_loopback

    rpc.require_rpc()
    if not is_loopback(host):
        if not expose:
            raise UsageError(f"--host {host} lets other machines use this one; add --expose to confirm "
                             "(the RPC protocol has no authentication)")
        err("warning: the RPC protocol has no authentication or encryption: anyone who reaches "
            f"{host}:{port} can run computations and read memory on this worker; use a private network "
            "or an SSH tunnel (docs/rpc.md)")
    names = [n.strip() for item in device or [] for n in item.split(",") if n.strip()]
    rpc.check_port(host, port)
    err(f"worker: serving on {host}:{port} (one client at a time); Ctrl-C stops it")
    sys.stdout.flush()
    # The server loop runs inside llama.cpp and never returns to Python: let SIGINT/SIGTERM end
    # the process directly instead of waiting for a Python handler that cannot run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    rpc.serve(host=host, port=port, threads=threads, devices=names or None, cache_dir=cache_dir)
