"""owngpt's internal import graph, read from the source (ast), and the layers it must respect.

    python tools/import_graph.py            # the layers, each module's owngpt imports, cycles and layer breaks
    python tools/import_graph.py --lazy     # also list owngpt imports made inside functions (should be none)

tests/test_architecture.py asserts what this prints: no cycle, no module importing a higher layer, every module placed
in a layer, owngpt's own imports at module top. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Lowest first. A module may import its own layer and the layers below it, never one above. The names are module
# paths under owngpt (a trailing ".*" takes a whole package). The rule each layer keeps is in docs/architecture.md.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["errors", "version", "atomic", "console", "device", "metrics", "muon", "native_kernels"]),
    (
        "formats",
        [
            "config",
            "chat_format",
            "conversation",
            "tokenizer",
            "data.datadir",
            "checkpoint_files",
            "outdir",
            "hub",
            "models",
        ],
    ),  # fmt: skip
    (
        "model",
        [
            "checkpoint",
            "estimate",
            "quantize",
            "model_init",
            "optim",
            "decode_kernels",
            "decode_step",
            "greedy_head",
            "engine",
            "tasks.*",
            "augment",
            "distributed",
            "trainer_state",
            "run_dir",
            "run_log",
            "train_step",
        ],
    ),  # fmt: skip
    (
        "pipelines",
        [
            "data",
            "data.clean",
            "data.readers",
            "data.personal",
            "data.privacy",
            "data.report",
            "data.prepare",
            "generation",
            "mmi",
            "train",
            "evaluate",
            "chat",
            "predict",
            "classify_eval",
            "measure",
            "export.*",
            "prune",
            "tune.*",
            "cv",
            "explain",
            "report",
            "demo",
            "api",
        ],
    ),  # fmt: skip
    ("front ends", ["serve.*", "commands.*", "cli", "__main__", "owngpt"]),
]


@dataclass
class Module:
    name: str
    path: Path
    top: set[str] = field(default_factory=set)  # owngpt modules imported at module level
    lazy: dict[str, int] = field(default_factory=dict)  # owngpt modules imported inside functions -> first line


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def read_graph(src: Path = SRC) -> dict[str, Module]:
    """Every module under src/owngpt with the owngpt modules it imports, at top level and inside functions.

    `from owngpt.x import y` counts as importing owngpt.x.y when that is a module, else owngpt.x. Imports under
    `if TYPE_CHECKING:` are skipped (they never run)."""
    mods = {module_name(p, src): Module(module_name(p, src), p) for p in sorted((src / "owngpt").rglob("*.py"))}

    def resolve(mod: Module, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        pkg = mod.name.split(".") if mod.path.name == "__init__.py" else mod.name.split(".")[:-1]
        base = pkg[: len(pkg) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod in mods.values():
        tree = ast.parse(mod.path.read_text(encoding="utf-8"))
        type_checking = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        top_level = set()
        for stmt in tree.body:  # module level: plain statements and those inside top-level if/try blocks
            for n in ast.walk(stmt) if isinstance(stmt, (ast.If, ast.Try)) else [stmt]:
                top_level.add(id(n))
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = resolve(mod, node)
                if base and base.split(".")[0] == "owngpt":
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        targets.append(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "owngpt"]
            for t in targets:
                name = known(t)
                if name is None or name == mod.name:
                    continue
                if id(node) in top_level:
                    mod.top.add(name)
                else:
                    mod.lazy.setdefault(name, node.lineno)
    return mods


def cycles(mods: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over top-level and lazy imports alike."""
    edges = {m: mod.top | set(mod.lazy) for m, mod in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(name: str) -> int | None:
    short = name.removeprefix("owngpt.") if name != "owngpt" else "owngpt"
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if short == m or (m.endswith(".*") and (short == m[:-2] or short.startswith(m[:-1]))):
                return i
    return None


def layer_breaks(mods: dict[str, Module]) -> list[str]:
    """'a (layer) imports b (higher layer)' for every import that goes up."""
    out = []
    for m, mod in mods.items():
        lm = layer_of(m)
        for t in sorted(mod.top | set(mod.lazy)):
            lt = layer_of(t)
            if lm is not None and lt is not None and lt > lm:
                out.append(f"{m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lazy", action="store_true", help="list owngpt imports made inside functions")
    args = ap.parse_args()
    mods = read_graph()
    for i, (name, _) in enumerate(LAYERS):
        members = sorted(m for m in mods if layer_of(m) == i)
        print(f"{i} {name}: {', '.join(x.removeprefix('owngpt.') for x in members)}")
    unplaced = sorted(m for m in mods if layer_of(m) is None)
    print("not in a layer:", ", ".join(unplaced) or "none")
    print("cycles:", cycles(mods) or "none")
    print("layer breaks:", layer_breaks(mods) or "none")
    lazy = {m: mod.lazy for m, mod in mods.items() if mod.lazy}
    print(f"lazy owngpt imports: {sum(map(len, lazy.values()))} in {len(lazy)} modules")
    if args.lazy:
        for m, targets in sorted(lazy.items()):
            print(f"  {m}: " + ", ".join(f"{t} (line {line})" for t, line in sorted(targets.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
