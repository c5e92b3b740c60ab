"""The `qwq-local` command line: a typer app whose commands are thin clients of the public
Python API; they parse options, call the library, print, and map typed errors to one line and
an exit code (one module per command group: files, run, machine, hub, serve)."""

from __future__ import annotations

import sys

from .. import constants
from . import files, hub, machine, run, serve, worker  # noqa: F401  (each registers its commands on `app`)
from .app import app, err

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        if constants.debug_enabled():
            raise
        err("interrupted")
        sys.exit(130)
