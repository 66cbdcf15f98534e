"""Cross-validation for classify: stratified, disjoint, covering, seeded folds; cv=K through the CLI; tune's objective."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fixtures
from owngpt.cli import main
from owngpt.config import TrainConfig
from owngpt.cv import CVResult, cross_validate, stratified_folds, summarize
from owngpt.errors import ConfigError, DataError

POS = ["what a good film", "good acting, good story", "so good", "a good time", "good good good", "really good"]
NEG = ["what a bad film", "bad acting, bad story", "so bad", "a bad time", "bad bad bad", "really bad"]


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=5, max_size=80),
    k=st.integers(2, 5),
    seed=st.integers(0, 2**31),
)
def test_folds_are_disjoint_cover_the_data_are_stratified_and_seeded(labels, k, seed):
    y = np.asarray(labels)
    folds = stratified_folds(y, k, seed)
    assert len(folds) == k
    joined = np.concatenate(folds)
    assert sorted(joined.tolist()) == list(range(len(y)))  # cover, and disjoint (no index twice)
    for c in np.unique(y):
        per_fold = [int((y[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1  # each class spread evenly
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    again = stratified_folds(y, k, seed)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))  # same seed, same folds


def test_another_seed_gives_other_folds():
    y = np.arange(40) % 2
    a, b = stratified_folds(y, 4, 0), stratified_folds(y, 4, 1)
    assert any(not np.array_equal(x, z) for x, z in zip(a, b))


def test_fold_count_is_checked():
    with pytest.raises(ConfigError):
        stratified_folds([0, 1, 0], 1, 0)
    with pytest.raises(DataError, match="fewer than"):
        stratified_folds([0, 1], 3, 0)
    with pytest.raises(ConfigError, match="cv=1"):
        TrainConfig(cv=1).validate()


def test_summary_means_stds_and_the_averaged_peak(tmp_path):
    """Two hand-written folds: the numbers of cv.json come from their metrics.jsonl."""
    runs = []
    for k, accs in enumerate(([0.5, 0.8, 0.7], [0.6, 0.7, 0.9]), start=1):
        d = tmp_path / f"fold_{k}"
        d.mkdir()
        lines = [{"step": 5, "train_loss": 1.0}]
        lines += [
            {"step": 10 * (i + 1), "accuracy": a, "macro_f1": a - 0.1, "val_loss": 1 - a} for i, a in enumerate(accs)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append(d)
    r = summarize(tmp_path, runs, "accuracy", [(8, 4), (8, 4)])
    assert [f.best_step for f in r.folds] == [20, 30]
    assert r.mean["accuracy"] == pytest.approx(0.85)
    assert r.std["accuracy"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert r.mean["macro_f1"] == pytest.approx(0.75)
    # fold-averaged curve: 0.55, 0.75, 0.8 -> peak at step 30, though fold 1 alone peaked at 20
    assert r.peak_step == 30 and r.peak_value == pytest.approx(0.8)
    low = summarize(tmp_path, runs, "val_loss", [(8, 4), (8, 4)])
    assert low.peak_step == 30 and low.mean["val_loss"] == pytest.approx(0.15)


@pytest.fixture()
def cls_data(tmp_path):
    rows = [(t, "pos") for t in POS * 2] + [(t, "neg") for t in NEG * 2]
    return fixtures.write_classify_data_dir(tmp_path / "cls", rows, rows[:4])


def test_cv_trains_k_folds_on_their_own_data_dirs(tmp_path, cls_data, capsys, monkeypatch):
    monkeypatch.delenv("OWNGPT_NO_REPORT", raising=False)
    code = main(
        [
            "train",
            "--data",
            str(cls_data),
            "--out",
            str(tmp_path / "cv"),
            "--model",
            "tiny",
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "--batch-size",
            "4",
            "--block-size",
            "32",
            "cv=3",
            "seed=3",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "3-fold cross-validation" in out and "peaked at step" in out
    run = tmp_path / "cv"
    summary = json.loads((run / "cv.json").read_text())
    assert summary["k"] == 3 and len(summary["folds"]) == 3
    seen = []
    for i in (1, 2, 3):
        train_rows = [json.loads(x) for x in (run / "folds" / f"data_{i}" / "train.jsonl").read_text().splitlines()]
        val_rows = [json.loads(x) for x in (run / "folds" / f"data_{i}" / "val.jsonl").read_text().splitlines()]
        assert len(train_rows) + len(val_rows) == 24
        assert {r["label"] for r in val_rows} == {"pos", "neg"}  # stratified
        seen += [json.dumps(r) for r in val_rows]
        assert (run / f"fold_{i}" / "checkpoints" / "best").is_dir()
        assert not (run / f"fold_{i}" / "report.html").exists()  # folds write no report of their own
    assert len(seen) == 24  # the val folds cover the train split exactly once (8 each)
    folds = summary["folds"]
    assert summary["mean"]["accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in folds]))
    # the cv run's own report card holds the folds' table
    html = (run / "report.html").read_text()
    assert 'id="cv"' in html
    for f in folds:
        assert f'data-key="cv.{f["fold"]}.accuracy" data-run="0" data-value="{f["accuracy"]!r}"' in html


def test_tune_optimises_the_cross_validated_mean(tmp_path, cls_data, monkeypatch):
    pytest.importorskip("optuna")
    from owngpt.tune import tune

    calls = []

    def fake_cv(cfg, callbacks=()):
        calls.append(cfg)
        return CVResult(tmp_path, cfg.cv, "accuracy", [], {"accuracy": cfg.lr * 100}, {}, 4, cfg.lr * 100)

    import owngpt.tune.study as study

    monkeypatch.setattr(study, "cross_validate", fake_cv)  # where the study looks its objective up
    base = TrainConfig(task="classify", data=str(cls_data), cv=3, lr=1e-3, max_steps=4)
    from owngpt.tune import Param

    r = tune(base, out=tmp_path / "t", trials=2, space={"lr": Param("lr", "float", 1e-3, 2e-3)}, log=lambda m: None)
    assert len(calls) == 2 and all(c.cv == 3 for c in calls)
    assert r.best_value == pytest.approx(max(c.lr for c in calls) * 100)


def test_cross_validate_refuses_other_tasks(tmp_path, tiny_lm_data):
    with pytest.raises(ConfigError, match="classify"):
        cross_validate(TrainConfig(task="lm", data=str(tiny_lm_data), out=str(tmp_path / "x"), cv=2))
