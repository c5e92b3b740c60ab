"""Speculative decoding against plain decoding on the same GGUF: tg, acceptance, identical text.

    .venv/bin/python benchmarks/bench_speculative.py [-m MODEL.gguf] [--draft ngram|DRAFT.gguf ...]
        [--self-draft] [--fixed K] [--tokens 256] [--rounds 3] [--threads 1] [--json]

Three prompts at temperature 0: a 60-line function to rewrite with one change and a long
structured list (text that repeats its context) and an open question (text that does not).
For each prompt the modes run interleaved, round after round (plain, then each draft), and the
median tokens/s of each is reported with its speed-up over plain decoding, the share of proposed
tokens kept, and whether the text equals plain decoding's; at the first differing token the
position and the target's top-1/top-2 logit margin there (from a one-token decode) are printed:
a near-tie that batched verification flipped, never hidden.

--draft: "ngram" (default) and/or draft GGUF paths. --self-draft adds the model as its own
draft: every proposal is the target's own argmax, so it shows what verification and drafting
cost. --fixed K also runs each draft with a fixed K proposals per round (no adaptive length).
Without -m the script builds the QwQ-shaped random model of bench_runtime.py (hidden 1024,
8 layers, Q4_K_M). Generation ignores end tokens so every run makes --tokens tokens.

--llama-server PATH also runs the same rendered prompts through llama.cpp's own server
(`/completion`, temperature 0, end tokens ignored, --threads, one slot) without speculation and
with each of its n-gram modes (--spec-type ngram-simple, ngram-map-k, ngram-mod, ngram-cache),
reporting its own `timings.predicted_per_second`, its draft counts, and whether its text equals
its plain run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwq_local import constants  # noqa: E402

FUNCTION = "\n".join([
    "def summarize_orders(orders, customers, tax_rate=0.2):",
    '    """Group orders by customer and compute totals."""',
    "    result = {}",
    "    for order in orders:",
    "        customer_id = order['customer_id']",
    "        if customer_id not in customers:",
    "            continue",
    "        customer = customers[customer_id]",
    "        entry = result.setdefault(customer_id, {",
    "            'name': customer['name'],",
    "            'email': customer['email'],",
    "            'orders': 0,",
    "            'items': 0,",
    "            'subtotal': 0.0,",
    "            'tax': 0.0,",
    "            'total': 0.0,",
    "            'largest_order': None,",
    "        })",
    "        entry['orders'] += 1",
    "        subtotal = 0.0",
    "        for item in order['items']:",
    "            quantity = item['quantity']",
    "            price = item['price']",
    "            if quantity <= 0:",
    "                raise ValueError(f\"bad quantity in order {order['id']}\")",
    "            if price < 0:",
    "                raise ValueError(f\"bad price in order {order['id']}\")",
    "            entry['items'] += quantity",
    "            subtotal += quantity * price",
    "        discount = order.get('discount', 0.0)",
    "        if discount:",
    "            subtotal -= subtotal * discount",
    "        tax = subtotal * tax_rate",
    "        total = subtotal + tax",
    "        entry['subtotal'] += subtotal",
    "        entry['tax'] += tax",
    "        entry['total'] += total",
    "        largest = entry['largest_order']",
    "        if largest is None or total > largest['total']:",
    "            entry['largest_order'] = {'id': order['id'], 'total': total}",
    "    for entry in result.values():",
    "        entry['subtotal'] = round(entry['subtotal'], 2)",
    "        entry['tax'] = round(entry['tax'], 2)",
    "        entry['total'] = round(entry['total'], 2)",
    "        if entry['orders']:",
    "            entry['average'] = round(entry['total'] / entry['orders'], 2)",
    "        else:",
    "            entry['average'] = 0.0",
    "    ranked = sorted(result.values(), key=lambda e: e['total'], reverse=True)",
    "    for rank, entry in enumerate(ranked, start=1):",
    "        entry['rank'] = rank",
    "    summary = {",
    "        'customers': len(result),",
    "        'orders': sum(e['orders'] for e in result.values()),",
    "        'revenue': round(sum(e['total'] for e in result.values()), 2),",
    "        'tax': round(sum(e['tax'] for e in result.values()), 2),",
    "    }",
    "    if ranked:",
    "        summary['top_customer'] = ranked[0]['name']",
    "    return result, summary",
])
PROMPTS = {
    "rewrite": f"Rewrite this function with one change: rename `tax_rate` to `vat_rate` everywhere. "
               f"Output the whole function.\n\n```python\n{FUNCTION}\n```",
    "list": "Write a long structured list: for each of the 12 months, a heading with its name, then "
            "'- Days:', '- Season (northern hemisphere):', '- Holidays:', '- Weather:', '- Activities:' lines.",
    "open": "What makes a life well lived? Think it through in your own words.",
}


def margin_at(qwq, prompt_tokens: list[int], generated: list[int], i: int) -> float:
    """Top-1 minus top-2 logit of the target at generated position i (one-token decodes)."""
    import numpy as np

    from qwq_local.backend import binding as backend

    ctx = backend.Context(qwq._model, n_ctx=len(prompt_tokens) + i + 8, n_threads=qwq.threads)
    try:
        ctx.decode(prompt_tokens + generated[:i], start_pos=0)
        top = np.sort(ctx.logits(-1))[-2:]
        return float(top[1] - top[0])
    finally:
        ctx.close()


LLAMA_SERVER_MODES = ("none", "ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")


def llama_server_runs(path: str, model: Path, prompts: dict[str, str], *, tokens: int, rounds: int,
                      threads: int) -> dict[str, dict[str, dict]]:
    """{prompt: {mode: row}} from llama.cpp's server on 127.0.0.1, one server process per mode."""
    import socket
    import subprocess
    import time
    import urllib.request

    def post(url: str, body: dict) -> dict:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    out: dict[str, dict[str, dict]] = {name: {} for name in prompts}
    texts: dict[str, str] = {}
    for mode in LLAMA_SERVER_MODES:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        argv = [path, "-m", str(model), "-c", "4096", "-t", str(threads), "-np", "1", "--host", "127.0.0.1",
                "--port", str(port)] + ([] if mode == "none" else ["--spec-type", mode])
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.2)
            for name, text in prompts.items():
                runs = [post(url + "/completion", {"prompt": text, "n_predict": tokens, "temperature": 0,
                                                   "ignore_eos": True, "cache_prompt": False})
                        for _ in range(rounds)]
                timings = [r["timings"] for r in runs]
                row = {"tg_tps": statistics.median(t["predicted_per_second"] for t in timings),
                       "draft_tokens": sum(t.get("draft_n", 0) for t in timings),
                       "draft_accepted_tokens": sum(t.get("draft_n_accepted", 0) for t in timings)}
                if mode == "none":
                    texts[name] = runs[0]["content"]
                row["identical"] = all(r["content"] == texts.get(name) for r in runs)
                out[name][mode] = row
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for rows in out.values():
        base = rows["none"]["tg_tps"]
        for row in rows.values():
            row["speedup"] = row["tg_tps"] / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", type=Path)
    parser.add_argument("--draft", action="append", help="ngram or a draft GGUF (repeatable; default ngram)")
    parser.add_argument("--self-draft", action="store_true", help="also the model as its own draft")
    parser.add_argument("--fixed", type=int, default=0, help="also run each draft with K proposals per round")
    parser.add_argument("--draft-max", type=int, default=constants.DEFAULT_DRAFT_MAX)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated subset of " + ",".join(PROMPTS))
    parser.add_argument("--workdir", type=Path, default=constants.cache_dir() / "bench")
    parser.add_argument("--llama-server", help="path to llama.cpp's llama-server, to run its n-gram modes too")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from qwq_local import QwQ

    if args.model is None:
        from bench_runtime import build_model

        args.model = build_model(args.workdir)
    drafts = list(args.draft or [constants.DRAFT_NGRAM])
    if args.self_draft:
        drafts.append(str(args.model))
    modes: list[tuple[str, str, int]] = [(f"draft {Path(d).name}", d, 0) for d in drafts]
    if args.fixed:
        modes += [(f"draft {Path(d).name} fixed {args.fixed}", d, args.fixed) for d in drafts]
    n_ctx = 4096
    loaded = {}
    for name, draft, fixed in modes:
        qwq = QwQ.load(args.model, n_ctx=n_ctx, gpu_layers=0, threads=args.threads, seed=0, draft=draft,
                       draft_max=fixed or args.draft_max)
        qwq.speculator.adaptive.fixed = bool(fixed)
        loaded[name] = qwq
    plain = next(iter(loaded.values()))
    results = {}
    for pname in args.prompts.split(","):
        messages = [{"role": "user", "content": PROMPTS[pname]}]
        prompt_tokens = plain.tokenize(plain.render_prompt(messages))
        runs: dict[str, list] = {"plain": []}
        runs.update({name: [] for name, _, _ in modes})
        for _ in range(args.rounds):
            for name in runs:
                qwq = plain if name == "plain" else loaded[name]
                qwq.reset()
                reply = qwq.chat(messages, temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
                                 speculative=name != "plain")
                runs[name].append(reply)
        ref = runs["plain"][0].tokens
        base = statistics.median(r.timings["gen_tps"] for r in runs["plain"])
        rows = {}
        for name, replies in runs.items():
            tps = statistics.median(r.timings["gen_tps"] for r in replies)
            drafted = sum(r.usage["draft_tokens"] for r in replies)
            kept = sum(r.usage["draft_accepted_tokens"] for r in replies)
            row = {"tg_tps": tps, "speedup": tps / base, "draft_tokens": drafted, "draft_accepted_tokens": kept,
                   "acceptance": kept / drafted if drafted else None, "identical": True}
            for r in replies:
                if r.tokens != ref:
                    i = next((j for j, (a, b) in enumerate(zip(r.tokens, ref)) if a != b), min(len(r.tokens), len(ref)))
                    row.update(identical=False, diverged_at=i, margin=margin_at(plain, prompt_tokens, ref, i))
                    break
            rows[name] = row
        results[pname] = {"prompt_tokens": len(prompt_tokens), "modes": rows}
    theirs = None
    if args.llama_server:
        rendered = {p: plain.render_prompt([{"role": "user", "content": PROMPTS[p]}]) for p in args.prompts.split(",")}
        theirs = llama_server_runs(args.llama_server, args.model, rendered, tokens=args.tokens, rounds=args.rounds,
                                   threads=args.threads)
    for qwq in loaded.values():
        qwq.close()
    meta = {"model": str(args.model), "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
            "draft_max": args.draft_max}
    if args.json:
        print(json.dumps({**meta, "prompts": results, "llama_server": theirs}, indent=2))
        return
    print(f"model: {args.model.name}, {args.tokens} tokens at temperature 0, {args.rounds} rounds interleaved, "
          f"{args.threads} thread(s), draft_max {args.draft_max}")
    print(f"{'prompt':<9}{'mode':<34}{'tg tok/s':>10}{'vs plain':>10}{'kept':>14}  text")
    for pname, res in results.items():
        for name, row in res["modes"].items():
            kept = f"{row['draft_accepted_tokens']}/{row['draft_tokens']}" if row["draft_tokens"] else "-"
            same = "identical" if row["identical"] else (
                f"differs at token {row['diverged_at']} (margin {row['margin']:.3f})")
            print(f"{pname:<9}{name:<34}{row['tg_tps']:>10.2f}{row['speedup']:>9.2f}x{kept:>14}  {same}")
    for pname, rows in (theirs or {}).items():
        for mode, row in rows.items():
            kept = f"{row['draft_accepted_tokens']}/{row['draft_tokens']}" if row["draft_tokens"] else "-"
            same = "identical to its plain run" if row["identical"] else "differs from its plain run"
            print(f"{pname:<9}{'llama-server ' + mode:<34}{row['tg_tps']:>10.2f}{row['speedup']:>9.2f}x{kept:>14}  {same}")


if __name__ == "__main__":
    main()
