"""Cycles in owngpt's internal import graph: its strongly connected components, top-level and in-function imports.

    python tools/imports.py        # from the repository root; prints nothing after the counts when there is none

`from owngpt import atomic` is an edge to owngpt.atomic only (the package's __init__ is imported before any of its
modules anyway); imports under `if TYPE_CHECKING:` are not edges (they never run).
"""

from __future__ import annotations

import ast
import collections
import pathlib
import sys

ROOT = pathlib.Path("src/owngpt")


def modules() -> dict[str, pathlib.Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to("src").with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def edges(mods: dict[str, pathlib.Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: modules imported at top level}, {module: modules imported inside functions})."""
    top: dict[str, set[str]] = collections.defaultdict(set)
    lazy: dict[str, set[str]] = collections.defaultdict(set)
    for m, f in mods.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        package = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        skipped = {id(n) for b in tree.body if _type_checking(b) for n in ast.walk(b)}
        guarded = [b for b in tree.body if isinstance(b, (ast.If, ast.Try)) and not _type_checking(b)]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - (node.level - 1)] if node.level else []
                name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                if name and name.startswith("owngpt"):
                    subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in mods]
                    if len(subs) < len(node.names):
                        targets.append(name)
                    targets += subs
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("owngpt")]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t == m:
                    continue
                at_top = node in tree.body or any(node in getattr(b, "body", []) for b in guarded)
                (top if at_top else lazy)[m].add(t)
    return top, lazy


def cycles(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def main() -> int:
    mods = modules()
    top, lazy = edges(mods)
    graph = {m: top[m] | lazy[m] for m in mods}
    print("modules", len(mods), "top edges", sum(map(len, top.values())), "lazy edges", sum(map(len, lazy.values())))
    comps = cycles(graph, list(mods))
    for comp in comps:
        print(len(comp), comp)
        for m in comp:
            print("   ", m, "->", sorted(graph[m] & set(comp)))
    return 1 if comps else 0


if __name__ == "__main__":
    sys.exit(main())
