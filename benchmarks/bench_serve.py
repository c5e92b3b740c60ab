"""Serving speed of `qwq-local serve` through HTTP/SSE with the official openai client.

    .venv/bin/python benchmarks/bench_serve.py [--model FILE.gguf] [--tokens 128] [--threads 2]
                                               [--streams 1,2,4,8] [--prompt-tokens 1024]
                                               [--parallel N] [--llama-server PATH] [--json]

Without --model it uses bench_runtime.py's QwQ-shaped random Q4_K_M model (hidden 1024, 8
layers, built once in --workdir). Reported:
- one stream's tokens/s through HTTP/SSE against `QwQ.bench` tg (what `qwq-local bench` prints)
  on the same model and threads (goal >= 0.97);
- aggregate tokens/s at 1, 2, 4, 8 concurrent streams (each stream `--tokens` tokens, end
  tokens banned so every stream runs its full length) on one server with --parallel N slots
  (default: the most streams, so every stream has a slot; --ctx is N times one stream's);
- time to first token for a prompt of about --prompt-tokens tokens, cold and again with the
  prompt cached in the slot's KV cache;
- with --llama-server PATH: the same runs against llama.cpp's llama-server `-np N` on the
  same GGUF (aggregate ratio qwq-local / llama-server, goal >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwq_local import constants  # noqa: E402

SYSTEM = "You are a helpful assistant. " * 4
USER = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def start_qwq(model: Path, *, ctx: int, threads: int, parallel: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "qwq_local.cli", "serve", "-m", str(model), "--port", "0", "--ctx", str(ctx * parallel),
           "--threads", str(threads), "--alias", "bench", "--parallel", str(parallel), "--queue", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"qwq-local serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, match.group(1)


def start_llama_server(path: str, model: Path, *, ctx: int, threads: int, parallel: int
                       ) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([path, "-m", str(model), "-np", str(parallel), "-c", str(ctx * parallel), "-t",
                             str(threads), "--port", str(port), "--host", "127.0.0.1", "-a", "bench"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import requests

    for _ in range(600):
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("llama-server did not become healthy")


def one_stream(client, *, tokens: int, bias: dict, messages=USER) -> dict:
    """Stream one reply; tokens/s from the first to the last content/thought piece."""
    t0 = time.perf_counter()
    first = last = None
    usage = None
    stream = client.chat.completions.create(model="bench", messages=messages, stream=True, max_tokens=tokens,
                                            logit_bias=bias, stream_options={"include_usage": True},
                                            temperature=0.6, seed=1)
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        d = chunk.choices[0].delta
        if getattr(d, "reasoning_content", None) or d.content:
            last = time.perf_counter()
            first = first or last
    n = usage.completion_tokens if usage else tokens
    return {"ttft_s": (first or t0) - t0, "tokens": n,
            "tps": (n - 1) / (last - first) if last and first and last > first else 0.0, "wall_s": time.perf_counter() - t0}


def aggregate(client, *, streams: int, tokens: int, bias: dict) -> float:
    done: list[dict] = []
    threads = [threading.Thread(target=lambda: done.append(one_stream(client, tokens=tokens, bias=bias)))
               for _ in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r["tokens"] for r in done) / (time.perf_counter() - t0)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_server(url: str, *, tokens: int, streams: list[int], prompt_tokens: int, bias: dict) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    one_stream(client, tokens=8, bias=bias)  # warm-up
    single = one_stream(client, tokens=tokens, bias=bias)
    note(f"  one stream: {single['tps']:.1f} tok/s")
    agg = {}
    for n in streams:
        agg[n] = aggregate(client, streams=n, tokens=tokens, bias=bias)
        note(f"  {n} streams: {agg[n]:.1f} tok/s")
    words = max(1, prompt_tokens // 2)  # ~2 tokens per "w123" word with the Qwen2 tokenizer
    long = [{"role": "user", "content": " ".join(f"w{i}" for i in range(words)) + " Summarize."}]
    cold = one_stream(client, tokens=2, bias=bias, messages=long)
    cached = one_stream(client, tokens=2, bias=bias, messages=long)
    return {"single_tps": single["tps"], "aggregate_tps": agg, "ttft_cold_s": cold["ttft_s"],
            "ttft_cached_s": cached["ttft_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--workdir", type=Path, default=constants.cache_dir() / "bench")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--parallel", type=int, default=None,
                        help="slots of qwq-local serve (default: the most --streams), each with the context of one")
    parser.add_argument("--llama-server", help="path to llama.cpp's llama-server, to compare against")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from bench_runtime import build_model

    from qwq_local import QwQ

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(args.workdir)
    streams = [int(s) for s in args.streams.split(",") if s]
    ctx = max(2048, args.prompt_tokens + args.tokens + 256)
    note(f"bench tg on {model.name} ...")
    with QwQ.load(model, n_ctx=ctx, threads=args.threads) as m:
        tg = m.bench(prompt_tokens=16, gen_tokens=args.tokens)["tg_tps"]
        bias = {str(t): -100 for t in m.eog_bias()}
    note(f"  tg {tg:.1f} tok/s; qwq-local serve ...")
    parallel = args.parallel or max(streams)
    proc, url = start_qwq(model, ctx=ctx, threads=args.threads, parallel=parallel)
    try:
        ours = run_server(url, tokens=args.tokens, streams=streams, prompt_tokens=args.prompt_tokens, bias=bias)
    finally:
        proc.terminate()
        proc.wait(30)
    result = {"model": str(model), "threads": args.threads, "tokens": args.tokens, "parallel": parallel,
              "bench_tg_tps": tg,
              "qwq_local": ours, "single_vs_bench_tg": ours["single_tps"] / tg if tg else None}
    if args.llama_server:
        path = shutil.which(args.llama_server) or args.llama_server
        proc, url = start_llama_server(path, model, ctx=ctx, threads=args.threads, parallel=max(streams))
        try:
            theirs = run_server(url, tokens=args.tokens, streams=streams, prompt_tokens=args.prompt_tokens, bias=bias)
        finally:
            proc.terminate()
            proc.wait(30)
        result["llama_server"] = theirs
        result["aggregate_ratio"] = {n: ours["aggregate_tps"][n] / theirs["aggregate_tps"][n] for n in streams}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model {model.name}, {args.threads} threads, {args.tokens} tokens per stream, --parallel {parallel}")
    print(f"qwq-local bench tg:        {tg:8.1f} tok/s")
    print(f"one stream via HTTP/SSE:   {ours['single_tps']:8.1f} tok/s  ({result['single_vs_bench_tg']:.3f} of tg)")
    for n, v in ours["aggregate_tps"].items():
        extra = f"  llama-server {result['llama_server']['aggregate_tps'][n]:.1f}" if args.llama_server else ""
        print(f"aggregate, {n} streams:     {v:8.1f} tok/s  ({v / ours['aggregate_tps'][streams[0]]:.2f}x){extra}")
    print(f"TTFT ~{args.prompt_tokens}-token prompt: cold {ours['ttft_cold_s']:.3f} s, cached {ours['ttft_cached_s']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
