"""The shape of the house (docs/architecture.md, "Layers"): owngpt's internal imports form no cycle, never go up a
layer, and sit at module top, where a reader sees them. The graph is read from the source by tools/import_graph.py,
the same script that prints it for a person."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402

# Where an owngpt import may stay inside a function, and why:
# - commands/*: the CLI layer imports the library inside run(), so `owngpt --help` and `owngpt CMD --help` import
#   no numpy, torch or fastapi (tests/test_cli.py); the library's modules import numpy at their top.
# - owngpt (the package): `import owngpt` stays light; owngpt.load() imports the API when called.
LAZY_ALLOWED = ("owngpt.commands.", "owngpt")


def test_no_module_is_part_of_an_import_cycle():
    assert import_graph.cycles(import_graph.read_graph()) == []


def test_every_module_sits_in_a_layer_and_imports_only_its_own_layer_or_lower_ones():
    mods = import_graph.read_graph()
    assert [m for m in mods if import_graph.layer_of(m) is None] == []
    assert import_graph.layer_breaks(mods) == []


def test_owngpt_imports_sit_at_module_top():
    mods = import_graph.read_graph()
    lazy = {
        m: sorted(mod.lazy)
        for m, mod in mods.items()
        if mod.lazy and not (m == "owngpt" or m.startswith(LAZY_ALLOWED[0]))
    }
    assert lazy == {}


def test_the_graph_reader_sees_cycles_breaks_and_lazy_imports(tmp_path):
    """The checks above would pass on an empty graph: a planted cycle, an upward import and an import inside a
    function must each be found."""
    pkg = tmp_path / "owngpt"
    (pkg / "commands").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "commands" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from owngpt.config import X\n")  # foundation -> formats: up
    (pkg / "config.py").write_text("from owngpt import errors\n")  # and back: a cycle
    (pkg / "train.py").write_text("def f():\n    from owngpt.config import X\n")  # lazy
    (pkg / "commands" / "train.py").write_text("def run():\n    from owngpt.train import f\n")
    mods = import_graph.read_graph(tmp_path)
    assert import_graph.cycles(mods) == [["owngpt.config", "owngpt.errors"]]
    assert import_graph.layer_breaks(mods) == ["owngpt.errors (foundation) imports owngpt.config (formats)"]
    assert mods["owngpt.train"].lazy == {"owngpt.config": 2} and mods["owngpt.train"].top == set()
    assert mods["owngpt.commands.train"].lazy == {"owngpt.train": 2}


def test_every_module_imports_in_a_fresh_interpreter_in_any_order():
    """No cycle means any entry point works; checked for real: every module imported in a fresh interpreter, in
    sorted order and in reverse (an import-time cycle fails in one of them)."""
    names = [m for m in sorted(import_graph.read_graph()) if not m.endswith("__main__")]
    for order in (names, names[::-1]):
        code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        r = subprocess.run(
            [sys.executable, "-c", code, *order],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
