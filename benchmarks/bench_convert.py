#!/usr/bin/env python3
"""Benchmark `qwq_local.convert` against a plain `cp` of the same shard bytes.

Generates a QwQ-shaped checkpoint of about 1 GB (qwq_local.synthetic.make_tiny_checkpoint with a
bigger TinySpec) in a work directory, then times, each in its own child process:
  - `cp` of the shards (and `cp` + `sync` of the copy, since convert fsyncs its output),
  - our convert for each --outtypes value (peak RSS of the converting process from wait4's
    rusage, i.e. the child's own ru_maxrss),
  - convert of a small-weight checkpoint with a QwQ-sized vocabulary (151,643 BPE tokens,
    151,387 merges, 152,064 rows), to show the metadata cost and peak RSS at QwQ's vocab size,
  - llama.cpp's convert_hf_to_gguf.py if you pass --llama-cpp-convert PATH (it needs torch and
    transformers; it is not installed here and this script never downloads it).
The page cache is warm for every run (the checkpoint fits in RAM); runs are repeated and the
median is printed.

    python benchmarks/bench_convert.py [--workdir /tmp/qwq-bench-convert] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# ~1.02 GB of bf16: 5 layers of a 2560-wide, 20:4-head (5:1 GQA) Qwen2, 32768 embedding rows.
SPEC = dict(hidden_size=2560, num_attention_heads=20, num_key_value_heads=4, intermediate_size=6912,
            num_hidden_layers=5, pad_vocab_to=32768, num_shards=3)
QWQ_BASE_VOCAB, QWQ_MERGES, QWQ_ROWS = 151643, 151387, 152064


def _run_child(argv: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one child process, from its own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}\n{err}")
    return elapsed, usage.ru_maxrss * 1024


def _python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


GEN_CODE = "import json, sys\nfrom qwq_local.synthetic import make_tiny_checkpoint\n" \
           "make_tiny_checkpoint(sys.argv[1], **json.loads(sys.argv[2]))\n"
CONVERT_CODE = "import sys\nfrom qwq_local.convert import convert\nconvert(sys.argv[1], sys.argv[2], outtype=sys.argv[3])\n"
BIG_VOCAB_CODE = f"""
import json, sys
from pathlib import Path
from qwq_local.synthetic.factory import make_tiny_checkpoint
ck = make_tiny_checkpoint(sys.argv[1], hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=128, pad_vocab_to={QWQ_ROWS})
tok = json.loads((ck / "tokenizer.json").read_text())
vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
i = 0
while len(vocab) < {QWQ_BASE_VOCAB}:
    vocab["\\u0120tok%06dx" % i] = len(vocab)
    i += 1
j = 0
while len(merges) < {QWQ_MERGES}:
    merges.append(["\\u0120tok%06d" % j, "x"])
    j += 1
for k, t in enumerate(tok["added_tokens"]):
    t["id"] = {QWQ_BASE_VOCAB} + k
(ck / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
cfg = json.loads((ck / "config.json").read_text())
cfg.update(bos_token_id={QWQ_BASE_VOCAB}, eos_token_id={QWQ_BASE_VOCAB + 2})
(ck / "config.json").write_text(json.dumps(cfg))
"""


def _measure(runs: dict[str, list[str]], repeat: int, cleanup) -> dict[str, tuple[float, int]]:
    """Median time and max peak RSS per command. Repetitions interleave the commands, and each
    run starts with no dirty pages (os.sync before, untimed), so background writeback of one run
    does not slow the next."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    rss: dict[str, int] = {k: 0 for k in runs}
    for _ in range(repeat):
        for key, argv in runs.items():
            cleanup()
            os.sync()
            t, r = _run_child(argv)
            times[key].append(t)
            rss[key] = max(rss[key], r)
    cleanup()
    return {k: (statistics.median(v), rss[k]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwq-bench-convert"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--outtypes", default="bf16,f16,q8_0")
    parser.add_argument("--llama-cpp-convert", type=Path, default=None,
                        help="path to llama.cpp's convert_hf_to_gguf.py (optional; needs torch + transformers)")
    parser.add_argument("--llama-cpp-python", type=Path, default=Path(sys.executable),
                        help="the Python (with torch, transformers and llama.cpp's gguf-py) that runs it")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args(argv)

    work = args.workdir
    ckpt, out_dir = work / "ckpt", work / "out"
    marker = work / "spec.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == SPEC):
        shutil.rmtree(work, ignore_errors=True)
        print(f"generating a ~1 GB checkpoint in {ckpt} ...", flush=True)
        t, _ = _run_child(_python(GEN_CODE, str(ckpt), json.dumps(SPEC)))
        marker.write_text(json.dumps(SPEC))
        print(f"  generated in {t:.1f} s", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = sorted(ckpt.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)

    def clean():
        for p in out_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    # warm the page cache in a child: the parent stays small, since a child's ru_maxrss starts
    # from its parent's RSS at fork
    _run_child(["sh", "-c", f"cat {' '.join(map(str, shards))} > /dev/null"])

    runs = {
        "cp (shards)": ["cp", *map(str, shards), str(out_dir)],
        "cp + sync (shards)": ["sh", "-c", f"cp {' '.join(map(str, shards))} {out_dir} && sync -f {out_dir}/*"],
    }
    for outtype in [o.strip() for o in args.outtypes.split(",") if o.strip()]:
        runs[f"qwq-local convert --outtype {outtype}"] = _python(
            CONVERT_CODE, str(ckpt), str(out_dir / f"m-{outtype}.gguf"), outtype)
    if args.llama_cpp_convert:
        runs["llama.cpp convert_hf_to_gguf.py bf16"] = [
            str(args.llama_cpp_python), str(args.llama_cpp_convert), str(ckpt), "--outfile", str(out_dir / "llama.gguf"),
            "--outtype", "bf16"]
    results = _measure(runs, args.repeat, clean)
    rows: list[tuple[str, float, int | None]] = [(k, *v) for k, v in results.items()]

    vocab_ckpt = work / "qwq-vocab"
    if not vocab_ckpt.is_dir():
        _run_child(_python(BIG_VOCAB_CODE, str(vocab_ckpt)))
    name = "qwq-local convert, QwQ-sized vocab, tiny weights"
    rows.append((name, *_measure({name: _python(CONVERT_CODE, str(vocab_ckpt), str(out_dir / "v.gguf"), "bf16")},
                                 args.repeat, clean)[name]))

    print(f"\ncheckpoint: {len(shards)} shards, {total / 1e9:.3f} GB bf16 "
          f"({', '.join(f'{k}={v}' for k, v in SPEC.items())}); warm page cache; median of {args.repeat}")
    print(f"{'run':<52} {'time (s)':>9} {'GB/s':>7} {'peak RSS':>10}")
    for name, t, rss in rows:
        speed = f"{total / t / 1e9:7.2f}" if "vocab" not in name else "      -"
        print(f"{name:<52} {t:9.2f} {speed} {rss / 2**20:6.0f} MiB")
    cp_time, cp_sync_time = results["cp (shards)"][0], results["cp + sync (shards)"][0]
    for name, (t, _) in results.items():
        if name.startswith("qwq-local convert"):
            print(f"{name}: {t / cp_time:.1f}x cp, {t / cp_sync_time:.1f}x cp + sync (convert fsyncs its output)")
    print("peak RSS: the child's ru_maxrss from wait4 (an upper bound: it starts at the benchmark "
          "process's own RSS)")
    if not args.llama_cpp_convert:
        print("llama.cpp's convert_hf_to_gguf.py: not installed here (needs torch + transformers) and not "
              "downloaded by this script; comparison skipped (pass --llama-cpp-convert PATH to include it)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
