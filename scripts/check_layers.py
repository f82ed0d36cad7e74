#!/usr/bin/env python3
"""Check chatforge's layering: imports only go down a floor, and no module imports itself round.

Every ``import`` in ``src/chatforge`` counts, at module level and inside functions alike (an
import inside a function is still a dependency, and often one that hides a cycle). Floors,
bottom to top (DEVELOPERS.md, "Layout"):

    base      errors.py, config.py, runs.py, textstats.py: usable by everyone
    data      records, readers, cleaning, templates, tokenisation
    models    load, LoRA, heads
    generate  the decoding engine
    train     one loop per method (PPO's rollouts use the engine, so train sits above generate)
    eval, chat
    pipeline
    commands
    cli
    __main__  ``python -m chatforge``

A module may import its own package, the base floor, and any package on a lower floor. It
may not import a package on a higher floor ("climbs") nor a different package on its own
floor ("sideways": chat must not import eval, nor eval chat). Separately, every import cycle
between modules is listed, inside a package too (generate/decoders.py <-> generate/fast.py
was one).

    python scripts/check_layers.py                  # exit 1 and a list when anything is wrong
    python scripts/check_layers.py --exclude train  # leave out a package being restructured
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "chatforge"
FLOORS: dict[str, int] = {
    "errors": 0, "config": 0, "runs": 0, "textstats": 0,
    "data": 1,
    "models": 2,
    "generate": 3,
    "train": 4,
    "eval": 5, "chat": 5,
    "pipeline": 6,
    "commands": 7,
    "cli": 8,
    "__main__": 9,
}
BASE = 0


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported chatforge module, dotted
    path: Path
    line: int
    in_function: bool


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def area(module: str) -> str:
    """The floor name of a module: its sub-package, or the top-level module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a dotted import path) names or lies inside."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in known:
            return ".".join(parts[:k])
    return None


class _Collector(ast.NodeVisitor):
    """Every import of a chatforge module in one file, with whether it sits in a function."""

    def __init__(self, module: str, path: Path, known: dict[str, Path]):
        self.module, self.path, self.known = module, path, known
        self.is_package = path.name == "__init__.py"
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, name: str | None, line: int) -> None:
        target = _resolve(name, self.known) if name and name.split(".")[0] == PACKAGE else None
        if target is not None and target != PACKAGE and target != self.module:
            imp = Import(self.module, target, self.path, line, self.depth > 0)
            if imp not in self.found:  # `from m import a, b`: one import of m
                self.found.append(imp)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the package this module is in (or is)
            pkg = self.module.split(".")
            pkg = pkg if self.is_package else pkg[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        for alias in node.names:  # `from pkg import module` names a module, `from module import name` does not
            full = f"{base}.{alias.name}"
            self._add(full if full in self.known else base, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:  # importlib.import_module("chatforge.x") with a literal
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self._add(node.args[0].value, node.lineno)
        self.generic_visit(node)


def collect(root: Path) -> tuple[dict[str, Path], list[Import]]:
    known = module_names(root)
    imports: list[Import] = []
    for module, path in known.items():
        c = _Collector(module, path, known)
        c.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        imports.extend(c.found)
    return known, imports


def floor_violation(imp: Import) -> str | None:
    """Why this import breaks the floors, or None."""
    src, dst = area(imp.source), area(imp.target)
    if src == dst:
        return None
    for name in (src, dst):
        if name not in FLOORS:
            return f"{name!r} has no floor: add it to FLOORS in scripts/check_layers.py"
    fs, fd = FLOORS[src], FLOORS[dst]
    if fd == BASE or fd < fs:
        return None
    if fd > fs:
        return f"climbs from {src} (floor {fs}) to {dst} (floor {fd})"
    return f"sideways between {src} and {dst} (both floor {fs})"


def cycles(modules: list[str], imports: list[Import]) -> list[list[str]]:
    """Each group of modules that import one another round (strongly connected, Tarjan),
    as one cycle through the group, smallest module first."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth <= the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return [_cycle_through(g, graph) for g in sorted(groups)]


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group  # unreachable for a strongly connected group


def check(root: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every problem, one line each; imports *from* an excluded package are left out."""
    known, imports = collect(root)
    imports = [i for i in imports if area(i.source) not in exclude]
    problems = []
    for imp in imports:
        why = floor_violation(imp)
        if why:
            where = " (inside a function)" if imp.in_function else ""
            problems.append(f"{imp.path.relative_to(root.parent.parent)}:{imp.line}: "
                            f"{imp.source} imports {imp.target}{where}: {why}")
    for cycle in cycles(list(known), imports):
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent / "src" / PACKAGE,
                   help="the package folder (default: src/chatforge next to this script)")
    p.add_argument("--exclude", action="append", default=[], metavar="PACKAGE",
                   help="leave out imports made by this sub-package (repeatable), e.g. train")
    args = p.parse_args(argv)
    problems = check(args.root, tuple(args.exclude))
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} layering problem(s)", file=sys.stderr)
        return 1
    print(f"layers ok: {len(module_names(args.root))} modules, imports only go down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
