"""`python -m qwq_local.gguf MODEL`: the child process of the first-load check (safe_load.py)."""

import sys

from .safe_load import child_main

sys.exit(child_main(sys.argv[1:]))
