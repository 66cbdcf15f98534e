"""Exact resume: a run stopped (or killed with SIGKILL) and resumed ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import quick_cfg, weights

from owngpt.errors import CheckpointError
from owngpt.train import train


class Stop(Exception):
    pass


def stop_at(k):
    def cb(step, metrics):
        if step == k:
            raise Stop

    return cb


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def train_losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in lines if "train_loss" in r]


def test_stopped_and_resumed_equals_uninterrupted(tiny_lm_data, tiny_ckpt, tmp_path, capsys):
    # dropout on: the RNG states must be restored too; grad_accum 2: the data position of micro-batches
    kw = dict(max_steps=6, eval_every=2, dropout=0.1, grad_accum=2, batch_size=2, schedule="cosine", warmup_steps=2)
    a = train(quick_cfg(tiny_lm_data, tmp_path / "a", tiny_ckpt, **kw))
    with pytest.raises(Stop):
        train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, **kw), callbacks=[stop_at(4)])
    capsys.readouterr()
    b = train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, resume=True, **kw))
    assert "resuming from step 4" in capsys.readouterr().err
    assert_same_weights(a.last_checkpoint, b.last_checkpoint)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")  # the same curve, and no duplicates
    assert a.best_metric == b.best_metric


def test_sigkill_at_any_moment_then_resume(tiny_lm_data, tiny_ckpt, tmp_path, capsys):
    kw = dict(
        max_steps=10, eval_every=1, batch_size=2, block_size=16, eval_batches=1, warmup_steps=3, schedule="cosine"
    )
    a = train(quick_cfg(tiny_lm_data, tmp_path / "a", tiny_ckpt, **kw))
    # the run to kill is a real `owngpt train` process, killed with SIGKILL once it has written a checkpoint
    args = [
        "--data",
        str(tiny_lm_data),
        "--model",
        str(tiny_ckpt),
        "--max-steps",
        "10",
        "--eval-every",
        "1",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--seed",
        "3",
        "--lr",
        "3e-3",
        "eval_batches=1",
        "warmup_steps=3",
        "log_every=1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "b"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "owngpt", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (tmp_path / "b/checkpoints/last/trainer").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # somewhere in a later step or save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    capsys.readouterr()
    b = train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, resume=True, **kw))
    assert "resuming from step" in capsys.readouterr().err
    assert_same_weights(a.last_checkpoint, b.last_checkpoint)


def test_a_kill_between_the_two_renames_of_a_save_is_recovered(tiny_lm_data, tiny_ckpt, tmp_path):
    kw = dict(max_steps=4, eval_every=2)
    with pytest.raises(Stop):
        train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, **kw), callbacks=[stop_at(2)])
    ckpts = tmp_path / "b/checkpoints"
    (ckpts / "last").rename(ckpts / ".last.old-12345")  # save_checkpoint moved the old one aside, then died
    res = train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, resume=True, **kw))
    a = train(quick_cfg(tiny_lm_data, tmp_path / "a", tiny_ckpt, **kw))
    assert res.steps == 4
    assert_same_weights(a.last_checkpoint, res.last_checkpoint)


def test_corrupt_trainer_state_is_a_clear_error(tiny_lm_data, tiny_ckpt, tmp_path):
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=2, eval_every=2))
    f = res.last_checkpoint / "trainer" / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=4, resume=True))


def test_resume_with_nothing_saved_starts_over(tiny_lm_data, tiny_ckpt, tmp_path, capsys):
    res = train(quick_cfg(tiny_lm_data, tmp_path / "new", tiny_ckpt, max_steps=1, resume=True))
    assert res.steps == 1 and "starting from step 0" in capsys.readouterr().err
