"""Dependencies point one way (docs/architecture.md): the import graph of nagjax/ has no cycle, no
module imports from a floor above its own, and nagjax modules are imported at the top of a file
(a function-level import is how a cycle hides), except in cli.py, which defers them for start-up
time. Read from the source with `ast`, so a new cycle fails here before it fails at import time."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "nagjax"

# Lowest first; a module may import its own floor and the ones below. Prefixes match the module
# and everything under it.
FLOORS = (
    ("nagjax.config", "nagjax.interrupts"),
    ("nagjax.data", "nagjax.sharding", "nagjax.registry", "nagjax.runtime"),
    ("nagjax.model",),
    ("nagjax.flops",),
    ("nagjax.train", "nagjax.infer", "nagjax.export", "nagjax.analysis", "nagjax.compile"),
    ("nagjax.sweep",),
    ("nagjax.cli", "nagjax.__main__"),
)
# The one module allowed function-level imports of nagjax (CLI start-up time).
LAZY_IMPORTS_ALLOWED = {"nagjax.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` refers to (`from nagjax.a import b` may name module a.b or a's attribute b)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported nagjax module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    in_function = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "nagjax" or name.startswith("nagjax."):
                target = _resolve(name, modules)
                if target:
                    out.append((target, node.lineno, id(node) in in_function))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _, _ in _imports(p, modules) if t != m} for m, p in modules.items()}


def _floor(module: str) -> int:
    for level, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_imports.py")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_is_acyclic():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_no_module_imports_from_a_floor_above():
    upward = [f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
              for m, targets in _graph().items() for t in targets
              if _floor(t) > _floor(m) and not t.startswith(m + ".")]  # a package may import its own parts
    assert not upward, "\n".join(upward)


def test_nagjax_modules_are_imported_at_the_top_of_a_file():
    modules = _modules()
    lazy = [f"{path.relative_to(ROOT.parent)}:{line} imports {target} inside a function"
            for m, path in modules.items() if m not in LAZY_IMPORTS_ALLOWED
            for target, line, in_function in _imports(path, modules) if in_function]
    assert not lazy, "\n".join(lazy)
