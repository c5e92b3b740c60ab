"""The package's shape, checked from its source: no import cycles, layers import downward only,
no private names imported across modules, no oversized modules, every subpackage says what it does.

Imports are read with `ast` (function-level ones included: a lazy import is still a dependency),
so the check needs no import of the package and sees the code as written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwq_local"

# Lowest first. A module may import its own subpackage and anything ranked below it: the data
# flow of docs/architecture.md. Top-level modules not listed here are shared (rank 0).
LAYERS = ["synthetic", "chat", "backend", "gguf", "hub", "convert", "quantize", "plan", "runtime",
          "serve", "cli"]
MAX_LINES = 520


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str, root: Path = PACKAGE) -> bool:
    return (root.parent / name.replace(".", "/") / "__init__.py").is_file()


def import_edges(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports, as Python runs them: importing `a.b.c` also runs
    the `__init__` of each package on the way (`a.b`) unless the importer is inside it. The
    top-level `__init__` is the public facade and is left out (nothing inside imports it)."""
    top = root.name
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules if m != top}
    for name, path in modules.items():
        if name == top:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == top)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == top:
                    src = node.module
                else:
                    continue
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    targets.add(sub if sub in modules else src)
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in modules and step != name and not name.startswith(step + "."):
                    edges[name].add(step)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def rank(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in LAYERS else 0


def test_no_import_cycles():
    assert find_cycles(import_edges()) == []


def test_the_cycle_check_sees_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..b import g\n")
    (pkg / "b.py").write_text("from .sub import f\n")
    assert find_cycles(import_edges(pkg)) == [["pkg.b", "pkg.sub", "pkg.sub.a"]]
    (pkg / "b.py").write_text("import os\n")
    assert find_cycles(import_edges(pkg)) == []


def test_layers_import_downward_only():
    # `python -m qwq_local` (__main__) is an entry point, like the facade it stands beside.
    upward = [f"{src} -> {dst}" for src, dsts in import_edges().items() for dst in dsts
              if rank(dst) > rank(src) and src != "qwq_local.__main__"]
    assert upward == []


def test_no_private_name_imported_across_modules():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qwq_local")):
                offenders += [f"{module_name(path)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_no_module_is_oversized():
    sizes = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def test_every_subpackage_has_a_layer():
    assert [s for s in SUBPACKAGES if s not in LAYERS] == []


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_each_subpackage_says_what_it_does(sub):
    init = PACKAGE / sub / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert doc and len(doc.split()) >= 8, f"{init} needs a docstring saying what the stage does"


def test_no_top_level_module_beyond_the_shared_ones():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "constants", "dtypes", "errors", "fileutil", "netutil"]


def test_the_architecture_page_matches_the_tree():
    """docs/architecture.md's module map names exactly the modules each subpackage has, and its
    layer table lists the layers in the order this file enforces."""
    import re

    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `qwq_local/(\w+)/` \| (.+) \|$", page, re.M))
    assert sorted(rows) == SUBPACKAGES
    for sub, text in rows.items():
        named = set(re.findall(r"`(\w+)\.py`", text))
        present = {p.stem for p in (PACKAGE / sub).glob("*.py")} - {"__init__", "__main__"}
        assert named == present, sub
    order = re.findall(r"^\| \d+ \| `(\w+)` \|", page, re.M)
    assert order == LAYERS
