"""Print the import graph of ``fedpeft/`` and ``strategies/``; fail on a cycle or an upward import.

    python tools/import_graph.py            # the layer table, the graph by layer, and any violation
    python tools/import_graph.py --modules  # also every module-level edge

Every import counts, including the ones inside functions: a lazy import that
only dodges a cycle at import time is still a cycle in the design. Imports
under ``if TYPE_CHECKING:`` (annotations only, never run) do not. Layers
follow the data flow (DESIGN.md): config -> data -> model -> privacy ->
training -> client -> server -> engines, with the audit, sweeps and
benchmarks above the federation and the CLI on top. A module may import its
own layer's unit or anything below; ``strategies`` and the leaf modules
import nothing of fedpeft. Exit status 1 on any violation (the test suite
runs this script).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedpeft", "strategies")

LAYERS: dict[str, int] = {
    # leaves: no fedpeft imports
    "strategies": 0,
    "fedpeft.errors": 0,
    "fedpeft.environment": 0,
    "fedpeft.devices": 1,  # where tensors live, in what precision
    "fedpeft.compat": 1,  # adapters over pinned upstream internals
    "fedpeft.wire": 2,  # what crosses the wire: record and message keys (decoded through compat)
    "fedpeft.config": 2,
    "fedpeft.sampling": 3,
    "fedpeft.data": 3,
    "fedpeft.models": 4,
    "fedpeft.privacy": 5,
    "fedpeft.training": 6,
    "fedpeft.validation": 7,  # cross-section checks: registries of data, models, rules, DP
    "fedpeft.runtime": 8,
    "fedpeft.reporting": 8,
    "fedpeft.client": 9,
    "fedpeft.server": 10,
    "fedpeft.engine": 11,
    "fedpeft.bench_clients": 11,  # the baselines fedpeft.bench measures against: a rebuilding client,
    "fedpeft.bench_plain_loop": 11,  # a plain one-process FedIT loop
    "fedpeft.audit": 12,
    "fedpeft.sweep": 12,
    "fedpeft.deploy": 12,  # the federation on Flower's Deployment Engine: processes, keys, `flwr run`
    "fedpeft.bench": 12,
    "fedpeft.api": 13,
    "fedpeft.cli": 14,
    "fedpeft": 15,  # the package's __init__: the public API
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the checked packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The checked modules ``name`` imports anywhere in its file (function bodies included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    type_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from a import b` imports the submodule a.b when there is one.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.C` -> the module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations only, never executed."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def unit_of(module: str) -> str:
    """The layer-table entry a module belongs to (its longest listed prefix)."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in LAYERS:
            return candidate
    raise KeyError(module)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check() -> tuple[dict[str, set[str]], list[str]]:
    """The module graph and every violation found in it."""
    files = module_files()
    known = set(files)
    graph = {name: imports_of(name, path, known) for name, path in files.items()}
    problems = []
    for name in sorted(files):
        try:
            unit_of(name)
        except KeyError:
            problems.append(f"{name}: not in the layer table of tools/import_graph.py; add its unit to LAYERS")
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            try:
                a, b = unit_of(name), unit_of(target)
            except KeyError:
                continue
            if a != b and LAYERS[b] >= LAYERS[a]:
                problems.append(f"upward import: {name} (layer {LAYERS[a]}, {a}) imports {target} (layer {LAYERS[b]}, {b})")
    for component in cycles(graph):
        problems.append("import cycle: " + " <-> ".join(component))
    return graph, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="also print every module-level edge")
    args = parser.parse_args(argv)
    graph, problems = check()
    by_unit: dict[str, set[str]] = defaultdict(set)
    for name, targets in graph.items():
        for target in targets:
            if unit_of(name) != unit_of(target):
                by_unit[unit_of(name)].add(unit_of(target))
    for unit in sorted(LAYERS, key=lambda u: (LAYERS[u], u)):
        deps = ", ".join(sorted(by_unit.get(unit, ()), key=lambda u: (LAYERS[u], u))) or "-"
        print(f"{LAYERS[unit]:2d}  {unit:22s} -> {deps}")
    if args.modules:
        print()
        for name in sorted(graph):
            print(f"{name} -> {', '.join(sorted(graph[name])) or '-'}")
    if problems:
        print(f"\n{len(problems)} violation(s):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print("\nno cycle, no upward import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
