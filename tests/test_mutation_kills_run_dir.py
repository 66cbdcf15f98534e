"""owngpt.run_dir on its own (#25): --out created and left as it was found, the repairs of a save cut short for each
checkpoint a run keeps, which best a resume continues with and what it says about it, and what a run makes of the
--out it is given (resume, start, start again in place, refuse, replace) and what it says. Checkpoint dirs are
written by hand (config.json, owngpt.json): no model is trained. Oracles: the file trees and the metadata written in
the test, the messages the documented cases give."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from owngpt.config import TrainConfig
from owngpt.distributed import Dist
from owngpt.errors import ConfigError
from owngpt.run_dir import check_writable, prepare_run_dir, reconcile_best, recover_interrupted_save, run_started


def _ckpt(d: Path, step: int, val_loss: float, trainer: bool = False) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "owngpt.json").write_text(json.dumps({"task": "lm", "step": step, "metrics": {"val_loss": val_loss}}))
    if trainer:
        (d / "trainer").mkdir()
        (d / "trainer" / "state.json").write_text("{}")
    return d


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_check_writable_makes_a_nested_out_and_leaves_it_empty(tmp_path):
    out = tmp_path / "runs" / "2026" / "a"
    check_writable(out)
    assert out.is_dir() and list(out.iterdir()) == []
    check_writable(out)  # an existing --out is fine too, and stays empty
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["last", "best", "merged"])
def test_a_checkpoint_swap_cut_between_its_renames_is_put_back(tmp_path, name):
    # a kill between `NAME -> .NAME.old-PID` and `new -> NAME` leaves no NAME: the old one is put back
    ckpts = tmp_path / "checkpoints"
    _ckpt(ckpts / f".{name}.old-4242", 3, 1.0)
    recover_interrupted_save(tmp_path, Dist())
    assert _files(ckpts) == [name, f"{name}/config.json", f"{name}/owngpt.json"]


def _state(step: int, best_step: int | None, best: float | None) -> dict:
    return {"step": step, "best_step": best_step, "best_metric": best}


def test_a_resume_with_best_at_the_reported_step_continues_with_it_silently(tmp_path, capsys):
    _ckpt(tmp_path / "best", 4, 0.5)
    before = _files(tmp_path)
    assert reconcile_best(tmp_path, _state(6, 4, 0.5), "val_loss", Dist()) == (0.5, 4)
    assert reconcile_best(tmp_path, _state(6, None, None), "val_loss", Dist()) == (None, None)
    assert _files(tmp_path) == before and capsys.readouterr().err == ""


def test_a_stale_best_is_rebuilt_from_last_when_last_is_the_best_step(tmp_path, capsys):
    _ckpt(tmp_path / "best", 2, 0.9)
    _ckpt(tmp_path / "last", 6, 0.4, trainer=True)
    assert reconcile_best(tmp_path, _state(6, 6, 0.4), "val_loss", Dist()) == (0.4, 6)
    assert json.loads((tmp_path / "best" / "owngpt.json").read_text())["step"] == 6
    assert not (tmp_path / "best" / "trainer").exists()  # best is weights and metadata only
    assert capsys.readouterr().err == (
        "checkpoints/best held step 2, not the best step 6: restored from checkpoints/last\n"
    )


def test_a_stale_best_that_cannot_be_rebuilt_is_resumed_as_it_is_with_a_warning(tmp_path, capsys):
    _ckpt(tmp_path / "best", 2, 0.9)
    _ckpt(tmp_path / "last", 6, 0.4, trainer=True)
    assert reconcile_best(tmp_path, _state(6, 4, 0.5), "val_loss", Dist()) == (0.9, 2)
    assert json.loads((tmp_path / "best" / "owngpt.json").read_text())["step"] == 2
    assert capsys.readouterr().err == (
        "warning: checkpoints/best holds step 2, not 4 (a save was cut short): resuming with it\n"
    )


def test_a_missing_best_is_forgotten_with_a_warning(tmp_path, capsys):
    _ckpt(tmp_path / "last", 6, 0.4, trainer=True)
    assert reconcile_best(tmp_path, _state(6, 4, 0.5), "val_loss", Dist()) == (None, None)
    assert not (tmp_path / "best").exists()
    assert capsys.readouterr().err == (
        "warning: checkpoints/best (step 4) is missing; the next improvement saves it again\n"
    )


HEADER = "# Resolved config of this run\n"  # the first line owngpt writes in RUN/config.yaml (owngpt.outdir)


def _run(out: Path, *, last: bool = False, metrics: str | None = None) -> Path:
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(HEADER + "lr: 0.001\n")
    if last:
        (out / "checkpoints" / "last").mkdir(parents=True)
        (out / "checkpoints" / "last" / "config.json").write_text("{}")
    if metrics is not None:
        (out / "metrics.jsonl").write_text(metrics)
    return out


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(data="d", out=str(out), model="tiny", **kw)


def test_resume_continues_from_last_and_never_replaces_the_run(tmp_path, capsys):
    out = _run(tmp_path / "run", last=True, metrics='{"step": 1}\n')
    before = _files(out)
    assert prepare_run_dir(out, _cfg(out, resume=True), Dist()) == (out / "checkpoints" / "last", False)
    assert prepare_run_dir(out, _cfg(out, resume=True, overwrite=True), Dist()) == (
        out / "checkpoints" / "last",
        False,
    )
    assert _files(out) == before and capsys.readouterr().err == ""


@pytest.mark.parametrize("made", ["missing", "empty", "run"])
def test_resume_where_there_is_no_checkpoint_yet_starts_from_step_0_and_says_so(tmp_path, capsys, made):
    out = tmp_path / "run"
    if made == "empty":
        out.mkdir()
    elif made == "run":
        _run(out)  # a run dir killed before its first save
    assert prepare_run_dir(out, _cfg(out, resume=True), Dist()) == (None, False)
    assert capsys.readouterr().err == f"--resume: no checkpoint in {out} yet, starting from step 0\n"
    assert out.exists() == (made != "missing")  # nothing made or removed here


@pytest.mark.parametrize("what", ["data", "notes"])
def test_resume_into_a_dir_owngpt_did_not_make_as_a_run_is_refused(tmp_path, what):
    out = tmp_path / "x"
    out.mkdir()
    if what == "data":
        (out / "meta.json").write_text(json.dumps({"format": "owngpt-data"}))
    else:
        (out / "notes.txt").write_text("mine")
    before = _files(out)
    with pytest.raises(ConfigError, match="--resume: .* is not an owngpt run dir"):
        prepare_run_dir(out, _cfg(out, resume=True), Dist())
    assert _files(out) == before


def test_a_fresh_start_in_a_new_or_empty_out_says_nothing(tmp_path, capsys):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert prepare_run_dir(out, _cfg(out), Dist()) == (None, False)
        assert prepare_run_dir(out, _cfg(out, overwrite=True), Dist()) == (None, False)
    assert capsys.readouterr().err == ""


def test_a_run_stopped_before_its_first_step_is_started_again_in_place(tmp_path, capsys):
    out = _run(tmp_path / "run", metrics="")
    assert prepare_run_dir(out, _cfg(out), Dist()) == (None, False)
    assert (
        capsys.readouterr().err == f"{out}: the run there stopped before its first step; starting it again in place\n"
    )


@pytest.mark.parametrize("progress", ["last", "best", "metrics"])
def test_a_run_with_progress_is_refused_without_overwrite_and_replaced_with_it(tmp_path, capsys, progress):
    out = _run(tmp_path / "run", last=progress == "last", metrics='{"step": 1}\n' if progress == "metrics" else None)
    if progress == "best":
        (out / "checkpoints" / "best").mkdir(parents=True)
        (out / "checkpoints" / "best" / "config.json").write_text("{}")
    assert run_started(out)
    with pytest.raises(ConfigError, match="already holds a run: pass --resume to continue it, --overwrite"):
        prepare_run_dir(out, _cfg(out), Dist())
    assert prepare_run_dir(out, _cfg(out, overwrite=True), Dist()) == (None, True)
    assert capsys.readouterr().err == ""


def test_an_out_that_is_a_file_is_refused_whatever_the_flags(tmp_path):
    out = tmp_path / "f"
    out.write_text("x")
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(ConfigError, match="is a file, not a directory"):
            prepare_run_dir(out, _cfg(out, **kw), Dist())
    assert out.read_text() == "x"


@pytest.mark.parametrize("metrics", ["{", "\n", '{"step": 1, "train_lo'])
def test_any_byte_in_metrics_jsonl_is_progress_even_a_line_cut_short(tmp_path, metrics):
    """A kill while the first line was appended leaves a fragment: the run had started logging, so it is not
    silently started again over it (run_started is "a checkpoint or anything logged")."""
    out = _run(tmp_path / "run", metrics=metrics)
    assert run_started(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(out, _cfg(out), Dist())
    (out / "metrics.jsonl").write_text("")
    assert not run_started(out)


def test_a_best_restored_from_last_is_private_to_its_owner_like_every_checkpoint(tmp_path):
    # checkpoints are written with mode 0o700 (owngpt.checkpoint.save_checkpoint); a copy made on resume is one too
    _ckpt(tmp_path / "best", 2, 0.9)
    _ckpt(tmp_path / "last", 6, 0.4, trainer=True)
    reconcile_best(tmp_path, _state(6, 6, 0.4), "val_loss", Dist())
    assert stat.S_IMODE((tmp_path / "best").stat().st_mode) == 0o700


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_an_out_that_cannot_be_made_is_refused_with_the_systems_reason(tmp_path, where):
    """The message gives the OS's reason in words (strerror), not the exception's repr with its errno."""
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "run" if where == "under_a_file" else tmp_path / "f"
    reason = os.strerror(errno.ENOTDIR if where == "under_a_file" else errno.EEXIST)
    with pytest.raises(ConfigError) as e:
        check_writable(out)
    assert str(e.value) == f"--out {out}: cannot write there ({reason}); choose a writable directory"
    assert (tmp_path / "f").read_text() == "x"
