"""owngpt never loses the user's work (issue #19, points 1, 2 and 6; docs/reliability.md "Your files are never
destroyed").

- every destructive --out found by hand (an --out that is, holds or lies inside an input; --overwrite on a folder
  owngpt did not make) exits 2 with the fix in the message, and every file of the workspace is byte-identical after;
- a property test: prepare, export and prune at generated --out locations never change anything outside --out;
- saved state stays consistent: a crash between saving `best` and `last`, a `best` older than what `last` reports
  (a run saved by the old order), `.best.old-*` leftovers, a run that failed before its first step, an --overwrite
  that fails or is killed before the new run has a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from train_helpers import quick_cfg, weights

from owngpt import atomic, outdir
from owngpt import checkpoint as ckpt_mod
from owngpt import train as train_mod
from owngpt.checkpoint import read_meta
from owngpt.cli import main
from owngpt.errors import ConfigError
from owngpt.train import train

CORPUS = "".join(f"line {i} of the user's own corpus, which owngpt must never delete.\n\n" for i in range(40))


# ------------------------------------------------------------------------------------------------------- helpers
def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (links: their target; dirs: 'dir'), for before/after comparisons."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def template(tiny_lm_data, tiny_ckpt, tmp_path_factory) -> Path:
    """A user's workspace: a run (with notes and its data inside), a data dir, a corpus beside code, files."""
    ws = tmp_path_factory.mktemp("ws") / "ws"
    ws.mkdir()
    shutil.copytree(tiny_lm_data, ws / "data")
    train(quick_cfg(ws / "data", ws / "RUN", tiny_ckpt, max_steps=2, eval_every=2))
    (ws / "RUN/notes.txt").write_text("my notes about this run\n")
    shutil.copytree(tiny_lm_data, ws / "RUN/data")
    shutil.copytree(ws / "RUN/checkpoints/best", ws / "CKPT")  # a checkpoint on its own
    (ws / "DIR/src").mkdir(parents=True)
    (ws / "DIR/corpus.txt").write_text(CORPUS)
    (ws / "DIR/src/main.py").write_text("print('the user's code')\n")
    (ws / "f.txt").write_text(CORPUS)
    (ws / "FOREIGN").mkdir()
    (ws / "FOREIGN/thesis.tex").write_text("\\documentclass{article}\n")
    (ws / "texts.jsonl").write_text('{"text": "hello"}\n')
    (ws / "LINK").symlink_to("DIR")
    return ws


@pytest.fixture
def ws(template, tmp_path, monkeypatch) -> Path:
    w = tmp_path / "ws"
    shutil.copytree(template, w, symlinks=True)
    monkeypatch.chdir(w)
    return w


# ------------------------------------------------------------------------------------ destructive --out: a table
PREP = ["--tokenizer", "char", "--quiet"]
CASES = {
    # the cases reproduced in issue #19
    "export a run's checkpoint into the run": ["export", "RUN/checkpoints/best", "--out", "RUN", "--to", "hf"],
    "prune a run's checkpoint into the run": ["prune", "RUN/checkpoints/best", "--out", "RUN", "--sparsity", "0.5"],
    "train --model RUN/checkpoints/best --out RUN": [
        *("train", "--data", "data", "--model", "RUN/checkpoints/best", "--out", "RUN", "--overwrite"),
    ],
    "train --data RUN/data --out RUN": [
        "train",
        "--data",
        "RUN/data",
        "--model",
        "CKPT",
        "--out",
        "RUN",
        "--overwrite",
    ],
    "prepare DIR/corpus.txt --out DIR": ["prepare", "DIR/corpus.txt", "--out", "DIR", "--overwrite", *PREP],
    "prepare f.txt --out f.txt": ["prepare", "f.txt", "--out", "f.txt", "--overwrite", *PREP],
    "prepare --overwrite on a folder owngpt did not make": [
        "prepare",
        "f.txt",
        "--out",
        "FOREIGN",
        "--overwrite",
        *PREP,
    ],
    # the same rule, other shapes
    "train --overwrite on a folder owngpt did not make": [
        *("train", "--data", "data", "--model", "CKPT", "--out", "FOREIGN", "--overwrite"),
    ],
    "prepare --overwrite on a run": ["prepare", "f.txt", "--out", "RUN", "--overwrite", *PREP],
    "export --overwrite on a run": ["export", "CKPT", "--out", "RUN", "--to", "hf", "--overwrite"],
    "export --overwrite on a data dir": ["export", "CKPT", "--out", "data", "--to", "int8", "--overwrite"],
    "prune --overwrite on the user's folder": [
        *("prune", "CKPT", "--out", "FOREIGN", "--sparsity", "0.5", "--overwrite"),
    ],
    "export --out inside the checkpoint": ["export", "CKPT", "--out", "CKPT/onnx", "--to", "onnx"],
    "export --out holding the --data dir": ["export", "CKPT", "--out", "RUN", "--to", "hf", "--data", "RUN/data"],
    "prepare --out inside the input folder": ["prepare", "DIR", "--out", "DIR/data", *PREP],
    "prepare --out a symlink to the input's folder": [
        "prepare",
        "DIR/corpus.txt",
        "--out",
        "LINK",
        "--overwrite",
        *PREP,
    ],
    "prepare --out through a symlink into the input": ["prepare", "DIR", "--out", "LINK/data", *PREP],
    "prepare --out the --tokenizer dir": [
        *("prepare", "f.txt", "--out", "CKPT", "--tokenizer", "CKPT", "--overwrite", "--quiet"),
    ],
    "train --out the model itself": ["train", "--data", "data", "--model", "CKPT", "--out", "CKPT", "--overwrite"],
    "train --out the --config file's folder": [
        *("train", "--config", "RUN/config.yaml", "--data", "data", "--out", "RUN", "--overwrite"),
    ],
    "tune --out holding the data": ["tune", "--data", "RUN/data", "--model", "CKPT", "--out", "RUN", "--trials", "1"],
    "tune --out a folder that is no study": ["tune", "--data", "data", "--model", "CKPT", "--out", "FOREIGN"],
    "predict --output the --input file": ["predict", "CKPT", "--input", "texts.jsonl", "--output", "texts.jsonl"],
    "predict --output a file of the user's": ["predict", "CKPT", "--input", "texts.jsonl", "--output", "f.txt"],
    "predict --output a folder": ["predict", "CKPT", "--input", "texts.jsonl", "--output", "FOREIGN"],
    "eval --out a file": ["eval", "CKPT", "--data", "data", "--out", "f.txt"],
    "train --resume into a folder that is no run": [
        *("train", "--data", "data", "--model", "CKPT", "--out", "FOREIGN", "--resume"),
    ],
}


@pytest.mark.parametrize("argv", list(CASES.values()), ids=list(CASES))
def test_a_destructive_out_is_refused_and_nothing_changes(ws, argv, capsys):
    before = tree(ws)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "choose" in err  # the message says what to do instead
    assert tree(ws) == before  # every input, and everything beside it, byte-identical


def test_the_message_proposes_an_out_that_works(ws, capsys):
    assert main(["prepare", "DIR/corpus.txt", "--out", "DIR", "--overwrite", *PREP]) == 2
    err = capsys.readouterr().err
    assert "contains the input DIR/corpus.txt" in err and "--out DIR-data" in err
    assert main(["prepare", "DIR/corpus.txt", "--out", "DIR-data", *PREP]) == 0  # the proposal is accepted
    assert (ws / "DIR/corpus.txt").read_text() == CORPUS


def test_overwrite_replaces_owngpt_output_of_its_kind(ws):
    assert main(["prepare", "f.txt", "--out", "new", *PREP]) == 0
    assert main(["prepare", "f.txt", "--out", "new", *PREP]) == 2  # exists: needs --overwrite
    (ws / "f.txt").write_text(CORPUS + "one more paragraph\n")
    assert main(["prepare", "f.txt", "--out", "new", "--overwrite", *PREP]) == 0
    assert json.loads((ws / "new/meta.json").read_text())["format"] == "owngpt-data"
    assert main(["export", "CKPT", "--out", "exp", "--to", "hf", "--no-measure"]) == 0
    assert main(["export", "CKPT", "--out", "exp", "--to", "int8", "--no-measure"]) == 2
    assert main(["export", "CKPT", "--out", "exp", "--to", "int8", "--no-measure", "--overwrite"]) == 0
    assert read_meta(ws / "exp")["export"] == "int8"
    assert not [p for p in ws.iterdir() if p.name.startswith(".")]  # no build or swap leftovers


def test_a_failure_while_building_leaves_the_old_output_whole(ws, monkeypatch):
    assert main(["export", "CKPT", "--out", "exp", "--to", "hf", "--no-measure"]) == 0
    before = tree(ws)

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("owngpt.export.weight_bytes", broken)  # fails after the new export is written aside
    with pytest.raises(OSError):
        main(["export", "CKPT", "--out", "exp", "--to", "hf", "--no-measure", "--overwrite"])
    assert tree(ws) == before


def test_swap_is_atomic_and_falls_back_to_two_renames(tmp_path, monkeypatch):
    for exchange_works in (True, False):
        if not exchange_works:
            monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # swap_in moved to owngpt.atomic
        out, new = tmp_path / "out", tmp_path / ".out.new"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "v").write_text("old")
        new.mkdir()
        (new / "v").write_text("new")
        outdir.swap_in(new, out)
        assert (out / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a kill between the two renames of the fallback: no out, the old one aside; the next writer puts it back
    (tmp_path / "out").rename(tmp_path / ".out.old-999999")
    outdir.recover_old(tmp_path / "out")
    assert (tmp_path / "out/v").read_text() == "new"


# ---------------------------------------------------------------------------- property: nothing outside --out
NAMES = ["RUN", "data", "DIR", "FOREIGN", "CKPT", "LINK", "f.txt", "new", "checkpoints", "best", "src", "corpus.txt"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(["prepare", "export", "prune"]),
    parts=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
    overwrite=st.booleans(),
)
def test_no_command_writes_outside_its_out(template, command, parts, overwrite):
    with tempfile.TemporaryDirectory() as d:
        w = Path(d) / "ws"
        shutil.copytree(template, w, symlinks=True)
        out = w.joinpath(*parts)
        argv = {
            "prepare": ["prepare", str(w / "f.txt"), "--out", str(out), *PREP],
            "export": ["export", str(w / "RUN/checkpoints/best"), "--out", str(out), "--to", "hf", "--no-measure"],
            "prune": ["prune", str(w / "CKPT"), "--out", str(out), "--sparsity", "0.5", "--no-measure"],
        }[command] + (["--overwrite"] if overwrite else [])
        before = tree(w)
        code = main(argv)
        after = tree(w)
        real_out = Path(os.path.realpath(out)).relative_to(os.path.realpath(w))
        inside = lambda rel: Path(rel) == real_out or Path(rel).is_relative_to(real_out)  # noqa: E731
        outside_before = {k: v for k, v in before.items() if not inside(k)}
        outside_after = {k: v for k, v in after.items() if not inside(k)}
        # parent dirs of a new --out may be created; nothing else outside --out appears, changes or goes
        made = {k for k in outside_after.keys() - outside_before.keys() if outside_after[k] == "dir"}
        assert {k: v for k, v in outside_after.items() if k not in made} == outside_before
        assert all(real_out.is_relative_to(k) for k in made)
        if code == 0:
            kind = "data" if command == "prepare" else "checkpoint"
            assert outdir.kind_of(w / real_out) == kind
        else:
            assert code == 2 and after == before


# ---------------------------------------------------------------------------------- saved state stays consistent
class Crash(Exception):
    pass


def crash_on_second_save(monkeypatch, step: int) -> None:
    """save_checkpoint raises (as a kill would stop it) at the second of the two saves of step STEP (best and last,
    in whichever order train saves them): the moment the issue's `kill -9` hit."""
    real = ckpt_mod.save_checkpoint
    seen = []

    def save(out_dir, model, tokenizer=None, meta=None, extra_files=None):
        if (meta or {}).get("step") == step:
            seen.append(Path(out_dir).name)
            if len(seen) == 2:
                raise Crash
        return real(out_dir, model, tokenizer, meta, extra_files)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)  # where the loop looks it up


def best_step_reported(capsys) -> int:
    done = [x for x in capsys.readouterr().err.splitlines() if x.startswith("done:")][-1]
    return int(done.split(" at step ")[1].split(";")[0])


def test_kill_between_best_and_last_then_resume(tiny_lm_data, tiny_ckpt, tmp_path, monkeypatch, capsys):
    kw = dict(max_steps=4, eval_every=2)
    a = train(quick_cfg(tiny_lm_data, tmp_path / "a", tiny_ckpt, **kw))
    a_best = read_meta(a.best_checkpoint)["step"]
    assert read_meta(a.best_checkpoint)["metrics"]["val_loss"] == a.best_metric
    crash_on_second_save(monkeypatch, a_best)  # the first save of the pair done, the second cut off
    with pytest.raises(Crash):
        train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, **kw))
    monkeypatch.undo()
    ckpts = tmp_path / "b/checkpoints"
    state = json.loads((ckpts / "last/trainer/state.json").read_text())
    # at every moment best is at least as new as what last (what --resume reads) says the best is
    assert read_meta(ckpts / "best")["step"] >= (state["best_step"] or 0)
    capsys.readouterr()
    b = train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, resume=True, **kw))
    assert best_step_reported(capsys) == read_meta(b.best_checkpoint)["step"] == a_best
    assert b.best_metric == a.best_metric == read_meta(b.best_checkpoint)["metrics"]["val_loss"]
    wa, wb = weights(a.best_checkpoint), weights(b.best_checkpoint)
    assert all((wa[k] == wb[k]).all() for k in wa)


def _run_with_stale_best(tiny_lm_data, tiny_ckpt, run: Path, claimed_step: int, max_steps: int) -> None:
    """The issue's state: last says "best at step CLAIMED" while checkpoints/best still holds step 2 (a run saved
    by the old order, last then best, killed between the two)."""

    class Stop(Exception):
        pass

    def stop_at_2(step, metrics):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=max_steps, eval_every=2), callbacks=[stop_at_2])
    shutil.copytree(run / "checkpoints/best", run.parent / "best-at-2")
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=max_steps, eval_every=2, resume=True))
    f = run / "checkpoints/last/trainer/state.json"
    state = json.loads(f.read_text())
    state["best_step"] = claimed_step
    state["best_metric"] = -1.0  # a value no checkpoint holds: what is reported must come from disk
    if claimed_step == state["step"]:
        state["best_metric"] = read_meta(run / "checkpoints/last")["metrics"]["val_loss"]
    f.write_text(json.dumps(state))
    shutil.rmtree(run / "checkpoints/best")
    shutil.copytree(run.parent / "best-at-2", run / "checkpoints/best")
    assert read_meta(run / "checkpoints/best")["step"] == 2


def test_stale_best_is_restored_from_last_when_last_is_the_best(tiny_lm_data, tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    _run_with_stale_best(tiny_lm_data, tiny_ckpt, run, claimed_step=4, max_steps=4)
    capsys.readouterr()
    res = train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=4, eval_every=2, resume=True))
    err = capsys.readouterr().err
    assert "restored from checkpoints/last" in err
    assert read_meta(run / "checkpoints/best")["step"] == 4 and "at step 4;" in err
    wl, wb = weights(run / "checkpoints/last"), weights(res.best_checkpoint)
    assert all((wl[k] == wb[k]).all() for k in wl)
    assert not (res.best_checkpoint / "trainer").exists()  # best carries no optimizer state, as a saved best


def test_stale_best_that_cannot_be_rebuilt_is_reported_as_it_is(tiny_lm_data, tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    _run_with_stale_best(tiny_lm_data, tiny_ckpt, run, claimed_step=4, max_steps=6)
    capsys.readouterr()
    res = train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=6, eval_every=2, resume=True))
    held = read_meta(run / "checkpoints/best")
    assert held["step"] == 2 and best_step_reported(capsys) == 2
    assert res.best_metric == held["metrics"]["val_loss"]  # not the -1.0 last claimed


def test_leftovers_of_interrupted_saves_are_cleaned_at_the_next_start(tiny_lm_data, tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))
    for name in (".best.old-4242", ".last.old-4243", ".best.tmp-abc"):
        shutil.copytree(run / "checkpoints/best", run / "checkpoints" / name)
    best = tree(run / "checkpoints/best")
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=4, eval_every=2, resume=True))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    assert read_meta(run / "checkpoints/best")["step"] in (2, 4) and best  # best kept (or newly improved)


def fail_first_step(monkeypatch) -> None:
    """The first training step raises (out of memory, a bug, Ctrl-C...), after the run dir was set up."""

    def boom(*a, **k):
        raise Crash

    monkeypatch.setattr("owngpt.train.lr_at", boom)


def test_a_run_that_failed_before_its_first_step_does_not_block_a_rerun(
    tiny_lm_data, tiny_ckpt, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    fail_first_step(monkeypatch)
    with pytest.raises(Crash):
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt))
    monkeypatch.undo()
    assert (run / "config.yaml").exists()  # the failed start left its run dir
    capsys.readouterr()
    res = train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))  # no --overwrite needed
    assert res.steps == 2 and "starting it again" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="already holds a run"):  # a run with progress still does block
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))


def test_an_overwrite_that_fails_before_a_checkpoint_gives_the_old_run_back(
    tiny_lm_data, tiny_ckpt, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))
    (run / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    fail_first_step(monkeypatch)
    with pytest.raises(Crash):
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt, overwrite=True))
    monkeypatch.undo()
    assert tree(tmp_path) == before
    res = train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2, seed=4, overwrite=True))
    assert res.steps == 2 and not (run / "notes.txt").exists()  # a completed --overwrite replaces the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_overwrite_killed_before_a_checkpoint_is_undone_at_the_next_start(tiny_lm_data, tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))
    before = tree(tmp_path)
    # what a SIGKILL during the new run's first steps leaves: the old run aside, the new one without a checkpoint
    run.rename(tmp_path / ".run.replaced-999999")
    run.mkdir()
    shutil.copy(tmp_path / ".run.replaced-999999/config.yaml", run / "config.yaml")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))
    assert tree(tmp_path) == before


def test_predictions_are_recognised_so_a_rerun_may_replace_them(tmp_path):
    """predict --output replaces only predictions it wrote (a user's file was silently replaced)."""
    import io

    import numpy as np

    from owngpt.predict import is_predictions_file, write_predictions

    for fmt in ("jsonl", "csv"):
        buf = io.StringIO()
        write_predictions(buf, ["a, b", "c"], ["neg", "pos"], np.array([[0.2, 0.8], [0.6, 0.4]]), fmt)
        f = tmp_path / f"p.{fmt}"
        f.write_text(buf.getvalue(), encoding="utf-8")
        assert is_predictions_file(f)
    for text in ("my thesis\n", "text,label\nhi,1\n", '{"text": "hi", "label": 1}\n', "\x00\xff"):
        f = tmp_path / "user.txt"
        f.write_text(text, encoding="utf-8")
        assert not is_predictions_file(f), text
