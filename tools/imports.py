"""Count a package's modules, their lines, the imports between them and the import cycles.

Every import counts, also those deferred into functions or under ``if TYPE_CHECKING``: a cycle hidden in a function
body is still a cycle in the design. Run from the repository root::

    python tools/imports.py                 # torchlrp under src/
    python tools/imports.py --json out.json

The figures quoted in the changelog and in the closing notes of the layout work come from this script.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of ``path`` below the source root ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` (module ``name``) imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            candidates = [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # the longest known module that the imported name lies in
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Import edges and line counts of every module of ``package`` under ``root``."""
    paths = {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}
    known = set(paths)
    edges = {name: imported_modules(path, name, known) for name, path in paths.items()}
    lines = {name: len(path.read_text().splitlines()) for name, path in paths.items()}
    return edges, lines


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="src", help="the source root (default: src)")
    parser.add_argument("--package", default="torchlrp")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    edges, lines = graph(Path(args.root), args.package)
    found = cycles(edges)
    root_modules = [name for name in lines if name.count(".") == 1 and not (Path(args.root) / name.replace(
        ".", "/") / "__init__.py").exists()] + [args.package]
    summary = {
        "modules": len(lines),
        "lines": sum(lines.values()),
        "largest": sorted(lines.items(), key=lambda item: -item[1])[:8],
        "over_600": [name for name, count in lines.items() if count > 600],
        "root_modules": len(root_modules),
        "import_edges": sum(len(targets) for targets in edges.values()),
        "cycles": found,
    }
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
