"""Commands that run the model: `run`, `chat`, `bench`, and the offline `demo`."""

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer

from .. import constants
from . import options as opts
from .app import command, err


def load_model(model: str, *, ctx: int, gpu_layers: str, threads: Optional[int], seed: Optional[int],
                template: str, kv_type: str, flash_attn: Optional[bool] = None,
                rope_scaling: str = constants.DEFAULT_ROPE_SCALING, rpc: Optional[str] = None,
                draft: Optional[str] = None, draft_max: int = constants.DEFAULT_DRAFT_MAX,
                draft_min: int = constants.DEFAULT_DRAFT_MIN, draft_gpu_layers: Optional[int] = None,
                parallel: int = 1):
    import warnings

    from ..runtime.model import QwQ

    # The library warns (altered template in the GGUF, context shortened to fit memory); on the
    # command line that is one "warning: ..." line, not Python's file:line and source echo.
    if rpc:  # the split across the workers, before loading
        from ..backend.rpc import parse_endpoints, require_rpc
        from ..hub.download import resolve_model
        from ..plan.devices import plan_with_workers
        from . import format as cli_format

        require_rpc()
        split = plan_with_workers(resolve_model(model), parse_endpoints(rpc),
                                  n_ctx=ctx, kv_type=kv_type, flash_attn=flash_attn, gpu_layers=gpu_layers)
        err(cli_format.split_table(split.table(), fits=split.fits))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        llm = QwQ.load(model, n_ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=seed, template=template,
                       kv_type=kv_type, flash_attn=flash_attn, rope_scaling=rope_scaling, rpc=rpc, draft=draft,
                       draft_max=draft_max, draft_min=draft_min, draft_gpu_layers=draft_gpu_layers,
                       parallel=parallel)
    for warning in caught:
        err(f"warning: {warning.message}")
    return llm


def sampling_options(*, max_tokens, thinking_budget, temperature, top_p, top_k, min_p, presence_penalty, seed,
                      ignore_eos, special_in_content=False) -> dict:
    return {"max_tokens": max_tokens, "thinking_budget": thinking_budget, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "min_p": min_p, "presence_penalty": presence_penalty, "seed": seed,
            "ignore_eos": ignore_eos, "special_in_content": special_in_content}


@command("run")
def run_cmd(
    prompt: str = typer.Argument(..., help="The user message ('-' reads it from stdin)."),
    model: str = opts.MODEL,
    system: Optional[str] = opts.SYSTEM,
    ctx: int = opts.CTX,
    gpu_layers: str = opts.GPU,
    rpc: Optional[str] = opts.RPC,
    threads: Optional[int] = opts.THREADS,
    max_tokens: Optional[int] = opts.MAX,
    thinking_budget: Optional[int] = opts.BUDGET,
    temperature: float = opts.TEMP,
    top_p: float = opts.TOP_P,
    top_k: int = opts.TOP_K,
    min_p: float = opts.MIN_P,
    presence_penalty: float = opts.PRESENCE,
    seed: Optional[int] = opts.SEED,
    template: str = opts.TEMPLATE,
    kv_type: str = opts.KV,
    flash_attn: Optional[bool] = opts.FA,
    rope_scaling: str = opts.ROPE,
    ignore_eos: bool = opts.IGNORE_EOS,
    special_in_content: bool = opts.SPECIAL_IN_CONTENT,
    draft: Optional[str] = opts.DRAFT,
    draft_max: int = opts.DRAFT_MAX,
    draft_min: int = opts.DRAFT_MIN,
    draft_gpu_layers: Optional[int] = opts.DRAFT_GPU,
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the thought."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (thinking, content, tool_calls, "
                                                      "finish_reason, usage, timings, model: n_ctx and rope)."),
) -> None:
    """Answer one prompt: the thought on stderr (dimmed), the answer on stdout."""
    import json

    from .chat import Printer, length_note, stream_reply

    from_stdin = prompt == "-"
    if from_stdin:
        prompt = sys.stdin.read()
    if not prompt.strip():
        from ..errors import UsageError

        raise UsageError("the prompt is empty" + (" (nothing came on stdin)" if from_stdin else ""))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    options = sampling_options(max_tokens=max_tokens, thinking_budget=thinking_budget, temperature=temperature,
                                top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty, seed=seed,
                                ignore_eos=ignore_eos, special_in_content=special_in_content)
    with load_model(model, ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=seed, template=template, rpc=rpc,
                     kv_type=kv_type, flash_attn=flash_attn, rope_scaling=rope_scaling, draft=draft,
                     draft_max=draft_max, draft_min=draft_min, draft_gpu_layers=draft_gpu_layers) as llm:
        if as_json:
            reply = llm.chat(messages, **options)
            out = reply.to_dict()
            # What the reply was generated with: the context and the rope in effect.
            out["model"] = {"path": str(llm.path), "n_ctx": llm.n_ctx, "rope": llm.rope, "gpu_layers": llm.gpu_layers,
                            "kv_type": llm.kv_type, "extra_bufts": llm.extra_bufts}
            typer.echo(json.dumps(out, ensure_ascii=False))
            return
        printer = Printer(thought_stream=sys.stderr, answer_stream=sys.stdout, show_thinking=not hide_thinking)
        reply = stream_reply(llm, messages, printer, options=options)
        n_ctx = llm.n_ctx
    if reply.tool_calls:
        for call in reply.tool_calls:
            typer.echo(f"tool call: {call['function']['name']}({call['function']['arguments']})")
    if reply.finish_reason == "length":
        err(length_note(reply, n_ctx=n_ctx))


@command("chat")
def chat_cmd(
    model: str = opts.MODEL,
    system: Optional[str] = opts.SYSTEM,
    ctx: int = opts.CTX,
    gpu_layers: str = opts.GPU,
    rpc: Optional[str] = opts.RPC,
    threads: Optional[int] = opts.THREADS,
    max_tokens: Optional[int] = opts.MAX,
    thinking_budget: Optional[int] = opts.BUDGET,
    temperature: float = opts.TEMP,
    top_p: float = opts.TOP_P,
    top_k: int = opts.TOP_K,
    min_p: float = opts.MIN_P,
    presence_penalty: float = opts.PRESENCE,
    seed: Optional[int] = opts.SEED,
    template: str = opts.TEMPLATE,
    kv_type: str = opts.KV,
    flash_attn: Optional[bool] = opts.FA,
    rope_scaling: str = opts.ROPE,
    ignore_eos: bool = opts.IGNORE_EOS,
    special_in_content: bool = opts.SPECIAL_IN_CONTENT,
    draft: Optional[str] = opts.DRAFT,
    draft_max: int = opts.DRAFT_MAX,
    draft_min: int = opts.DRAFT_MIN,
    draft_gpu_layers: Optional[int] = opts.DRAFT_GPU,
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Start with the thought hidden (/think show)."),
) -> None:
    """Interactive chat with history (/help inside for commands; Ctrl-C stops an answer)."""
    from .chat import repl

    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    options = sampling_options(max_tokens=max_tokens, thinking_budget=thinking_budget, temperature=temperature,
                                top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty, seed=seed,
                                ignore_eos=ignore_eos, special_in_content=special_in_content)
    with load_model(model, ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=seed, template=template, rpc=rpc,
                     kv_type=kv_type, flash_attn=flash_attn, rope_scaling=rope_scaling, draft=draft,
                     draft_max=draft_max, draft_min=draft_min, draft_gpu_layers=draft_gpu_layers) as llm:
        code = repl(llm, system=system, options=options, show_thinking=not hide_thinking)
    raise typer.Exit(code)


@command("bench")
def bench_cmd(
    model: str = opts.MODEL,
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Prompt length for pp (tokens/s, batched)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", help="Tokens to generate for tg (tokens/s, one at a time)."),
    threads: Optional[int] = opts.THREADS,
    gpu_layers: str = opts.GPU,
    rpc: Optional[str] = opts.RPC,
    kv_type: str = opts.KV,
    rope_scaling: str = opts.ROPE,
    repetitions: int = typer.Option(1, "--repetitions", "-r", help="Runs to average."),
    draft: Optional[str] = opts.DRAFT,
    draft_max: int = opts.DRAFT_MAX,
    draft_min: int = opts.DRAFT_MIN,
    draft_gpu_layers: Optional[int] = opts.DRAFT_GPU,

    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Prompt (pp) and generation (tg) speed, like llama-bench (with --draft: tg with and without)."""
    import json

    from ..backend.rope import describe_rope
    from ..errors import UsageError

    if prompt_tokens < 1 or gen_tokens < 1:
        raise UsageError("--prompt-tokens and --gen-tokens must be >= 1")
    ctx = prompt_tokens + gen_tokens + 16
    if ctx > constants.MAX_CONTEXT:
        # Checked here: the context is derived, and "n_ctx must be ..." would name no option the user gave.
        raise UsageError(f"--prompt-tokens + --gen-tokens must stay under the {constants.MAX_CONTEXT}-token "
                         f"context limit, not {prompt_tokens} + {gen_tokens}")
    with load_model(model, ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=0, template="original", rpc=rpc,
                     kv_type=kv_type, rope_scaling=rope_scaling, draft=draft, draft_max=draft_max,
                     draft_min=draft_min, draft_gpu_layers=draft_gpu_layers) as llm:
        result = llm.bench(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repetitions=repetitions)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"model      {result['model']}")
    typer.echo(f"threads    {result['threads']}   gpu layers {result['gpu_layers']}   "
               f"extra buffers (AMX/repack) {'on' if result['extra_bufts'] else 'off'}")
    typer.echo(f"context    {result['n_ctx']}   rope {describe_rope(result['rope'])}")
    typer.echo(f"pp{prompt_tokens:<7} {result['pp_tps']:10.1f} tokens/s")
    typer.echo(f"tg{gen_tokens:<7} {result['tg_tps']:10.1f} tokens/s")
    if "tg_draft_tps" in result:
        drafted, kept = result["draft_tokens"], result["draft_accepted_tokens"]
        rate = f"{kept}/{drafted} proposals kept" if drafted else "no proposals verified"
        typer.echo(f"tg{gen_tokens:<7} {result['tg_draft_tps']:10.1f} tokens/s with --draft {result['draft']} "
                   f"({result['tg_draft_tps'] / result['tg_tps']:.2f}x; {rate})")


@command("demo")
def demo_cmd(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where the demo files go (default: ~/.cache/qwq-local/demo)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens to generate in the chat turn."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Offline demo: tiny QwQ-shaped checkpoint -> GGUF -> Q4_K_M -> one chat turn."""
    from .demo import DEMO_QUESTION, run_demo

    typer.echo("qwq-local demo: the QwQ-32B pipeline on a tiny random-weight model (offline)")

    def show(stage) -> None:
        typer.echo(f"[{stage.name:>10}] {stage.seconds:7.2f}s  {stage.detail}")

    result = run_demo(workdir=workdir, max_tokens=max_tokens, seed=seed, on_stage=show)
    reply = result.reply
    typer.echo(f"\nuser: {DEMO_QUESTION}")
    typer.echo(f"thinking ({reply.usage.get('thinking_tokens', '?')} tokens): {reply.thinking!r}")
    typer.echo(f"answer: {reply.content!r}")
    timings = reply.timings
    typer.echo(f"speed: prompt {timings.get('prompt_tps', 0):.1f} tok/s, generation {timings.get('gen_tps', 0):.1f} tok/s")
    typer.echo("(random weights: the words are noise; the template, thinking split and pipeline are real)")
    typer.echo(f"try: qwq-local run -m {result.workdir / 'tiny-qwq-Q4_K_M.gguf'} \"Hello\"")
