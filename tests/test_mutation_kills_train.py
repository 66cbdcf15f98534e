"""Tests written to kill mutants of owngpt.train that tools/mutate.py found surviving (docs/testing.md lists them).

Oracles: the same draws after a snapshot and a restore, a run without gradient checkpointing, the config's own rules.
"""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest
import torch
from train_helpers import quick_cfg, weights

import fixtures
from owngpt.errors import ConfigError
from owngpt.train import train


def test_the_saved_rng_state_replays_every_generator_after_a_json_round_trip():
    # resume restores Python's, numpy's and torch's global generators from trainer/state.json; numpy's state includes
    # a cached second Gaussian (after an odd number of normal draws). Kills trainer_state set_rng_state reading the cached
    # Gaussian as the has-Gaussian flag (n[3] -> n[4]).
    from owngpt.trainer_state import rng_state, set_rng_state

    def draws():
        return [random.random(), *np.random.randn(3).tolist(), *torch.rand(2).tolist()]

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn(1)  # one Gaussian drawn: numpy holds the second of its pair
    saved = json.loads(json.dumps({k: (v.tolist() if k == "torch" else v) for k, v in rng_state().items()}))
    saved["torch"] = torch.tensor(saved["torch"], dtype=torch.uint8)
    want = draws()
    set_rng_state(saved)
    assert draws() == want


def test_train_refuses_a_bad_setting_before_writing_anything(tmp_path, tiny_lm_data, tiny_ckpt):
    # kills train's `cfg.validate()` dropped: a NaN learning rate would train to NaN weights without a word
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="lr=nan: must be a finite number"):
        train(quick_cfg(tiny_lm_data, out, tiny_ckpt, lr=float("nan")))
    assert not out.exists()


def test_gradient_checkpointing_trains_the_same_weights_and_the_run_names_its_model(
    tmp_path, tiny_lm_data, tiny_ckpt, capsys
):
    # Oracle: the same run without gradient checkpointing (recomputing activations changes no gradient).
    t0 = time.perf_counter()
    plain = train(quick_cfg(tiny_lm_data, tmp_path / "plain", tiny_ckpt, max_steps=3, eval_every=3))
    wall = time.perf_counter() - t0
    # tokens/s is a window's tokens over the window's time, which is within the call's: a bound, not a timing (kills
    # the window's elapsed time computed `now + t0`). Each logged step (log_every=1) trains a 4 x 32-token batch.
    logged = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r]
    assert len(speeds) == 3 and all(v * wall >= 4 * 32 for v in speeds)
    err = capsys.readouterr().err
    assert f"model: pretrained: local checkpoint {tiny_ckpt}\n" in err  # the run says what it trains
    assert "step 3: " in err and "(best)" in err  # and what each evaluation gave
    # the progress bar is closed before the run's last line (kills `bar.close()` dropped: the bar closes when
    # collected, after that line, and prints over it)
    assert err.endswith(f"checkpoints in {tmp_path / 'plain' / 'checkpoints'}\n")
    ckpt = train(
        quick_cfg(tiny_lm_data, tmp_path / "ckpt", tiny_ckpt, max_steps=3, eval_every=3, gradient_checkpointing=True)
    )
    a, b = weights(plain.last_checkpoint), weights(ckpt.last_checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    before = weights(fixtures.save_tiny_checkpoint(tmp_path / "again"))
    assert any(not torch.equal(before[k], b[k]) for k in b)  # it trained


class _Stop(Exception):
    pass


def test_a_save_cut_between_its_two_renames_is_put_back_and_resumed_from(tmp_path, tiny_lm_data, tiny_ckpt, capsys):
    # save_checkpoint moves the old `last` aside, then renames the new one in; a kill in between leaves only
    # `.last.old-PID`. Resume must put it back and continue from its step, not start over (which would end with the
    # same weights, so test_resume's check cannot tell). Kills train's `recover_interrupted_save(...)` dropped.
    # The resumed run changes lr: it must say so.
    def stop_at_2(step, metrics):
        if step == 2:
            raise _Stop

    kw = dict(max_steps=8, eval_every=2)  # the prefetcher is still 2 steps ahead when step 2 stops the run
    with pytest.raises(_Stop):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, **kw), callbacks=[stop_at_2])
    # a run stopped by a callback leaves no batch-prefetching thread behind (kills `batches.close()` dropped)
    assert not [t for t in threading.enumerate() if t.name == "owngpt-prefetch" and t.is_alive()]
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "last").rename(ckpts / ".last.old-12345")
    steps = []
    res = train(
        quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, resume=True, lr=2e-3, **kw),
        callbacks=[lambda step, metrics: steps.append(step)],
    )
    assert res.steps == 8 and min(steps) > 2  # resumed after step 2
    assert not list(ckpts.glob(".last.old-*"))
    # a setting changed on resume is named (kills the warning dropped)
    err = capsys.readouterr().err
    assert "resuming from step 2" in err and "warning: settings differ from the interrupted run (lr)" in err
