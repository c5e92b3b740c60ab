"""llama.cpp's RPC backend (ggml-rpc): serve this machine's devices to other hosts (a worker),
and use other hosts' devices as offload targets (a client).

Everything goes through the ggml backend registry of the llama.cpp library llama-cpp-python
ships: the "RPC" registry entry and its `ggml_backend_rpc_add_server` /
`ggml_backend_rpc_start_server` proc addresses, which is how llama.cpp's own `--rpc` option and
`rpc-server` tool reach them (common/arg.cpp, tools/rpc/rpc-server.cpp). No protocol of our own.

Faults. ggml-rpc's client calls GGML_ABORT when a connection fails or drops
(ggml/src/ggml-rpc/ggml-rpc.cpp: `RPC_STATUS_ASSERT`, `rpc_dispatcher::start`), which would kill
the whole process. So:
- a worker is first probed in a child process (`python -m qwq_local.backend --rpc-probe EP`):
  unreachable, busy (a worker serves one client at a time: it accepts the TCP connection and then
  does not answer) or not an RPC worker gives a one-line RpcError naming it;
- every llama.cpp call on a model that uses workers (decode, and the sampler and logits reads,
  which wait for the workers' results) runs on a helper thread (`RpcGuard.call`),
  and ggml's abort hook (`ggml_set_abort_callback`) parks a thread that is about to abort
  because of RPC instead of letting it abort(). The caller gets RpcError within the timeout
  (QWQ_LOCAL_RPC_TIMEOUT, default 300 s per call; a killed worker is seen at once). The parked
  threads and the lost model's memory stay allocated until the process ends (freeing them would
  need the dead worker); loading again, without that worker, works.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import constants
from ..errors import RpcError, UsageError
from .binding import llama

_STATE: dict[str, Any] = {}
_LOCK = threading.Lock()
# Endpoints of models lost in this process: ggml-rpc keeps one connection (dispatcher) per
# endpoint, the lost model holds it and it is shut down, so reconnecting needs a new process.
_LOST: set[str] = set()

# ggml_backend_dev_type (ggml-backend.h)
DEV_TYPE_NAMES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}


def no_rpc_message() -> str:
    return ("this llama.cpp build has no RPC backend (GGML_RPC); rebuild llama-cpp-python with it: "
            + constants.RPC_INSTALL_FIX)


def ggml():
    """libggml from llama-cpp-python's lib/ folder, with the registry calls we use typed."""
    lib = _STATE.get("ggml")
    if lib is not None:
        return lib
    import llama_cpp

    llama()  # loads libllama and its ggml backends first
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    names = ("libggml.so", "libggml.dylib", "ggml.dll", "libggml.dll")
    path = next((lib_dir / n for n in names if (lib_dir / n).exists()), None)
    if path is None:  # pragma: no cover - every llama-cpp-python wheel ships it
        raise RpcError(f"no libggml in {lib_dir}; reinstall llama-cpp-python: {constants.RPC_INSTALL_FIX}")
    lib = ctypes.CDLL(str(path))
    p, sz, s = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    for name, args, res in (
        ("ggml_backend_reg_by_name", [s], p), ("ggml_backend_reg_get_proc_address", [p, s], p),
        ("ggml_backend_reg_dev_count", [p], sz), ("ggml_backend_reg_dev_get", [p, sz], p),
        ("ggml_backend_dev_count", [], sz), ("ggml_backend_dev_get", [sz], p),
        ("ggml_backend_dev_by_name", [s], p), ("ggml_backend_dev_name", [p], s),
        ("ggml_backend_dev_description", [p], s), ("ggml_backend_dev_type", [p], ctypes.c_int),
        ("ggml_backend_dev_memory", [p, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
        ("ggml_set_abort_callback", [p], p),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    _STATE["ggml"] = lib
    return lib


def rpc_reg():
    """The RPC backend's registry entry, or None when this build has no GGML_RPC."""
    return ggml().ggml_backend_reg_by_name(b"RPC") or None


def has_rpc() -> bool:
    """Whether this llama.cpp build has the RPC backend (llama_supports_rpc and the registry)."""
    try:
        return bool(llama().llama_supports_rpc()) and rpc_reg() is not None
    except (OSError, AttributeError):
        return False


def require_rpc() -> None:
    """RpcError with the one-line fix when this build has no RPC backend."""
    if not has_rpc():
        raise RpcError(no_rpc_message())


def _proc(name: str, restype, argtypes):
    require_rpc()
    addr = ggml().ggml_backend_reg_get_proc_address(rpc_reg(), name.encode())
    if not addr:  # pragma: no cover - both are exported by every ggml-rpc of this API
        raise RpcError(f"the RPC backend does not export {name}; {constants.RPC_INSTALL_FIX}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


# ---------------------------------------------------------------------------------------------
# Endpoints and devices
# ---------------------------------------------------------------------------------------------

def parse_endpoints(value: str | Sequence[str] | None) -> list[str]:
    """"HOST:PORT[,HOST:PORT...]" (or a list of them) -> ["HOST:PORT", ...], checked.

    llama.cpp splits an endpoint at its first ':' (ggml-rpc.cpp parse_endpoint), so IPv6
    literals are not supported there; neither are they here."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    endpoints: list[str] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        host, sep, port = item.partition(":")
        if not sep or not host or ":" in port or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"RPC worker {item!r} is not HOST:PORT (e.g. 192.168.1.20:{constants.DEFAULT_RPC_PORT})")
        endpoint = f"{host}:{int(port)}"
        if endpoint in endpoints:
            raise UsageError(f"RPC worker {endpoint} is listed twice")
        endpoints.append(endpoint)
    return endpoints


@dataclass(frozen=True)
class RpcDevice:
    """One device a worker serves: name as llama.cpp logs its buffers ("RPC0"), the worker's
    endpoint, memory in bytes as the worker reports it (ggml_backend_dev_memory over RPC)."""

    endpoint: str
    index: int
    free: int
    total: int
    name: str = ""
    ptr: int | None = None


def _dev_memory(dev) -> tuple[int, int]:
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    ggml().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


def local_devices() -> list[dict]:
    """This machine's ggml devices: [{"name", "description", "type", "free", "total", "ptr"}]
    (bytes; ptr: the ggml_backend_dev_t)."""
    lib = ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = _dev_memory(dev)
        out.append({"name": lib.ggml_backend_dev_name(dev).decode(), "type": DEV_TYPE_NAMES.get(lib.ggml_backend_dev_type(dev), "?"),
                    "description": lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                    "free": free, "total": total, "ptr": dev})
    return out


def probe(endpoint: str, *, timeout: float = constants.RPC_PROBE_TIMEOUT_S) -> list[RpcDevice]:
    """Ask a worker for its devices and their memory, from a child process (a failed connection
    aborts the process that makes it). RpcError naming the worker when it cannot answer."""
    require_rpc()
    if endpoint in _LOST:
        raise RpcError(f"RPC worker {endpoint} served a model lost earlier in this process; "
                       "start a new process to use it again")
    host, _, port = endpoint.partition(":")
    try:  # a fast, precise answer for the common faults (nothing listening, no route)
        with socket.create_connection((host, int(port)), timeout=min(timeout, 5.0)):
            pass
    except OSError as exc:
        raise RpcError(f"RPC worker {endpoint} is unreachable ({exc.strerror or exc}); "
                       f"start it there with `qwq-local worker --expose --host ADDR --port {port}`") from None
    cmd = [sys.executable, "-m", "qwq_local.backend", "--rpc-probe", endpoint]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RpcError(f"RPC worker {endpoint} accepted the connection but did not answer in {timeout:.0f}s: "
                       "it is serving another client (a worker serves one at a time) or is not a "
                       "qwq-local/llama.cpp RPC worker") from None
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), "")
    if proc.returncode != 0 or not line:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        raise RpcError(f"RPC worker {endpoint} did not answer as an RPC worker of this protocol "
                       f"(probe exited {proc.returncode}: {tail or 'no output'}); run the same "
                       "qwq-local and llama-cpp-python version on both sides")
    return [RpcDevice(endpoint=endpoint, index=i, free=d["free"], total=d["total"])
            for i, d in enumerate(json.loads(line)["devices"])]


def probe_child_main(endpoint: str) -> int:
    """The probe child: connect, list the worker's devices with their memory, print JSON."""
    add_server = _proc("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    reg = add_server(endpoint.encode())
    lib = ggml()
    devices = []
    for i in range(lib.ggml_backend_reg_dev_count(reg) if reg else 0):
        free, total = _dev_memory(lib.ggml_backend_reg_dev_get(reg, i))
        devices.append({"free": free, "total": total})
    print(json.dumps({"endpoint": endpoint, "devices": devices}), flush=True)
    return 0


def connect(endpoints: Sequence[str], *, timeout: float = constants.RPC_PROBE_TIMEOUT_S) -> list[RpcDevice]:
    """Probe each worker, then register it in this process (`ggml_backend_rpc_add_server`).

    Returns its devices in llama.cpp's order, with `ptr` (a ggml_backend_dev_t for
    llama_model_params.devices) and `name` ("RPC0", "RPC1"... as llama.cpp logs buffers)."""
    require_rpc()
    for endpoint in endpoints:
        probe(endpoint, timeout=timeout)
    add_server = _proc("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    lib = ggml()
    out: list[RpcDevice] = []
    guard = RpcGuard(list(endpoints), timeout=timeout)
    for endpoint in endpoints:
        reg = guard.call(add_server, endpoint.encode())
        if not reg:
            raise RpcError(f"RPC worker {endpoint} serves no device")
        for i in range(lib.ggml_backend_reg_dev_count(reg)):
            dev = lib.ggml_backend_reg_dev_get(reg, i)
            free, total = guard.call(_dev_memory, dev)
            out.append(RpcDevice(endpoint=endpoint, index=i, free=free, total=total,
                                 name=lib.ggml_backend_dev_name(dev).decode(), ptr=dev))
    return out


# ---------------------------------------------------------------------------------------------
# The fault guard
# ---------------------------------------------------------------------------------------------

class _Parked(Exception):
    pass


def _on_abort(message: bytes | None) -> None:
    """ggml's abort hook: park the thread when the abort comes from a dropped RPC connection
    (the caller raises RpcError); return otherwise (ggml then aborts as it would have)."""
    text = (message or b"").decode("utf-8", errors="replace")
    if ("RPC" not in text and "rpc" not in text) or threading.current_thread() is threading.main_thread():
        return  # not ours, or nobody would be left to report it: abort as ggml would
    _STATE.setdefault("aborts", []).append(text.strip())
    threading.Event().wait()  # never returns: this thread would have called abort()


def install_abort_hook() -> None:
    with _LOCK:
        if "abort_cb" in _STATE:
            return
        cb = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(_on_abort)
        _STATE["abort_cb"] = cb  # must outlive every call into ggml
        ggml().ggml_set_abort_callback(ctypes.cast(cb, ctypes.c_void_p))


def rpc_timeout() -> float:
    raw = os.environ.get(constants.ENV_RPC_TIMEOUT, "").strip()
    try:
        return float(raw) if raw else constants.DEFAULT_RPC_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{constants.ENV_RPC_TIMEOUT} must be a number of seconds, not {raw!r}") from None


class RpcGuard:
    """Runs llama.cpp calls that may talk to workers on a helper thread, with a deadline.

    `call(fn, *args)` returns fn's result, or raises RpcError (naming the workers) when an RPC
    connection dropped (ggml's abort hook fired) or the call passed the deadline. After that the
    guard is `lost`: the model must be abandoned (not freed; see the module docstring)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float | None = None):
        install_abort_hook()
        self.endpoints = list(endpoints)
        self.timeout = rpc_timeout() if timeout is None else float(timeout)
        self.lost: str | None = None
        self._seen = len(_STATE.get("aborts", []))  # aborts already known not to be this model's
        # One long-lived thread for every call: ggml's CPU backend keeps an OpenMP thread team
        # per calling OS thread, so a new thread per call would build a new team per decode.
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _serve(self) -> None:
        while True:
            fn, args, box, done = self._calls.get()
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc
            done.set()

    def _fail(self, why: str) -> RpcError:
        self.lost = why
        release_connections(self.endpoints)
        dead = [ep for ep in self.endpoints if not _listening(ep)] or self.endpoints
        # ggml-rpc keeps one connection per endpoint per process and the abandoned model holds it:
        # none of this model's workers can be used again by this process.
        _LOST.update(self.endpoints)
        others = [ep for ep in self.endpoints if ep not in dead]
        freed = f"; its other workers ({', '.join(others)}) were released for a new process" if others else ""
        return RpcError(f"lost the RPC worker {', '.join(dead)}: {why.split(': ')[-1]}; the model was "
                        f"abandoned: load it again without that worker{freed}")

    def call(self, fn: Callable, *args):
        if self.lost:
            raise RpcError(f"this model lost its RPC worker(s) {', '.join(self.endpoints)} ({self.lost}); load it again")
        aborts = _STATE.get("aborts", [])
        if len(aborts) > self._seen:
            # An abort came between calls (ggml-rpc's connection thread sees a dropped socket at
            # once): this call would wait on that connection forever. Ours if a worker is gone.
            if not all(_listening(ep) for ep in self.endpoints):
                raise self._fail(aborts[-1].splitlines()[0])
            self._seen = len(aborts)
        seen = len(aborts)
        box: dict[str, Any] = {}
        done = threading.Event()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="qwq-rpc-call", daemon=True)
            self._thread.start()
        self._calls.put((fn, args, box, done))
        waited = 0.0
        while not done.wait(0.05):
            waited += 0.05
            aborts = _STATE.get("aborts", [])
            if len(aborts) > seen:
                raise self._fail(aborts[-1].splitlines()[0])
            if waited >= self.timeout:
                raise self._fail(f"no answer in {self.timeout:.0f}s ({constants.ENV_RPC_TIMEOUT} sets the limit)")
        if "error" in box:
            raise box["error"]
        return box["value"]


def _addresses(endpoint: str) -> set[tuple[str, int]]:
    host, _, port = endpoint.partition(":")
    try:
        return {(info[4][0], int(port)) for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)}
    except OSError:
        return set()


def release_connections(endpoints: Sequence[str]) -> int:
    """Shut down this process's TCP connections to these workers (found by peer address among
    the open descriptors), so that a surviving worker of a lost model returns to accepting
    clients: a worker serves one client at a time, and the lost model can never be freed."""
    peers = set().union(*(_addresses(ep) for ep in endpoints)) if endpoints else set()
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    closed = 0
    for name in os.listdir(fd_dir):
        try:
            fd = os.dup(int(name))
        except (OSError, ValueError):
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        with sock:
            try:
                if sock.type == socket.SOCK_STREAM and sock.getpeername()[:2] in peers:
                    sock.shutdown(socket.SHUT_RDWR)
                    closed += 1
            except OSError:
                pass
    return closed


def _listening(endpoint: str, timeout: float = 2.0) -> bool:
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------

def worker_devices(names: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """[(name, ggml_backend_dev_t)] a worker serves: the named ones, else the accelerators
    (GPU/IGPU), else the CPU (rpc-server's default, tools/rpc/rpc-server.cpp get_devices)."""
    lib = ggml()
    if names:
        out = []
        for name in names:
            dev = lib.ggml_backend_dev_by_name(name.encode())
            if not dev:
                known = ", ".join(d["name"] for d in local_devices())
                raise UsageError(f"no device {name!r} here; this build has: {known}")
            out.append((name, dev))
        return out
    all_devs = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    gpus = [d for d in all_devs if lib.ggml_backend_dev_type(d) in (1, 2)]
    chosen = gpus or [d for d in all_devs if lib.ggml_backend_dev_type(d) == 0][:1]
    return [(lib.ggml_backend_dev_name(d).decode(), d) for d in chosen]


def check_port(host: str, port: int) -> None:
    """RpcError when the port cannot be bound (ggml-rpc only prints "Failed to create server
    socket" and returns). Same SO_REUSEADDR as ggml-rpc's server socket (transport.cpp)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(1)
    except OSError as exc:
        raise RpcError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                       f"(another worker there? pick another --port)") from None


def serve(*, host: str = constants.DEFAULT_RPC_HOST, port: int = constants.DEFAULT_RPC_PORT,
          threads: int | None = None, devices: Sequence[str] | None = None,
          cache_dir: Path | None = None) -> None:
    """Serve this machine's devices over RPC until the process is killed
    (`ggml_backend_rpc_start_server`: one client at a time, no authentication).

    cache_dir: where the worker keeps tensors by hash, so a client that loads the same model
    again sends hashes instead of the weights (rpc-server --cache). Errors: RpcError (no RPC in
    this build, port in use), UsageError (unknown device)."""
    require_rpc()
    if not 0 < int(port) < 65536:
        raise UsageError(f"--port must be 1..65535, not {port}")
    if ":" in host:
        raise UsageError("llama.cpp's RPC endpoints are HOST:PORT with an IPv4 address or a name, not IPv6")
    chosen = worker_devices(devices)
    check_port(host, int(port))
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        cache_dir.mkdir(parents=True, exist_ok=True)
    from .binding import default_threads

    start = _proc("ggml_backend_rpc_start_server", None,
                  [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p])
    arr = (ctypes.c_void_p * len(chosen))(*[d for _, d in chosen])
    start(f"{host}:{int(port)}".encode(), str(cache_dir).encode() if cache_dir else None,
          int(threads or default_threads()), len(chosen), arr)
    # start_server returns only when it could not start (it prints why on stderr).
    raise RpcError(f"the RPC worker on {host}:{port} stopped: {'; '.join(_STATE.get('aborts', [])) or 'see the log above'}")
