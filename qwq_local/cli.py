"""The `qwq-local` command line: parses options, calls the public library, prints.

Library errors (QwQLocalError) become one line on stderr and the error's exit code;
QWQ_LOCAL_DEBUG=1 shows the traceback instead.
"""


import contextlib
import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import constants
from .errors import QwQLocalError

app = typer.Typer(
    name="qwq-local",
    help="Run Qwen's QwQ-32B locally: convert, quantize, fit to your machine, chat. Offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def command(*names: str, **kwargs):
    """`app.command`, plus the error mapping: a QwQLocalError prints one line and exits with
    its code (so CliRunner tests see the same behaviour as the console script)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except QwQLocalError as exc:
                if constants.debug_enabled():
                    raise
                _err(f"error: {exc}")
                raise typer.Exit(exc.exit_code) from None

        return app.command(*names, **kwargs)(wrapper)

    return decorate


@contextlib.contextmanager
def progress_bar(desc: str, *, unit: str = "B"):
    """Yield a `progress(done, total)` callback for library functions: a tqdm bar on an
    interactive stderr, nothing otherwise (pipes, CI, QWQ_LOCAL_NO_PROGRESS=1)."""
    if not sys.stderr.isatty() or constants.progress_disabled():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
               leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


# ============================================================================================
# convert (issue: convert)
# ============================================================================================

# ============================================================================================
# quantize / eval (issue: quantize)
# ============================================================================================

# ============================================================================================
# run / chat / bench / demo (issue: runtime)
# ============================================================================================

# ============================================================================================
# info / plan / doctor (issue: plan + untrusted files)
# ============================================================================================

# ============================================================================================
# pull / list (issue: hub)
# ============================================================================================


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        if constants.debug_enabled():
            raise
        _err("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
