"""The package's shape, as docs/architecture.md states it: no import circle, no shipped module reaching into the
test builder's private names, training functions short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import dora_diffusion

PACKAGE = Path(dora_diffusion.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """``(module imported, names taken from it)`` for every import in ``path`` (lazy ones inside functions too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module
                full = f"{base}.{a.name}"
                out.append((full, []) if full in known else (base, [a.name]))
    return out


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(f) for f in files}
    graph = {_module_name(f): set() for f in files}
    for f in files:
        for target, _ in _imports(f, known):
            if target in known and target != _module_name(f):
                graph[_module_name(f)].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package() -> None:
    graph = _graph()
    assert len(graph) > 80  # every module was read
    assert "dora_diffusion.core.layers" in graph["dora_diffusion.core.inject"]
    assert _cycles(graph) == []


def test_shipped_modules_take_no_private_name_from_the_test_builder() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(f) for f in files}
    private = []
    for f in files:
        for target, names in _imports(f, known):
            if target == "dora_diffusion.testing":
                private += [f"{_module_name(f)}: {n}" for n in names if n.startswith("_")]
            assert "hub_fixtures" not in target, f"{f} imports the tests' {target}"
    assert private == []


def test_training_functions_are_short() -> None:
    long = []
    for f in sorted((PACKAGE / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{f.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
