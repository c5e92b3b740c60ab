#!/usr/bin/env python3
"""The cost of llama.cpp's RPC protocol: pp and tg of one model run locally, across 1 loopback
worker, and across 2 loopback workers (`qwq-local worker` subprocesses on 127.0.0.1, one CPU
thread each; the client uses one thread too, so every setup computes on one core at a time and
the difference is the protocol: graph serialization, socket round trips, activations copied
between devices). The model is bench_runtime.py's QwQ-shaped 1024x8 Q4_K_M (built once).

    python benchmarks/bench_rpc.py [--workdir /tmp/qwq-bench] [--prompt-tokens 128] [--gen-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwq-bench"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=2)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from bench_runtime import build_model
    from tests.conftest import start_worker

    model = build_model(args.workdir)
    workers = [start_worker(), start_worker()]
    try:
        rows = []
        for label, rpc in (("local", None), ("1 worker", [workers[0][1]]),
                           ("2 workers", [w[1] for w in workers])):
            # Each setup in its own process: a client keeps its worker connections until it exits.
            code = ("import json, sys; from qwq_local.runtime.model import QwQ; "
                    "rpc = json.loads(sys.argv[2]); "
                    "m = QwQ.load(sys.argv[1], n_ctx=int(sys.argv[3]), threads=1, "
                    "gpu_layers=(-1 if rpc else 0), rpc=rpc); "
                    "print(json.dumps({**m.bench(prompt_tokens=int(sys.argv[4]), gen_tokens=int(sys.argv[5]), "
                    "repetitions=int(sys.argv[6])), 'placement': m.placement}))")
            t0 = time.monotonic()
            out = subprocess.run([sys.executable, "-c", code, str(model), json.dumps(rpc), "512",
                                  str(args.prompt_tokens), str(args.gen_tokens), str(args.repetitions)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((label, result["pp_tps"], result["tg_tps"], time.monotonic() - t0, result["placement"]))
        print(f"model {model.name}; pp{args.prompt_tokens} / tg{args.gen_tokens}, {args.repetitions} repetitions, 1 thread each")
        print(f"{'setup':<10} {'pp t/s':>9} {'tg t/s':>9} {'wall s':>7}  placement")
        for label, pp, tg, wall, placement in rows:
            print(f"{label:<10} {pp:9.1f} {tg:9.1f} {wall:7.1f}  {placement}")
    finally:
        for proc, _endpoint in workers:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
