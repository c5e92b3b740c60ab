#!/usr/bin/env python3
"""What batching several sequences costs in llama.cpp, and what the slot engine makes of it.

    .venv/bin/python benchmarks/bench_batch.py [--model FILE.gguf] [--threads 2] [--tokens 128]

Without --model it uses bench_runtime.py's QwQ-shaped random Q4_K_M model (built once). Prints:
- llama_decode time for a batch of 1, 2 and 4 tokens of different sequences (median of 40, one
  context with 4 sequences): the ceiling of continuous batching on this machine (k tokens in
  the time of one decode gives at most k / (batch time / one-token time) times the throughput);
- aggregate tokens/s of 1, 2 and 4 concurrent generations through `QwQ.load(parallel=4)`, run
  as the server runs them (jobs on the shared context's decode thread) without HTTP, end tokens
  banned, temperature 0.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runtime import SHAPE_HELP, SHAPES  # noqa: E402


def decode_costs(path: Path, threads: int) -> dict[int, float]:
    from qwq_local.backend import binding as backend
    from qwq_local.backend.batched import SharedContext

    model = backend.Model.load(path)
    shared = SharedContext(model, n_ctx=4096, n_seq=4, n_threads=threads)
    lib, ctx = backend.llama(), shared.ctx
    batch, memory = ctx._batch, lib.llama_get_memory(ctx.ptr)
    for seq in range(4):  # a 64-token prompt in each sequence
        for j in range(64):
            batch.token[j], batch.pos[j], batch.seq_id[j][0], batch.logits[j] = 100 + j, j, seq, j == 63
        batch.n_tokens = 64
        lib.llama_decode(ctx.ptr, batch)
    costs = {}
    for k in (1, 2, 4):
        times = []
        for step in range(40):
            for i in range(k):
                batch.token[i], batch.pos[i], batch.seq_id[i][0], batch.logits[i] = 200 + step, 64 + step, i, True
            batch.n_tokens = k
            t = time.perf_counter()
            lib.llama_decode(ctx.ptr, batch)
            lib.llama_synchronize(ctx.ptr)
            times.append(time.perf_counter() - t)
        costs[k] = sorted(times)[len(times) // 2]
        for seq in range(k):
            lib.llama_memory_seq_rm(memory, seq, 64, -1)
    shared.close()
    model.close()
    return costs


def engine_rates(path: Path, threads: int, tokens: int) -> dict[int, float]:
    """Aggregate tokens/s of k generations run as the server runs them: jobs on the shared
    context's decode thread (SharedContext.spawn), no HTTP."""
    from qwq_local import QwQ

    rates = {}
    with QwQ.load(path, n_ctx=4096, gpu_layers=0, parallel=4, threads=threads, seed=0) as qwq:
        slots, bias = qwq.sequences(), qwq.eog_bias()
        for round_, k in enumerate((4, 1, 2, 4)):  # the first round warms up (not reported)
            out: list[int] = []
            done = threading.Semaphore(0)

            def work(i: int) -> None:
                try:
                    reply = slots[i].chat([{"role": "user", "content": f"Story number {i}"}], max_tokens=tokens,
                                          temperature=0, logit_bias=bias)
                    out.append(reply.usage["completion_tokens"])
                finally:
                    done.release()

            t = time.perf_counter()
            for i in range(k):
                qwq.shared.spawn(lambda i=i: work(i))
            for _ in range(k):
                done.acquire()
            if round_:
                rates[k] = sum(out) / (time.perf_counter() - t)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF (default: bench_runtime.py's random 1024x8 Q4_K_M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", default="1024x8", choices=SHAPES, help=SHAPE_HELP)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per generation")
    parser.add_argument("--workdir", type=Path, default=None, help="where the default model is built")
    args = parser.parse_args()
    path = args.model
    if path is None:
        from bench_runtime import build_model

        from qwq_local import constants

        workdir = args.workdir or constants.cache_dir() / "bench"
        workdir.mkdir(parents=True, exist_ok=True)
        path = build_model(workdir, args.shape)
    costs = decode_costs(path, args.threads)
    for k, t in costs.items():
        print(f"llama_decode, {k} sequence(s) x 1 token: {t * 1000:6.2f} ms  ({t / costs[1]:.2f}x one; "
              f"batching ceiling {k * costs[1] / t:.2f}x throughput)")
    rates = engine_rates(path, args.threads, args.tokens)
    for k, r in rates.items():
        print(f"slot engine, {k} concurrent: {r:7.1f} tok/s ({r / rates[1]:.2f}x one)")


if __name__ == "__main__":
    main()
