"""Serving speed of `qwq-local serve` through HTTP/SSE, against `qwq-local bench` and llama-server.

    .venv/bin/python benchmarks/bench_serve.py [--model FILE.gguf | --shape 1024x8|0.5b] [--tokens 128]
                                               [--threads 2] [--streams 1,2,4,8] [--prompt-tokens 1024]
                                               [--parallel N] [--rounds 3] [--draft ngram|FILE]
                                               [--client raw|openai] [--llama-server PATH] [--json]

Without --model it uses bench_runtime.py's QwQ-shaped random Q4_K_M model of --shape (1024x8:
hidden 1024, 8 layers; 0.5b: Qwen2.5-0.5B's layer shapes; built once in --workdir). Reported, as
medians over --rounds rounds that interleave every measurement (this machine's speed drifts by
tens of percent within minutes, so figures taken minutes apart do not compare):
- one stream's tokens/s through HTTP/SSE against `QwQ.bench` tg (what `qwq-local bench` prints)
  on the same model and threads, measured right before it in the same round (goal >= 0.97);
- aggregate tokens/s at 1, 2, 4, 8 concurrent streams (each stream `--tokens` tokens, end
  tokens banned so every stream runs its full length) on one server with --parallel N slots
  (default: the most streams, so every stream has a slot; --ctx is N times one stream's);
- time to first token for a prompt of about --prompt-tokens tokens, cold and again with the
  prompt cached in the slot's KV cache;
- with --llama-server PATH: the same against llama.cpp's llama-server `-np N` on the same GGUF,
  up at the same time and measured in turn with qwq-local in every round (ratio qwq-local /
  llama-server per round, median; goal >= 1.0).
The client runs on the same machine as the server and takes CPU from it. --client raw (default)
reads the SSE lines with requests and parses each chunk with json.loads (about 0.1 ms of CPU per
chunk here); --client openai is the official client, which builds a pydantic object per chunk
(about 0.8 ms). Both servers are driven by the same client.
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
from bench_runtime import SHAPE_HELP, SHAPES  # noqa: E402

SYSTEM = "You are a helpful assistant. " * 4
USER = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def start_qwq(model: Path, *, ctx: int, threads: int, parallel: int, draft: str | None = None
              ) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "qwq_local.cli", "serve", "-m", str(model), "--port", "0", "--ctx", str(ctx * parallel),
           "--threads", str(threads), "--alias", "bench", "--parallel", str(parallel), "--queue", "64"]
    if draft:
        cmd += ["--draft", draft]
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
    for chunk in client.stream(messages=messages, max_tokens=tokens, logit_bias=bias):
        if not chunk["choices"]:
            usage = chunk["usage"]
            continue
        d = chunk["choices"][0]["delta"]
        if d.get("reasoning_content") or d.get("content"):
            last = time.perf_counter()
            first = first or last
    n = usage["completion_tokens"] if usage else tokens
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


class OpenAIClient:
    """The official openai client: a pydantic object per chunk (about 0.8 ms of CPU per chunk here)."""

    def __init__(self, url: str) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)

    def stream(self, **body):
        for chunk in self.client.chat.completions.create(model="bench", stream=True, stream_options={"include_usage": True},
                                                         temperature=0.6, seed=1, **body):
            if not chunk.choices:
                yield {"choices": [], "usage": {"completion_tokens": chunk.usage.completion_tokens}}
                continue
            d = chunk.choices[0].delta  # only what one_stream reads: no model_dump() per chunk
            yield {"choices": [{"delta": {"content": d.content,
                                          "reasoning_content": getattr(d, "reasoning_content", None)}}]}


class RawClient:
    """requests and json.loads per `data:` line: the least a client does, so that the figures
    are the server's rather than the client's (both share this machine's cores)."""

    def __init__(self, url: str) -> None:
        self.url = url + "/v1/chat/completions"

    def stream(self, **body):
        import requests

        body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True},
                "temperature": 0.6, "seed": 1, **body}
        # A connection per request: a pooled one may have been closed by the server's keep-alive
        # timeout (5 s in uvicorn and llama-server) just as it is reused, and a POST is not retried.
        with requests.post(self.url, json=body, stream=True, timeout=600,
                           headers={"Authorization": "Bearer bench", "Connection": "close"}) as response:
            response.raise_for_status()
            # chunk_size=None: each piece as it arrives, so that timestamps are the server's.
            for line in response.iter_lines(chunk_size=None):
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    yield json.loads(line[6:])


def client_for(url: str, kind: str):
    return (RawClient if kind == "raw" else OpenAIClient)(url)


def ttft(client, *, prompt_tokens: int, bias: dict) -> dict:
    words = max(1, prompt_tokens // 2)  # ~2 tokens per "w123" word with the Qwen2 tokenizer
    long = [{"role": "user", "content": " ".join(f"w{i}" for i in range(words)) + " Summarize."}]
    cold = one_stream(client, tokens=2, bias=bias, messages=long)
    cached = one_stream(client, tokens=2, bias=bias, messages=long)
    return {"ttft_cold_s": cold["ttft_s"], "ttft_cached_s": cached["ttft_s"]}


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run_rounds(qwq, clients: dict, *, rounds: int, tokens: int, streams: list[int], bias: dict) -> dict:
    """Every round: tg, then for each server one stream and each stream count, in turn."""
    for client in clients.values():
        one_stream(client, tokens=8, bias=bias)  # warm-up
    rows: dict = {"tg": [], **{name: {"single": [], **{n: [] for n in streams}} for name in clients}}
    for r in range(rounds):
        rows["tg"].append(qwq.bench(prompt_tokens=16, gen_tokens=tokens)["tg_tps"])
        for name, client in clients.items():
            rows[name]["single"].append(one_stream(client, tokens=tokens, bias=bias)["tps"])
        for n in streams:
            for name, client in clients.items():
                rows[name][n].append(aggregate(client, streams=n, tokens=tokens, bias=bias))
        note(f"  round {r + 1}: tg {rows['tg'][-1]:.1f}; " + "; ".join(
            f"{name} one {rows[name]['single'][-1]:.1f}, " + "/".join(f"{rows[name][n][-1]:.1f}" for n in streams)
            for name in clients))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--workdir", type=Path, default=constants.cache_dir() / "bench")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", default="1024x8", choices=SHAPES, help=SHAPE_HELP)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--parallel", type=int, default=None,
                        help="slots of qwq-local serve (default: the most --streams), each with the context of one")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--draft", help="speculative decoding in qwq-local serve: ngram or a draft GGUF")
    parser.add_argument("--llama-server", help="path to llama.cpp's llama-server, to compare against")
    parser.add_argument("--client", choices=("raw", "openai"), default="raw",
                        help="raw: requests + json.loads per chunk (default); openai: the official client")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from bench_runtime import build_model

    from qwq_local import QwQ

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(args.workdir, args.shape)
    streams = [int(s) for s in args.streams.split(",") if s]
    ctx = max(2048, args.prompt_tokens + args.tokens + 256)
    parallel = args.parallel or max(streams)
    procs, clients = [], {}
    try:
        proc, url = start_qwq(model, ctx=ctx, threads=args.threads, parallel=parallel, draft=args.draft)
        procs.append(proc)
        clients["qwq_local"] = client_for(url, args.client)
        if args.llama_server:
            path = shutil.which(args.llama_server) or args.llama_server
            proc, url = start_llama_server(path, model, ctx=ctx, threads=args.threads, parallel=parallel)
            procs.append(proc)
            clients["llama_server"] = client_for(url, args.client)
        with QwQ.load(model, n_ctx=ctx, threads=args.threads) as m:
            bias = {str(t): -100 for t in m.eog_bias()}
            note(f"{args.rounds} rounds on {model.name} ...")
            rows = run_rounds(m, clients, rounds=args.rounds, tokens=args.tokens, streams=streams, bias=bias)
        ttfts = {name: ttft(client, prompt_tokens=args.prompt_tokens, bias=bias) for name, client in clients.items()}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    result = {"model": str(model), "client": args.client, "threads": args.threads, "tokens": args.tokens, "parallel": parallel,
              "rounds": args.rounds, "bench_tg_tps": median(rows["tg"]), "per_round": rows,
              "single_vs_bench_tg": median([a / b for a, b in zip(rows["qwq_local"]["single"], rows["tg"])])}
    for name in clients:
        result[name] = {"single_tps": median(rows[name]["single"]),
                        "aggregate_tps": {n: median(rows[name][n]) for n in streams}, **ttfts[name]}
    if args.llama_server:
        result["aggregate_ratio"] = {n: median([a / b for a, b in zip(rows["qwq_local"][n], rows["llama_server"][n])])
                                     for n in streams}
        result["llama_server"]["single_vs_bench_tg"] = median(
            [a / b for a, b in zip(rows["llama_server"]["single"], rows["tg"])])
    ours = result["qwq_local"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model {model.name}, {args.threads} threads, {args.tokens} tokens per stream, --parallel {parallel}, "
          f"{args.client} client, medians of {args.rounds} interleaved rounds")
    print(f"qwq-local bench tg:        {result['bench_tg_tps']:8.1f} tok/s")
    theirs = result.get("llama_server")
    extra = f"; llama-server {theirs['single_tps']:.1f} ({theirs['single_vs_bench_tg']:.3f})" if theirs else ""
    print(f"one stream via HTTP/SSE:   {ours['single_tps']:8.1f} tok/s  ({result['single_vs_bench_tg']:.3f} of tg)"
          + extra)
    for n, v in ours["aggregate_tps"].items():
        extra = (f"  llama-server {theirs['aggregate_tps'][n]:.1f} ({theirs['aggregate_tps'][n] / theirs['aggregate_tps'][streams[0]]:.2f}x);"
                 f" ratio {result['aggregate_ratio'][n]:.2f}") if theirs else ""
        print(f"aggregate, {n} streams:     {v:8.1f} tok/s  ({v / ours['aggregate_tps'][streams[0]]:.2f}x){extra}")
    for name in clients:
        r = result[name]
        print(f"TTFT ~{args.prompt_tokens}-token prompt ({name}): cold {r['ttft_cold_s']:.3f} s, cached {r['ttft_cached_s']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
