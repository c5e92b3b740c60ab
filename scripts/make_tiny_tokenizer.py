"""Regenerate qwq_local/data/tiny_tokenizer.json: the byte-level BPE base vocabulary that the
tiny QwQ-shaped test checkpoints use (added tokens are appended by qwq_local.synthetic).

Needs the `tokenizers` library (test extra). The output is committed so that the demo and the
tests need no training step: run this only to change the tiny vocabulary.

    python scripts/make_tiny_tokenizer.py [--vocab-size 2000]
"""

from __future__ import annotations

import argparse
import json
import pydoc
import sys
from pathlib import Path

# Qwen2's pre-tokenizer regex (see the model's tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def corpus() -> list[str]:
    """Varied text from the standard library's own documentation and source."""
    import inspect
    import json as json_mod
    import pathlib
    import textwrap

    texts = []
    for mod in (json_mod, pathlib, textwrap, argparse, inspect):
        texts.append(pydoc.render_doc(mod, renderer=pydoc.plaintext))
        texts.append(inspect.getsource(mod))
    texts.append(Path(__file__).read_text())
    package = Path(__file__).resolve().parents[1] / "qwq_local"
    for name in ("eval.txt", "chat_template.jinja"):
        if (package / "data" / name).exists():
            texts.append((package / "data" / name).read_text())
    texts.append("你好，世界。这是一个测试。日本語のテキストも少し。 한국어 문장. Ünïcödé café naïve 😀🚀✨")
    return texts


def main(argv: list[str] | None = None) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("-o", "--output", type=Path,
                    default=Path(__file__).resolve().parents[1] / "qwq_local/data/tiny_tokenizer.json")
    args = ap.parse_args(argv)

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False,
                       "trim_offsets": False, "use_regex": False}
    data["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": False, "use_regex": False}
    args.output.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    print(f"wrote {args.output} ({len(data['model']['vocab'])} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
