"""Commands about this machine: `plan` (memory before loading) and `doctor`."""

from typing import Optional

import typer

from .. import constants
from . import format as cli_format
from . import options as opts
from .app import command


@command("plan")
def plan_cmd(
    model: str = typer.Option(..., "-m", "--model", help="A .gguf file or a model name (qwq:q4_k_m)."),
    ctx: int = opts.CTX,
    kv_type: str = opts.KV,
    rope_scaling: str = opts.ROPE,
    flash_attn: Optional[bool] = typer.Option(
        None, "--flash-attn/--no-flash-attn", help="Flash attention (default: auto, which is on)."),
    gpu_layers: Optional[str] = typer.Option(
        None, "--gpu-layers", help="auto, all, or a number of layers (default: 0; auto with --rpc)."),
    n_batch: int = typer.Option(constants.DEFAULT_N_BATCH, "--batch", help="Logical batch size."),
    n_ubatch: int = typer.Option(constants.DEFAULT_N_UBATCH, "--ubatch", help="Physical batch size."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Free GPU memory to plan for (24G, 8GiB...); default: this machine's."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Available RAM to plan for; default: this machine's."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Take compute buffers from llama.cpp itself (metadata-only load, no weights read)."),
    rpc: Optional[str] = opts.RPC,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show the memory llama.cpp will need per device for MODEL with these settings."""
    import json

    from ..plan.hardware import parse_size
    from ..hub.download import resolve_model
    from ..plan.memory import plan

    if rpc:
        from ..plan.devices import plan_with_workers

        split = plan_with_workers(resolve_model(model), _endpoints(rpc), n_ctx=ctx, kv_type=kv_type,
                                  flash_attn=flash_attn, n_ubatch=n_ubatch, gpu_layers=gpu_layers or "auto",
                                  ram=parse_size(ram) if ram else None)
        if as_json:
            typer.echo(json.dumps({"model": split.model, "n_ctx": split.n_ctx, "n_gpu_layers": split.n_gpu_layers,
                                   "devices": split.table(), "fits": split.fits}, indent=2))
        else:
            typer.echo(cli_format.split_table(split.table(), fits=split.fits))
        if not split.fits:
            from ..errors import InsufficientMemoryError

            raise typer.Exit(InsufficientMemoryError.exit_code)
        return
    gpu_layers = gpu_layers or "0"

    p = plan(resolve_model(model), n_ctx=ctx, kv_type=kv_type, flash_attn=flash_attn,
             n_batch=n_batch, n_ubatch=n_ubatch, gpu_layers=gpu_layers,
             vram=parse_size(vram) if vram else None, ram=parse_size(ram) if ram else None, dry_run=dry_run,
             rope_scaling=rope_scaling)
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=2))
    else:
        typer.echo(cli_format.plan_table(p.to_dict()))
    if not p.fits:  # scripts can test the exit code, as for a refused load
        from ..errors import InsufficientMemoryError

        raise typer.Exit(InsufficientMemoryError.exit_code)


@command("doctor")
def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check this machine: llama.cpp backend, GPU offload, memory, AMX, and what QwQ-32B fits."""
    import json

    from ..plan.hardware import report

    r = report()
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(cli_format.doctor_report(r))


def _endpoints(rpc: str) -> list[str]:
    from ..backend.rpc import parse_endpoints, require_rpc

    require_rpc()
    return parse_endpoints(rpc)
