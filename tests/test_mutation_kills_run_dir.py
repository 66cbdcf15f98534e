"""owngpt.run_dir on its own (#25): --out created and left as it was found, the repairs of a save cut short for each
checkpoint a run keeps, and which best a resume continues with and what it says about it. Checkpoint dirs are
written by hand (config.json, owngpt.json): no model is trained. Oracles: the file trees and the metadata written in
the test, the messages the documented cases give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from owngpt.distributed import Dist
from owngpt.run_dir import check_writable, reconcile_best, recover_interrupted_save


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
