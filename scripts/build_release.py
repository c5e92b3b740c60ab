#!/usr/bin/env python3
"""Build a QwQ GGUF release: checkpoint -> bf16 GGUF -> quants -> manifest.json.

    python scripts/build_release.py Qwen/QwQ-32B out/ --quants Q4_K_M Q5_K_M Q6_K Q8_0
"""

import argparse
import sys

from qwq_local import constants
from qwq_local.errors import QwQLocalError
from qwq_local.quantize.release import build_release


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default=constants.QWQ_REPO_ID, help="checkpoint directory or HF repo id")
    ap.add_argument("out_dir", help="where the GGUFs and manifest.json go")
    ap.add_argument("--quants", nargs="+", default=list(constants.RELEASE_QUANTS))
    ap.add_argument("--imatrix", default=None)
    ap.add_argument("--name", default=None, help="file name stem (default: from the source)")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    try:
        build_release(args.source, args.out_dir, quants=args.quants, imatrix=args.imatrix, name=args.name,
                      revision=args.revision, threads=args.threads, on_step=lambda m: print(m, flush=True))
    except QwQLocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # no partial file is left under a final name
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
