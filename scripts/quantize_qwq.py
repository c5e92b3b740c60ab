#!/usr/bin/env python3
"""Quantize a QwQ GGUF with llama.cpp's quantizer (the same as `qwq-local quantize`).

    python scripts/quantize_qwq.py qwq-32b-bf16.gguf qwq-32b-q4_k_m.gguf --type Q4_K_M
"""

import sys

import typer

from qwq_local.cli import app

if __name__ == "__main__":
    command = typer.main.get_command(app).commands["quantize"]
    command.help = f"{__doc__.strip()}\n\n{command.help}"
    sys.exit(command.main(sys.argv[1:], prog_name="quantize_qwq.py"))
