"""owngpt tune over the real training loop on a tiny model: the study's database, a pruned hopeless trial, and a best
config that `owngpt train --config` trains."""

from __future__ import annotations

import sqlite3

import pytest

from owngpt.cli import main
from owngpt.config import TrainConfig, load_config
from owngpt.tune import parse_space, tune

pytestmark = pytest.mark.timeout(300)


def test_real_study_prunes_and_best_config_trains(tmp_path, tiny_ckpt, tiny_lm_data):
    # The fixtures' 2-layer, 32-dim model. Warmup 0 so that a few steps show each lr's effect: two good learning
    # rates complete, then lr=1e-9 (the weights barely move) is worse than their median at its second evaluation.
    base = TrainConfig(
        data=str(tiny_lm_data),
        model=str(tiny_ckpt),
        max_steps=6,
        eval_every=2,
        eval_batches=2,
        batch_size=4,
        block_size=16,
        warmup_steps=0,
        lr=3e-2,
        log_every=2,
        seed=0,
    ).validate()
    out = tmp_path / "tune"
    res = tune(
        base,
        out=out,
        trials=3,
        space=parse_space(["lr=log:1e-9:1e-1"]),
        enqueue=[{"lr": 1e-2}, {"lr": 1e-9}],
        command="owngpt tune (test)",
    )
    with sqlite3.connect(out / "study.db") as con:
        rows = con.execute("select number, state from trials order by number").fetchall()
        reported = con.execute("select count(*) from trial_intermediate_values").fetchone()[0]
    assert rows == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "PRUNED")]
    assert reported == 3 + 3 + 2  # evaluations at steps 2, 4, 6; the pruned trial stopped after step 4
    assert res.best_trial in (0, 1) and res.best_value < 5.0
    for n in range(3):
        run = out / f"trial_{n:04d}"
        assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
    assert (out / "trial_0000" / "checkpoints" / "best" / "model.safetensors").exists()
    assert (out / "history.png").exists()

    # The best config trains, as `owngpt train --config best.yaml` (with the smoke test's overrides).
    cfg = load_config(TrainConfig, str(res.best_config))
    assert cfg.lr == pytest.approx(res.best_params["lr"]) and cfg.model == str(tiny_ckpt)
    again = tmp_path / "again"
    code = main(["train", "--config", str(res.best_config), "--max-steps", "2", "--out", str(again)])
    assert code == 0
    assert (again / "checkpoints" / "last" / "model.safetensors").exists()
    trained = load_config(TrainConfig, str(again / "config.yaml"))
    assert trained.lr == pytest.approx(res.best_params["lr"]) and trained.max_steps == 2
