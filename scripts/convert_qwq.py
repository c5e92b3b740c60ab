#!/usr/bin/env python3
"""Convert a QwQ-32B (Qwen2) Hugging Face checkpoint to GGUF: a thin wrapper around
`qwq_local.convert` (the same as `qwq-local convert`).

    python scripts/convert_qwq.py Qwen/QwQ-32B -o qwq-32b-bf16.gguf [--outtype bf16|f16|f32|q8_0]
"""

from __future__ import annotations

import argparse
import sys

from qwq_local import constants
from qwq_local.errors import QwQLocalError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?", default=constants.QWQ_REPO_ID,
                        help="checkpoint directory or Hugging Face repo id (default: %(default)s)")
    parser.add_argument("-o", "--output", required=True, help="GGUF file to write")
    parser.add_argument("--outtype", default=constants.DEFAULT_OUTTYPE, choices=constants.OUTTYPES, type=str.lower)
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    args = parser.parse_args(argv)

    from qwq_local.cli.options import convert_progress, progress_bar
    from qwq_local.convert.pipeline import convert

    try:
        with progress_bar("convert") as bar:
            path = convert(args.src, args.output, outtype=args.outtype, revision=args.revision,
                           **convert_progress(bar))
    except QwQLocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # the partial output is already removed
        print("interrupted", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
