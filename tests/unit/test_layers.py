"""The shape of `firmware/`: no import cycle, and no package imports a higher layer.

The import graph is read from the source with `ast` (every import, including those inside
functions: a lazy import is still a dependency), so this test needs nothing to be importable.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "firmware"

#: Layer of each top-level part of `firmware` (ARCHITECTURE.md §2): 1 apps, 2 services,
#: 3 protocols and stores, 4 foundations. A module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    "apps": 1, "cli": 1, "__main__": 1, "demo": 1, "bench": 1,
    "local": 2, "remote": 2, "usb_gadget": 2, "nbd": 2, "ups": 2, "notify": 2,
    "console": 2, "recovery": 2, "ssh_access": 2, "panel": 2,
    "scsi": 3, "link": 3, "cbq": 3, "volume": 3, "config": 3, "lineage": 3, "control": 3,
    "storage": 3,
    "record": 4, "units": 4, "fsutil": 4, "blockdev": 4, "errors": 4, "cbor_strict": 4,
    "limits": 4,
    "__init__": 4,
}

#: Parts that must not know each other even within the rules of the layers.
FORBIDDEN: dict[str, set[str]] = {
    "link": {"local", "remote", "config", "console", "recovery", "ups", "notify"},
    "local": {"remote"},
    "remote": {"local"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The `firmware` modules `path` imports (resolved to modules that exist)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            # `from pkg import name` depends on the module pkg.name when there is one,
            # on pkg itself otherwise
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        for t in targets:
            if not t.startswith("firmware"):
                continue
            # the longest existing module that names the target
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != me:
                found.add(t)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, known) for f in files}


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_part_has_a_layer() -> None:
    missing = sorted({part(m) for m in graph()} - LAYERS.keys())
    assert not missing, f"give these a layer in LAYERS: {missing}"


def test_no_import_cycle_between_modules() -> None:
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_cycle_between_packages() -> None:
    g: dict[str, set[str]] = {}
    for m, deps in graph().items():
        g.setdefault(part(m), set()).update(part(d) for d in deps if part(d) != part(m))
    found = cycles(g)
    assert not found, "package cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_upward_or_forbidden_import() -> None:
    bad = []
    for m, deps in sorted(graph().items()):
        me = part(m)
        for d in sorted(deps):
            other = part(d)
            if other == me or other not in LAYERS or me not in LAYERS:
                continue
            if LAYERS[other] < LAYERS[me]:
                bad.append(f"{m} (layer {LAYERS[me]}) imports {d} (layer {LAYERS[other]})")
            elif other in FORBIDDEN.get(me, ()):
                bad.append(f"{m} imports {d}: {me} never imports {other}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from ..link import frames\n", {"firmware.link.frames"}),
    ("import firmware.cbq.format as f\n", {"firmware.cbq.format"}),
    ("def f():\n    from firmware.units import parse_size\n", {"firmware.units"}),
    ("from . import sibling\n", {"firmware.pkg.sibling"}),
    ("import os\n", set()),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from firmware.units import x\n",
     set()),
])
def test_import_reader(tmp_path: Path, source: str, expected: set[str]) -> None:
    # the reader itself must see relative, absolute and function-level imports
    global ROOT
    saved = ROOT
    ROOT = tmp_path / "firmware"
    try:
        (ROOT / "pkg").mkdir(parents=True)
        (ROOT / "link").mkdir()
        for name in ("units.py", "pkg/__init__.py", "pkg/sibling.py", "link/__init__.py",
                     "link/frames.py", "cbq/format.py", "cbq/__init__.py"):
            (ROOT / name).parent.mkdir(parents=True, exist_ok=True)
            (ROOT / name).touch()
        src = ROOT / "pkg" / "mod.py"
        src.write_text(source)
        known = {module_name(f) for f in ROOT.rglob("*.py")}
        assert imports_of(src, known) == expected
    finally:
        ROOT = saved


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports() -> None:
    # the graph above ignores an import of a module that does not exist: this catches it
    import importlib

    failed = []
    for name in sorted(graph()):
        if name.endswith("__main__"):
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            failed.append(f"{name}: {e}")
    assert not failed, "\n".join(failed)
