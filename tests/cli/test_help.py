"""Every script's and every command's --help reads whole: the description is the docstring's
whole first paragraph, never cut mid-sentence."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwq_local.cli import app

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")])


def _first_paragraph(text: str) -> str:
    return " ".join(text.strip().split("\n\n")[0].split())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_help_shows_the_whole_first_paragraph(script):
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")))
    assert doc, f"{script} has no docstring"
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert _first_paragraph(doc) in " ".join(res.stdout.split())


COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_shows_the_whole_first_paragraph(name):
    command = next(c for c in app.registered_commands if c.name == name)
    doc = command.callback.__doc__
    assert doc, f"`qwq-local {name}` has no help text"
    res = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert _first_paragraph(doc) in " ".join(res.output.split())
