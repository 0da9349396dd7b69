"""Imports in src/sqs point one way, and no modules import each other in a circle.

The order is the import-linter `layers` contract in pyproject.toml (one place; `lint-imports`
checks it too). This test also sees imports inside functions, which import-linter counts as
well but a reader easily misses, and names every offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from sqs.core import load_toml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "sqs"


def _layers() -> list[list[str]]:
    """The contract's layers, top first; each a list of independent sibling packages."""
    cfg = load_toml(ROOT / "pyproject.toml")["tool"]["importlinter"]
    (contract,) = [c for c in cfg["contracts"] if c["type"] == "layers"]
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported sqs module, line) for every import in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod
                full = f"{base}.{a.name}"
                out.append((full if full in known else base, node.lineno))
    return sorted({(m, line) for m, line in out if m == PACKAGE or m.startswith(PACKAGE + ".")})


def _layer_of(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    for i, group in enumerate(layers):
        for top in group:
            if module == top or module.startswith(top + "."):
                return i, top
    return None


def _graph() -> dict[str, list[tuple[str, int]]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_sits_in_a_layer():
    layers = _layers()
    loose = [m for m in _modules() if m != PACKAGE and _layer_of(m, layers) is None]
    assert not loose, (f"modules outside the layers contract in pyproject.toml: {loose}; "
                       "add their package to [tool.importlinter] layers")


def test_imports_point_down_only():
    """No module imports one in a higher layer, or a sibling in the same independent layer."""
    layers = _layers()
    mods = _modules()
    bad = []
    for name, imports in _graph().items():
        here = _layer_of(name, layers)
        if here is None:
            continue
        for target, line in imports:
            there = _layer_of(target, layers)
            if there is None:
                continue
            if there[0] < here[0] or (there[0] == here[0] and there[1] != here[1]):
                rel = mods[name].relative_to(ROOT)
                bad.append(f"{rel}:{line}: {name} ({here[1]}) imports {target} ({there[1]})")
    assert not bad, "imports against the layer order (top first: " + " > ".join(
        " | ".join(g) for g in layers) + "):\n" + "\n".join(bad)


def test_no_import_cycles():
    """No set of modules imports each other in a circle (lazy imports included)."""
    graph = {m: sorted({t for t, _ in imps if t != m}) for m, imps in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "modules importing each other in a circle: " + "; ".join(" <-> ".join(c) for c in cycles)

