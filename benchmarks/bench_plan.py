"""Predicted (qwq_local.plan) vs measured (llama.cpp's logged buffer sizes) memory, CPU loads.

    .venv/bin/python benchmarks/bench_plan.py [--hidden 1024 --layers 4 --ffn 4096] [--keep DIR]

Builds a QwQ-shaped model of the given size with the project's own converter and quantizer,
then for each quant x context x KV type x flash-attention setting loads it with llama.cpp,
reads what it allocated, and prints a Markdown table.

    .venv/bin/python benchmarks/bench_plan.py --qwq-layers 2

instead writes a GGUF with QwQ-32B's exact shapes (hidden 5120, FFN 27648, 40/8 heads, 152064
vocabulary) but only N layers, as Q4_0 blocks of zero bytes (allocation depends on shapes only,
and this skips quantizing billions of random weights): 2 layers is a 1.4 GB file.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qwq_local.convert.pipeline import convert
from qwq_local.plan.memory import plan
from qwq_local.plan.measure import measure
from qwq_local.quantize.quantizer import quantize
from qwq_local.synthetic.factory import make_tiny_checkpoint

MiB = 1024 * 1024
SETTINGS = [  # (n_ctx, kv_type, flash_attn)
    (512, "f16", None), (4096, "f16", None), (8192, "f16", None), (8192, "q8_0", None),
    (8192, "q4_0", None), (2048, "f16", False), (8192, "f16", False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=128,
                    help="Pad the vocabulary (embedding rows) to a multiple of this; 32768 gives a "
                         "QwQ-like logits-dominated compute buffer.")
    ap.add_argument("--quants", default="bf16,Q8_0,Q4_K_M")
    ap.add_argument("--keep", type=Path, help="Directory to build the models in (kept).")
    ap.add_argument("--qwq-layers", type=int, default=0, help="Use QwQ-32B's shapes with this many layers.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.qwq_layers:
            path = work / f"qwq-shaped-{args.qwq_layers}L-Q4_0.gguf"
            if not path.exists():
                _write_qwq_shaped(path, args.qwq_layers)
            print(f"model: QwQ-32B shapes, {args.qwq_layers} layers, Q4_0 (zero blocks); n_ubatch 512; "
                  "sizes in MiB (measured / predicted)\n")
            _table({"Q4_0": path})
            return
        ckpt = make_tiny_checkpoint(work / "ckpt", hidden_size=args.hidden, num_hidden_layers=args.layers,
                                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                    intermediate_size=args.ffn, pad_vocab_to=args.vocab)
        bf16 = work / "bench-bf16.gguf"
        if not bf16.exists():
            convert(ckpt, bf16)
        files = {}
        for q in args.quants.split(","):
            if q.lower() == "bf16":
                files[q] = bf16
                continue
            out = work / f"bench-{q}.gguf"
            if not out.exists():
                quantize(bf16, out, qtype=q)
            files[q] = out

        print(f"model: hidden {args.hidden}, {args.layers} layers, FFN {args.ffn}, heads "
              f"{args.heads}/{args.kv_heads}, vocabulary rows padded to {args.vocab}; n_ubatch 512; "
              "sizes in MiB (measured / predicted)\n")
        _table(files)


def _table(files: dict[str, Path]) -> None:
    print("| quant | n_ctx | KV | FA | weights | KV cache | compute | output | total | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for q, path in files.items():
        for n_ctx, kv, fa in SETTINGS:
            got = measure(path, n_ctx=n_ctx, kv_type=kv, flash_attn=fa, validate=False)
            p = plan(path, n_ctx=n_ctx, kv_type=kv, flash_attn=fa, vram=0, ram=1 << 42)
            pairs = [(got.kind("model"), sum(p.weights_logged.values())), (got.kind("KV"), sum(p.kv.values())),
                     (got.kind("compute"), sum(p.compute.values())), (got.kind("output"), sum(p.output.values())),
                     (got.total, p.logged_total_bytes)]
            err = (p.logged_total_bytes - got.total) / got.total
            worst = max(worst, abs(err))
            cells = " | ".join(f"{m / MiB:.2f} / {pr / MiB:.2f}" for m, pr in pairs)
            fa_txt = {None: "auto", True: "on", False: "off"}[fa]
            print(f"| {q} | {n_ctx} | {kv} | {fa_txt} | {cells} | {err:+.2%} |", flush=True)
    print(f"\nworst total error: {worst:.2%}")


def _write_qwq_shaped(path: Path, n_layer: int) -> None:
    """QwQ-32B's layer shapes with all-zero Q4_0 weights (cheap to write, real sizes)."""
    import gguf
    import numpy as np

    from qwq_local import constants
    from qwq_local.synthetic.factory import write_qwen2_gguf

    dims = constants.QWQ_32B_DIMS
    q4 = gguf.GGMLQuantizationType.Q4_0

    def tensor(name, shape):
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32)
        return np.zeros((shape[0], shape[1] // 32 * 18), dtype=np.uint8), q4

    write_qwen2_gguf(path, n_embd=dims["hidden"], n_layer=n_layer, n_head=dims["n_head"],
                     n_head_kv=dims["n_head_kv"], n_ff=dims["ffn"], n_vocab=dims["vocab"],
                     context_length=constants.MAX_CONTEXT, tensor=tensor)


if __name__ == "__main__":
    main()
