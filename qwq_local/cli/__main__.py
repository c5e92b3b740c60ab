"""`python -m qwq_local.cli`: the qwq-local command line."""

from . import main

main()
