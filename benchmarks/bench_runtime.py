"""Generation speed of qwq-local against a bare llama.cpp loop and llama-cpp-python's
high-level API, on the same GGUF, same threads, same sampler chain.

    .venv/bin/python benchmarks/bench_runtime.py [--tokens 256] [--rounds 5] [--threads 1]
                                                 [--model FILE.gguf] [--workdir DIR]

Without --model it builds a QwQ-shaped random model big enough that a token costs
milliseconds (hidden 1024, 8 layers), converts it and quantizes it to Q4_K_M (cached in
--workdir). The three loops run interleaved, round after round, and the median of each is
reported, so load from other processes hits them alike.

- bare:       llama_sampler_sample + llama_decode through llama_cpp's ctypes bindings, nothing else
- qwq-local:  QwQ.stream_prompt (sampling in C, thought splitting, UTF-8 decoding, events)
- high-level: llama_cpp.Llama.create_completion(stream=True)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwq_local.backend import binding as backend  # noqa: E402
from qwq_local import constants
from qwq_local.runtime.decode import Sampling, build_sampler  # noqa: E402

SPEC = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
        "intermediate_size": 2816, "num_shards": 1}
# Random models by name. "0.5b" has Qwen2.5-0.5B's layer shapes (hidden 896, 24 layers, 14/2
# heads, MLP 4864; ~360M parameters outside the embeddings), the size of the llama-server
# reference figures, with the tiny tokenizer's small vocabulary.
SHAPES = {"1024x8": SPEC,
          "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "intermediate_size": 4864, "num_shards": 1}}
SHAPE_HELP = "the random model built when --model is not given (default 1024x8; 0.5b: Qwen2.5-0.5B's layer shapes)"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def build_model(workdir: Path, shape: str = "1024x8") -> Path:
    """The random QwQ-shaped Q4_K_M model `shape` (a SHAPES key), built once in workdir."""
    from qwq_local.convert.pipeline import convert
    from qwq_local.quantize.quantizer import quantize
    from qwq_local.synthetic.factory import make_tiny_checkpoint

    out = workdir / f"bench-{shape}-Q4_K_M.gguf"
    if out.exists():
        return out
    ckpt = make_tiny_checkpoint(workdir / f"bench-{shape}-ckpt", **SHAPES[shape])
    bf16 = convert(ckpt, workdir / f"bench-{shape}-bf16.gguf")
    quantize(bf16, out, qtype="Q4_K_M")
    bf16.unlink()  # only the Q4_K_M is used
    return out


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_token(start: tuple[float, float], n: int) -> tuple[float, float]:
    wall, cpu = _clocks()
    return (wall - start[0]) / n, (cpu - start[1]) / n


# Each loop is timed from its first sampled token (the prompt is behind it) to its last:
# n decodes and n samples. CPU time (process_time) is reported next to wall time because this
# machine is shared: with one thread llama.cpp computes in the calling thread, so CPU time
# counts the work without the time other processes took the core away.

def bare_loop(ctx: backend.Context, prompt: list[int], n: int, eog_bias: dict, seed: int) -> tuple[float, float]:
    """The plainest loop llama.cpp's ctypes API allows (its own context on the same model)."""
    lib = backend.llama()
    model = ctx.model
    ctx.truncate(0)
    ctx.decode(prompt, start_pos=0)
    chain = build_sampler(lib, model, Sampling(seed=seed, logit_bias=eog_bias), penalty_window=64)
    batch = lib.llama_batch_init(1, 0, 1)
    batch.n_tokens = 1
    batch.n_seq_id[0] = 1
    batch.seq_id[0][0] = 0
    batch.logits[0] = True
    sample, decode, c = lib.llama_sampler_sample, lib.llama_decode, ctx.ptr
    pos = len(prompt)
    tok = sample(chain, c, -1)
    start = _clocks()
    for _ in range(n):
        batch.token[0] = tok
        batch.pos[0] = pos
        pos += 1
        if decode(c, batch) != 0:
            raise RuntimeError("llama_decode failed")
        tok = sample(chain, c, -1)
    result = _per_token(start, n)
    lib.llama_batch_free(batch)
    lib.llama_sampler_free(chain)
    return result


def qwq_loop(qwq, prompt_text: str, n: int, eog_bias: dict, seed: int) -> tuple[float, float]:
    qwq.reset()
    start = None
    for event in qwq.stream_prompt(prompt_text, sampling=Sampling(seed=seed, logit_bias=eog_bias), max_tokens=n + 1):
        if start is None:
            start = _clocks()
        if event.kind == "done":
            assert event.reply.usage["completion_tokens"] == n + 1
    return _per_token(start, n)


def high_level_loop(llm, prompt: list[int], n: int, eog_bias: dict, seed: int) -> tuple[float, float]:
    llm.reset()
    stream = llm.create_completion(prompt, max_tokens=n + 1, temperature=constants.DEFAULT_TEMPERATURE,
                                   top_p=constants.DEFAULT_TOP_P, top_k=constants.DEFAULT_TOP_K,
                                   min_p=constants.DEFAULT_MIN_P, repeat_penalty=1.0, seed=seed,
                                   logit_bias={k: -1e9 for k in eog_bias}, stream=True)
    start = None
    count = 0
    for _ in stream:
        count += 1
        if start is None:
            start = _clocks()
    assert count >= n + 1, count  # one chunk per token, plus a final one with finish_reason
    return _per_token(start, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--workdir", type=Path, default=constants.cache_dir() / "bench")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from qwq_local import QwQ

    path = args.model or build_model(args.workdir)
    n_ctx = 1024
    qwq = QwQ.load(path, n_ctx=n_ctx, gpu_layers=0, threads=args.threads, seed=0)
    prompt_text = qwq.render_prompt(PROMPT)
    prompt = qwq.tokenize(prompt_text)
    eog_bias = qwq.eog_bias()
    # Same model, same context settings as the QwQ object's own context.
    bare_ctx = backend.Context(qwq._model, n_ctx=n_ctx, n_threads=args.threads)

    llm = None
    skipped = None
    if not backend.extra_bufts_allowed():
        # llama_cpp.Llama cannot turn extra buffer types off: it would crash on this CPU.
        skipped = "skipped: llama_cpp.Llama always uses extra buffer types, which crash on this CPU"
    else:
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                              n_gpu_layers=0, verbose=False, seed=0)

    runs: dict[str, list[tuple[float, float]]] = {"bare": [], "qwq-local": [], "high-level": []}
    for r in range(args.rounds):
        runs["bare"].append(bare_loop(bare_ctx, prompt, args.tokens, eog_bias, r))
        runs["qwq-local"].append(qwq_loop(qwq, prompt_text, args.tokens, eog_bias, r))
        if llm is not None:
            runs["high-level"].append(high_level_loop(llm, prompt, args.tokens, eog_bias, r))

    def stat(name: str, which: int, how) -> float:
        return how([x[which] for x in runs[name]]) * 1000

    names = [k for k, v in runs.items() if v]
    table = {k: {"wall_median_ms": stat(k, 0, statistics.median), "wall_min_ms": stat(k, 0, min),
                 "cpu_median_ms": stat(k, 1, statistics.median)} for k in names}
    for k in names:
        for m in ("wall_median_ms", "wall_min_ms", "cpu_median_ms"):
            table[k][m.replace("_ms", "_overhead_ms")] = table[k][m] - table["bare"][m]
    result = {
        "model": str(path), "model_bytes": path.stat().st_size, "tokens": args.tokens, "rounds": args.rounds,
        "threads": args.threads, "extra_bufts": qwq.extra_bufts, "llama_cpp_python": backend.llama_cpp_version(),
        "loops": table, "runs_ms": {k: [[x * 1000 for x in pair] for pair in runs[k]] for k in names},
        "high_level": skipped or "measured",
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model: {path.name} ({path.stat().st_size / 2**20:.0f} MiB), {args.tokens} tokens x {args.rounds} rounds "
          f"(interleaved), {args.threads} thread(s), extra buffers {'on' if qwq.extra_bufts else 'off'}, "
          f"llama-cpp-python {result['llama_cpp_python']}")
    print(f"{'ms/token':<12}{'wall median':>14}{'wall min':>14}{'CPU median':>14}")
    for k in names:
        row = table[k]
        cells = [f"{row[m + '_ms']:.3f} ({row[m + '_overhead_ms']:+.3f})" for m in ("wall_median", "wall_min", "cpu_median")]
        print(f"{k:<12}" + "".join(f"{c:>18}" for c in cells))
    print("(in brackets: difference to the bare loop)")
    if skipped:
        print(f"high-level: {skipped}")


if __name__ == "__main__":
    main()
