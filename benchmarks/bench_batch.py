#!/usr/bin/env python3
"""What batching several sequences costs in llama.cpp, and what the slot engine makes of it.

    .venv/bin/python benchmarks/bench_batch.py [--model FILE.gguf | --shape 1024x8|0.5b] [--threads 2] [--tokens 128]

Without --model it uses bench_runtime.py's QwQ-shaped random Q4_K_M model (built once). Prints:
- llama_decode time for a batch of 1, 2 and 4 tokens of different sequences (median of 40,
  interleaved, one context with 8 sequences): the ceiling of continuous batching on this machine
  (k tokens in the time of one decode gives at most k / (batch time / one-token time) times the
  throughput); and the same 4 tokens with their sequences out of order (1,0,3,2) or with a hole
  (0,1,3,4), which llama.cpp decodes as several ubatches;
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


# The sequence ids of each measured batch. With one KV stream per sequence llama.cpp cuts a batch
# into ubatches of consecutive, increasing ids (llama_batch_allocr::split_equal): the last two
# show what a batch out of order, or with a hole, costs.
LAYOUTS = {"1": [0], "2": [0, 1], "4": [0, 1, 2, 3], "4 as 1,0,3,2": [1, 0, 3, 2], "4 as 0,1,3,4": [0, 1, 3, 4]}


def decode_costs(path: Path, threads: int) -> dict[str, float]:
    """Median llama_decode time of each LAYOUTS batch, one token per sequence, interleaved."""
    from qwq_local.backend import binding as backend
    from qwq_local.backend.batched import SharedContext

    model = backend.Model.load(path)
    shared = SharedContext(model, n_ctx=8 * 512, n_seq=8, n_threads=threads)
    lib, ctx = backend.llama(), shared.ctx
    batch, memory = ctx._batch, lib.llama_get_memory(ctx.ptr)
    for seq in range(5):  # a 64-token prompt in each sequence used
        for j in range(64):
            batch.token[j], batch.pos[j], batch.seq_id[j][0], batch.logits[j] = 100 + j, j, seq, j == 63
        batch.n_tokens = 64
        lib.llama_decode(ctx.ptr, batch)
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for step in range(40):
        for name, seqs in LAYOUTS.items():
            for i, seq in enumerate(seqs):
                batch.token[i], batch.pos[i], batch.seq_id[i][0], batch.logits[i] = 200 + step, 64, seq, True
            batch.n_tokens = len(seqs)
            t = time.perf_counter()
            if lib.llama_decode(ctx.ptr, batch) != 0:
                raise SystemExit(f"llama_decode failed: {backend.log_tail(3)}")
            lib.llama_synchronize(ctx.ptr)
            times[name].append(time.perf_counter() - t)
            for seq in seqs:
                lib.llama_memory_seq_rm(memory, seq, 64, -1)
    shared.close()
    model.close()
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


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
    for name, t in costs.items():
        k = len(LAYOUTS[name])
        print(f"llama_decode, {name} sequence(s) x 1 token: {t * 1000:6.2f} ms  ({t / costs['1']:.2f}x one; "
              f"batching ceiling {k * costs['1'] / t:.2f}x throughput)")
    rates = engine_rates(path, args.threads, args.tokens)
    for k, r in rates.items():
        print(f"slot engine, {k} concurrent: {r:7.1f} tok/s ({r / rates[1]:.2f}x one)")


if __name__ == "__main__":
    main()
