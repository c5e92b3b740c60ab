"""`qwq-local serve`: the OpenAI-compatible server (a thin client of `qwq_local.serve`)."""

import faulthandler
import os
import signal
from typing import Optional

import typer

from .. import constants
from . import options as opts
from .app import command, err


@command("serve")
def serve_cmd(
    model: str = opts.MODEL,
    host: str = typer.Option(constants.SERVE_DEFAULT_HOST, "--host", help="Address to bind (loopback by default; "
                                                                          "others need --api-key)."),
    port: int = typer.Option(constants.SERVE_DEFAULT_PORT, "--port", help="Port (0: any free port)."),
    parallel: int = typer.Option(1, "--parallel", "-np", help="Slots generating at once, sharing one context "
                                                              "(continuous batching); --ctx is split between them."),
    queue: int = typer.Option(constants.SERVE_QUEUE_SIZE, "--queue", help="Requests that may wait for a slot; "
                                                                          "more get 503 + Retry-After."),
    ctx: int = opts.CTX,
    gpu_layers: str = opts.GPU,
    rpc: Optional[str] = opts.RPC,
    threads: Optional[int] = opts.THREADS,
    template: str = opts.TEMPLATE,
    kv_type: str = opts.KV,
    flash_attn: Optional[bool] = opts.FA,
    rope_scaling: str = opts.ROPE,
    seed: Optional[int] = opts.SEED,
    special_in_content: bool = opts.SPECIAL_IN_CONTENT,
    draft: Optional[str] = opts.DRAFT,
    draft_max: int = opts.DRAFT_MAX,
    draft_min: int = opts.DRAFT_MIN,
    draft_gpu_layers: Optional[int] = opts.DRAFT_GPU,
    api_key: Optional[str] = typer.Option(None, "--api-key", help=f"Key clients send as `Authorization: Bearer "
                                                                   f"KEY` (or set {constants.ENV_API_KEY})."),
    no_api_key: bool = typer.Option(False, "--no-api-key", help="Allow a non-loopback --host without a key."),
    alias: Optional[str] = typer.Option(None, "--alias", help="Model id for clients (default: the file name)."),
    cors: Optional[str] = typer.Option(None, "--cors", help="Allow browser requests from this origin (* for any)."),
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models), with a chat page at /, /health and /metrics. Ctrl-C stops it."""
    from ..serve.app import check_parallel
    from ..serve.runner import check_host, serve
    from .run import load_model

    api_key = api_key or os.environ.get(constants.ENV_API_KEY) or None
    warning = check_host(host, api_key=api_key, no_api_key=no_api_key)
    if warning:
        err(f"warning: {warning}")
    check_parallel(parallel)
    llm = load_model(model, ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=seed, template=template,
                     kv_type=kv_type, flash_attn=flash_attn, rope_scaling=rope_scaling, rpc=rpc, draft=draft,
                     draft_max=draft_max, draft_min=draft_min, draft_gpu_layers=draft_gpu_layers, parallel=parallel)

    def ready(url: str) -> None:
        slots = f", {parallel} slots of {llm.n_ctx} tokens" if parallel > 1 else ""
        typer.echo(f"qwq-local: serving {llm.path.name} at {url}/v1 (chat page: {url}/){slots}", err=False)

    if hasattr(signal, "SIGUSR1"):
        # `kill -USR1 PID` prints every thread's Python stack to stderr: what a stuck server waits on.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    serve(llm, host=host, port=port, api_key=api_key, no_api_key=no_api_key, alias=alias, cors=cors,
          parallel=parallel, queue_size=queue, special_in_content=special_in_content, on_ready=ready)
    err("server stopped")
