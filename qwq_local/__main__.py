"""`python -m qwq_local`: the qwq-local command line (the same as the `qwq-local` command)."""

from .cli import main

main()
