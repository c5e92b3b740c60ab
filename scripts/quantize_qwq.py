#!/usr/bin/env python3
"""Quantize a QwQ GGUF with llama.cpp's quantizer (the same as `qwq-local quantize`).

    python scripts/quantize_qwq.py qwq-32b-bf16.gguf qwq-32b-q4_k_m.gguf --type Q4_K_M
"""

import sys

from qwq_local.cli import app

if __name__ == "__main__":
    sys.exit(app(["quantize", *sys.argv[1:]], standalone_mode=True))
