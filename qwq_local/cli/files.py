"""Commands on model files: `convert`, `quantize`, `eval`, `info`."""

from pathlib import Path
from typing import List, Optional

import typer

from .. import constants
from . import format as cli_format
from .app import command
from .options import convert_progress, progress_bar


@command("convert")
def convert_cmd(
    src: str = typer.Argument(constants.QWQ_REPO_ID, help="Checkpoint directory or Hugging Face repo id."),
    output: Path = typer.Option(..., "-o", "--output", help="The GGUF file to write."),
    outtype: str = typer.Option(constants.DEFAULT_OUTTYPE, "--outtype",
                                help=f"Tensor type: {' | '.join(constants.OUTTYPES)} (bf16 is lossless for QwQ)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    name: Optional[str] = typer.Option(None, "--name", help="general.name to record in the file."),
) -> None:
    """Convert a Hugging Face QwQ/Qwen2 checkpoint (safetensors) to GGUF, streaming and atomically."""
    import time

    from ..convert.pipeline import convert
    from ..fileutil import human_bytes

    started = time.perf_counter()
    with progress_bar("convert") as bar:
        path = convert(src, output, outtype=outtype, revision=revision, name=name, **convert_progress(bar))
    elapsed = time.perf_counter() - started
    from ..gguf.check import inspect_gguf

    typer.echo(f"wrote {path} ({human_bytes(path.stat().st_size)}, {len(inspect_gguf(path).tensors)} tensors, "
               f"{outtype.lower()}) in {elapsed:.1f} s")


# quantize / eval (issue: quantize)


@command("quantize")
def quantize_cmd(
    input: Optional[Path] = typer.Argument(None, help="The GGUF to quantize (bf16/f16/f32)."),
    output: Optional[Path] = typer.Argument(None, help="The quantized GGUF to write."),
    qtype: Optional[str] = typer.Option(None, "--type", "-t", help="Q4_K_M, Q8_0, IQ4_XS, ... (--list shows all)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix .gguf or .dat)."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="ggml type for output.weight."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                       help="ggml type for token_embd.weight."),
    pure: bool = typer.Option(False, "--pure", help="No k-quant mixture: every tensor gets the base type."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantizer threads (default: physical cores)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print predicted sizes; write nothing."),
    list_types: bool = typer.Option(False, "--list", help="List every type with bpw and predicted size "
                                                          "(for IN if given, else for QwQ-32B)."),
) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (identical to llama-quantize's output)."""
    from ..errors import UsageError
    from ..fileutil import human_bytes
    from ..quantize.quantizer import plan_quantize, predict_sizes, quantize

    if list_types:
        source = "QwQ-32B (published shape)" if input is None else input
        typer.echo(cli_format.prediction_table(predict_sizes(input), None, source))
        return
    if input is None or qtype is None:
        raise UsageError("usage: qwq-local quantize IN.gguf OUT.gguf --type Q4_K_M (or --list)")
    options = dict(qtype=qtype, imatrix=imatrix, output_tensor_type=output_tensor_type,
                   token_embedding_type=token_embedding_type, pure=pure)
    if dry_run:
        plan = plan_quantize(input, output=output, **options)
        table = predict_sizes(input, has_imatrix=True if imatrix else None, pure=pure,
                              output_tensor_type=plan.output_tensor_type,
                              token_embedding_type=plan.token_embedding_type)
        typer.echo(cli_format.prediction_table(table, plan.qtype.name, input))
        mix = ", ".join(f"{t} x{n}" for t, n in plan.type_counts.items())
        typer.echo(f"\n{plan.qtype.name}: {human_bytes(plan.predicted_bytes)} ({plan.bpw:.2f} bpw); tensors: {mix}")
        for w in plan.warnings:
            typer.echo(f"warning: {w}", err=True)
        typer.echo("dry run: nothing written")
        return
    if output is None:
        raise UsageError("give the output file: qwq-local quantize IN.gguf OUT.gguf --type " + qtype)
    with progress_bar(f"quantize {qtype}", unit="tensor") as progress:
        result = quantize(input, output, threads=threads, progress=progress, **options)
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"wrote {result.output} ({result.qtype}, {human_bytes(result.bytes)}, predicted "
               f"{human_bytes(result.predicted_bytes)}) in {result.seconds:.1f} s")


@command("eval")
def eval_cmd(
    model: List[Path] = typer.Option(..., "--model", "-m", help="A quantized GGUF to score (repeatable)."),
    reference: Path = typer.Option(..., "--reference", "-r", help="The reference GGUF (usually bf16)."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text to score on (default: shipped text)."),
    ctx: int = typer.Option(constants.DEFAULT_EVAL_CTX, "--ctx", help="Window size in tokens."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Score at most this many windows."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    gpu_layers: int = typer.Option(0, "--gpu-layers", help="Layers to offload to a GPU (GPU builds of llama.cpp)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    plot: Optional[Path] = typer.Option(None, "--plot",
                                        help="Write KLD vs file size: .svg (built in) or .png (matplotlib)."),
) -> None:
    """Quality of quants vs a reference: mean/99% KL divergence, top-1 agreement, perplexities."""
    import json

    from ..quantize.evaluate import evaluate, format_table

    if plot is not None:
        from ..quantize.plot import check_plot_target

        check_plot_target(plot)
    with progress_bar("eval", unit="window") as progress:
        results = evaluate(model, reference=reference, text=text, n_ctx=ctx, chunks=chunks, threads=threads,
                           n_gpu_layers=gpu_layers, progress=progress)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        typer.echo(format_table(results))
    if plot is not None:
        from ..quantize.plot import write_plot

        write_plot(results, plot)
        if not as_json:
            typer.echo(f"wrote {plot}")


def rope_summary(info) -> dict:
    """The file's own rope scaling keys and what qwq-local applies instead (backend/rope.py)."""
    from ..backend.rope import rope_params, rope_rule

    kind = info.arch_value("rope.scaling.type")
    in_file = None if kind in (None, "none") else {
        "scaling": str(kind), "factor": info.arch_value("rope.scaling.factor"),
        "orig_ctx": info.arch_value("rope.scaling.original_context_length")}
    return {"gguf": in_file, "rule": rope_rule(), "at_default_ctx": rope_params(constants.DEFAULT_N_CTX),
            "at_max_ctx": rope_params(constants.MAX_CONTEXT)}


@command("info")
def info_cmd(
    model: str = typer.Argument(..., help="A .gguf file or a cached model name (qwq:q4_k_m)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    load_check: bool = typer.Option(
        False, "--load-check", help="Also test-load it with llama.cpp in a child process (remembered per file)."),
) -> None:
    """Validate a GGUF file (header, tensors, vocabulary, chat template) and summarise it."""
    import json

    from ..gguf.check import inspect_gguf
    from ..hub.download import resolve_model
    from ..gguf.safe_load import ensure_loadable, is_validated

    path = resolve_model(model)
    info = ensure_loadable(path) if load_check else inspect_gguf(path)
    summary = info.summary()
    summary["load_checked"] = is_validated(path, info)
    summary["rope"] = rope_summary(info)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    typer.echo(cli_format.info_table(summary))
