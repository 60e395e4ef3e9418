"""The house (docs/architecture.md): the model at the bottom imports nothing of the tools, a wing
imports the model and the console but not another wing, and no module imports itself back through
others.  Imports are read from the source (every ``import`` statement, those inside functions too),
so a lazy import cannot hide a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import tdvmcall

ROOT = Path(tdvmcall.__file__).parent
PKG = "tdvmcall"
MODEL = ("abi", "module", "kvm", "guest", "scenario", "decode", "judge")
FACE = ("cli", "console", "html_matrix", "__init__", "__main__")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PKG, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The tdvmcall modules a file imports (relative imports resolved, ``from x import y`` counted as
    ``x.y`` when ``x.y`` is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PKG:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


FILES = sorted(ROOT.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports_of(p) for p in FILES}


def floor(mod: str) -> str:
    """``model``, ``face`` or the wing's name."""
    top = mod.split(".")[1] if "." in mod else "__init__"
    if top in MODEL:
        return "model"
    if top in FACE:
        return "face"
    return top


def test_the_graph_is_read():
    # hand-checked edges: the module imports the control checks; the check wing's CLI the catalog;
    # the app imports every wing's CLI (the graph would be empty if the reader broke)
    assert "tdvmcall.abi.control" in GRAPH["tdvmcall.module"]
    assert "tdvmcall.check.catalog" in GRAPH["tdvmcall.check.cli"]
    assert {"tdvmcall.check.cli", "tdvmcall.trace.cli", "tdvmcall.sweep.cli"} <= GRAPH["tdvmcall.cli"]


def test_no_import_circle():
    # Tarjan's strongly connected components: every component must be a single module
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_model_imports_no_tool():
    bad = {
        m: sorted(d for d in deps if floor(d) != "model" and d != PKG)
        for m, deps in GRAPH.items()
        if floor(m) == "model"
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_a_wing_imports_only_the_model_the_printing_floor_and_itself():
    allowed_face = {"tdvmcall.console", "tdvmcall.html_matrix", PKG}
    bad = {}
    for m, deps in GRAPH.items():
        wing = floor(m)
        if wing in ("model", "face"):
            continue
        wrong = sorted(d for d in deps if floor(d) not in ("model", wing) and d not in allowed_face)
        if wrong:
            bad[m] = wrong
    assert bad == {}


def test_the_face_only_gathers_wings():
    # cli.py imports each wing's cli and nothing else of the package (but its version and the
    # console's pipe guard); console.py and html_matrix.py (the printing floor) import nothing of it
    assert all(d.endswith(".cli") or d in (PKG, "tdvmcall.console") for d in GRAPH["tdvmcall.cli"])
    assert GRAPH["tdvmcall.console"] == set()
    assert GRAPH["tdvmcall.html_matrix"] == set()


def test_every_verdict_has_one_style():
    # the printing floor draws the model's verdicts by their words: one entry per verdict, no more
    from tdvmcall.console import VERDICT_STYLE
    from tdvmcall.judge import VERDICTS

    assert set(VERDICT_STYLE) == set(VERDICTS)
