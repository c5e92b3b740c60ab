#!/usr/bin/env python3
"""Quantize time: qwq_local.quantize() against the bare llama_model_quantize call it wraps.

Builds a ~250 MB bf16 QwQ-shaped GGUF (random weights), then quantizes it to each type with
both, alternating, and prints the median wall time. Our overhead is the header validation,
the size prediction, the worker thread and the rename; the first call of ours also test-loads
the input once in a child process (remembered per file), reported separately.

    .venv/bin/python benchmarks/bench_quantize.py [--types Q8_0 Q4_K_M] [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

from qwq_local.backend import binding as backend
from qwq_local.convert.pipeline import convert
from qwq_local.fileutil import human_bytes
from qwq_local.quantize.types import resolve_type
from qwq_local.quantize.quantizer import quantize
from qwq_local.synthetic.factory import make_tiny_checkpoint


def bare(src: Path, dst: Path, ftype: int, threads: int) -> float:
    lib = backend.llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    start = time.perf_counter()
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    elapsed = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {backend.log_tail(3)}")
    return elapsed


def ours(src: Path, dst: Path, qtype: str, threads: int) -> float:
    start = time.perf_counter()
    quantize(src, dst, qtype=qtype, threads=threads)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=backend.default_threads())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        ckpt = make_tiny_checkpoint(d / "ckpt", hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                                    intermediate_size=4096, num_hidden_layers=8)
        src = convert(ckpt, d / "bench-bf16.gguf")
        print(f"input: {src.name}, {human_bytes(src.stat().st_size)} bf16 (built in {time.perf_counter() - t0:.1f} s); "
              f"threads={args.threads}; median of {args.repeat}; llama-cpp-python {backend.llama_cpp_version()}")
        first = ours(src, d / "first.gguf", args.types[0], args.threads)
        rows = []
        for name in args.types:
            qt = resolve_type(name)
            times_bare, times_ours = [], []
            for i in range(args.repeat):
                times_bare.append(bare(src, d / f"bare-{name}.gguf", qt.ftype, args.threads))
                times_ours.append(ours(src, d / f"ours-{name}.gguf", name, args.threads))
            same = (d / f"bare-{name}.gguf").read_bytes() == (d / f"ours-{name}.gguf").read_bytes()
            b, o = statistics.median(times_bare), statistics.median(times_ours)
            rows.append((qt.name, human_bytes((d / f"ours-{name}.gguf").stat().st_size), b, o, o - b, same))
        print(f"\n{'type':<8} {'output':>10} {'bare (s)':>9} {'ours (s)':>9} {'overhead':>9}  identical")
        for name, size, b, o, diff, same in rows:
            print(f"{name:<8} {size:>10} {b:9.2f} {o:9.2f} {diff:+9.2f}  {'yes' if same else 'NO'}")
        print(f"\nfirst call of ours ({args.types[0]}, includes the one-time child-process load check): {first:.2f} s")


if __name__ == "__main__":
    main()
