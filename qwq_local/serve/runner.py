"""`qwq_local.serve(...)`: load the model, then serve it with uvicorn until Ctrl-C/SIGTERM.

Shutdown is clean: on the first signal the open streams end with an error event and the queue
is emptied, uvicorn stops accepting and lets responses finish, then the model is closed.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .. import constants
from ..errors import UsageError
from ..netutil import is_loopback

__all__ = ["serve", "check_host"]


def check_host(host: str, *, api_key: str | None, no_api_key: bool) -> str | None:
    """Refuse a non-loopback host without a key (unless no_api_key); returns a warning to show."""
    if is_loopback(host):
        return None
    if api_key:
        return None
    if not no_api_key:
        raise UsageError(f"--host {host} exposes the server beyond this machine: give --api-key KEY (or set "
                         f"{constants.ENV_API_KEY}), or pass --no-api-key to serve without one")
    return f"serving on {host} without an API key: anyone who can reach this port can use the model"


def serve(model: Any, *, host: str = constants.SERVE_DEFAULT_HOST, port: int = constants.SERVE_DEFAULT_PORT,
          api_key: str | None = None, no_api_key: bool = False, alias: str | None = None, cors: str | None = None,
          parallel: int = 1, queue_size: int = constants.SERVE_QUEUE_SIZE, special_in_content: bool = False,
          on_ready: Callable[[str], None] | None = None, log_level: str = "warning", **load: Any) -> None:
    """Serve `model` (a QwQ, a .gguf path or a cached name; **load goes to QwQ.load: n_ctx,
    gpu_layers, kv_type, threads, template, rope_scaling, rpc, draft, ...) on http://host:port/v1
    until interrupted. parallel: slots sharing one context (a loaded QwQ must have been loaded
    with the same `parallel`); n_ctx is then the whole KV cache, n_ctx // parallel per slot.

    on_ready(url) is called once the socket listens (port 0 picks a free port). Raises
    UsageError for a non-loopback host without api_key (see check_host), ContextOverflowError,
    RuntimeLoadError etc. from loading."""
    import uvicorn

    from .app import ServeConfig, check_parallel, create_app

    check_host(host, api_key=api_key, no_api_key=no_api_key)
    config = ServeConfig(alias=alias, api_key=api_key, cors=cors, parallel=parallel, queue_size=queue_size,
                         special_in_content=special_in_content)
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        from ..runtime.model import QwQ

        check_parallel(parallel)  # before minutes of loading
        model = QwQ.load(model, parallel=parallel, **load)
    app = create_app(model, config)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if on_ready is not None and self.started:
                sock = self.servers[0].sockets[0].getsockname()
                shown = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
                on_ready(f"http://{shown}:{sock[1]}")

        def handle_exit(self, sig, frame):
            state = app.state.qwq
            if state.engine is not None:
                state.engine.stop_streams()
            super().handle_exit(sig, frame)

    logging.getLogger("qwq_local.serve").setLevel(log_level.upper())
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                   timeout_graceful_shutdown=5, lifespan="on"))
    server.run()
