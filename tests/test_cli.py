import subprocess
import sys

import pytest

from owngpt.cli import COMMANDS, _parse, build_parser, main


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from owngpt.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['prepare', '--help'], ['serve', '--help']):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'fastapi', 'optuna') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"owngpt {command}" in capsys.readouterr().out


def test_overrides_may_stand_anywhere_among_flags():
    p = build_parser("train")
    a = _parse(p, ["train", "lr=1e-4", "--data", "d", "schedule=linear", "--out", "o"], "train")
    assert a.overrides == ["lr=1e-4", "schedule=linear"] and a.data == "d" and a.out == "o"


def test_user_errors_are_one_line_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "owngpt", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "missing" in r.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_a_command_reads_is_defined(command):
    """A command that reads args.X without defining --x fails only when run: catch it statically."""
    import argparse
    import importlib
    import re

    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    defined = {a.dest for a in parser._actions} | {"_run", "command"}
    used = set(re.findall(r"\bargs\.([A-Za-z_][A-Za-z0-9_]*)", open(module.__file__, encoding="utf-8").read()))
    assert used <= defined, f"owngpt {command} reads undefined flags: {sorted(used - defined)}"
