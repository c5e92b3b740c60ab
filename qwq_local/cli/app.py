"""The typer app and the `command` decorator every command module registers with.

Library errors (QwQLocalError) become one line on stderr and the error's exit code;
QWQ_LOCAL_DEBUG=1 shows the traceback instead.
"""


import functools

import typer

from .. import constants
from ..errors import QwQLocalError

app = typer.Typer(
    name="qwq-local",
    help="Run Qwen's QwQ-32B locally: convert, quantize, fit to your machine, chat. Offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click output: usage errors as `Error: ...` lines rather than rich panels.
    rich_markup_mode=None,
)


def err(message: str) -> None:
    typer.echo(message, err=True)


def one_line(text: str) -> str:
    """Error text can quote a model file's bytes: escape control characters, so a crafted
    file cannot move the cursor or recolour the terminal, and the error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
                err(f"error: {one_line(str(exc))}")
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                # typer would turn this into a silent exit 130; say what happened instead.
                if constants.debug_enabled():
                    raise
                err("interrupted")
                raise typer.Exit(130) from None

        return app.command(*names, **kwargs)(wrapper)

    return decorate
