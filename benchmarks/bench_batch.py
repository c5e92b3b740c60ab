#!/usr/bin/env python3
"""What batching several sequences costs in llama.cpp, and what the slot engine makes of it.

    .venv/bin/python benchmarks/bench_batch.py [--model FILE.gguf | --shape 1024x8|0.5b] [--threads 2] [--tokens 128]

Without --model it uses bench_runtime.py's QwQ-shaped random Q4_K_M model (built once). Prints:
- llama_decode time for a batch of 1, 2 and 4 tokens of different sequences (median of 40,
  interleaved, a context with 8 sequences): the ceiling of continuous batching on this machine
  (k tokens in the time of one decode gives at most k / (batch time / one-token time) times the
  throughput); the same 4 tokens with their sequences out of order (1,0,3,2) or with a hole
  (0,1,3,4), and 4 slots verifying 4, 1, 3 and 1 tokens, which llama.cpp decodes as several
  ubatches; each also with a unified KV cache (kv_unified), which has no such split;
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


# Each measured batch: (sequence id, tokens) per sequence, in batch order. With one KV stream per
# sequence (kv_unified off, what qwq-local uses) llama.cpp cuts a batch into ubatches of
# consecutive, increasing ids that take the same number of tokens from each sequence
# (llama_batch_allocr::split_equal): out of order, with a hole, or with verification batches of
# different lengths, one batch costs several passes. A unified KV cache has no such split.
LAYOUTS = {"1": [(0, 1)], "2": [(0, 1), (1, 1)], "4": [(0, 1), (1, 1), (2, 1), (3, 1)],
           "4 as 1,0,3,2": [(1, 1), (0, 1), (3, 1), (2, 1)], "4 as 0,1,3,4": [(0, 1), (1, 1), (3, 1), (4, 1)],
           "4 verifying 4,1,3,1": [(0, 4), (1, 1), (2, 3), (3, 1)]}


def decode_costs(path: Path, threads: int) -> dict[str, tuple[float, float]]:
    """{layout: (median ms with one KV stream per sequence, with a unified KV cache)} over 40
    llama_decode calls of each LAYOUTS batch, all interleaved."""
    from qwq_local.backend import binding as backend

    model = backend.Model.load(path)
    lib = backend.llama()
    contexts = []
    for unified in (False, True):
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 8 * 512, 512, 512, 8
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = unified
        ctx = lib.llama_init_from_model(model.ptr, params)
        batch = lib.llama_batch_init(512, 0, 1)
        for seq in range(5):  # a 64-token prompt in each sequence used
            for j in range(64):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = 100 + j, j, 1, seq
                batch.logits[j] = j == 63
            batch.n_tokens = 64
            lib.llama_decode(ctx, batch)
        contexts.append((ctx, batch, lib.llama_get_memory(ctx)))
    times: dict[tuple[str, int], list[float]] = {(name, u): [] for name in LAYOUTS for u in (0, 1)}
    for step in range(40):
        for u, (ctx, batch, memory) in enumerate(contexts):
            for name, layout in LAYOUTS.items():
                n = 0
                for seq, count in layout:
                    for j in range(count):
                        batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.seq_id[n][0] = 200 + step, 64 + j, 1, seq
                        batch.logits[n] = True
                        n += 1
                batch.n_tokens = n
                t = time.perf_counter()
                if lib.llama_decode(ctx, batch) != 0:
                    raise SystemExit(f"llama_decode failed: {backend.log_tail(3)}")
                lib.llama_synchronize(ctx)
                times[(name, u)].append(time.perf_counter() - t)
                for seq, _ in layout:
                    lib.llama_memory_seq_rm(memory, seq, 64, -1)
    for ctx, batch, _ in contexts:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
    model.close()
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    return {name: (med[(name, 0)], med[(name, 1)]) for name in LAYOUTS}


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
    one = costs["1"][0]
    for name, (split, unified) in costs.items():
        k = sum(count for _, count in LAYOUTS[name])
        print(f"llama_decode, {name} sequence(s): {split * 1000:6.2f} ms ({split / one:.2f}x one token; batching "
              f"ceiling {k * one / split:.2f}x throughput); unified KV {unified * 1000:6.2f} ms")
    rates = engine_rates(path, args.threads, args.tokens)
    for k, r in rates.items():
        print(f"slot engine, {k} concurrent: {r:7.1f} tok/s ({r / rates[1]:.2f}x one)")


if __name__ == "__main__":
    main()
