"""owngpt tune: search-space parsing, the Optuna study in SQLite, pruning, resume after kill -9, parallel processes.

Most tests drive `tune()` with a deterministic fake `train` (the documented contract: `train(cfg, callbacks)` calls
each callback as `cb(step, metrics)` after every evaluation), so the study's logic is tested exactly and fast;
test_tune_real.py runs the real training loop on a tiny model.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from owngpt.config import TrainConfig, load_config, save_config
from owngpt.errors import ConfigError
from owngpt.tune import Param, default_space, load_space_file, make_param, metric_for, parse_space, tune

pytestmark = pytest.mark.timeout(120)

BEST_LR = 3e-3


def fake_train(cfg: TrainConfig, callbacks=(), delay: float = 0.0):
    """A training run whose val_loss is a known function of lr and step: best at lr=3e-3, falling with steps."""
    run = Path(cfg.out)
    run.mkdir(parents=True)
    gap = abs(math.log10(cfg.lr / BEST_LR))
    steps = 0
    for steps in range(cfg.eval_every, cfg.max_steps + 1, cfg.eval_every):
        time.sleep(delay)
        loss = 1.0 + gap + 2.0 / steps
        for cb in callbacks:
            cb(steps, {"val_loss": loss, "val_ppl": math.exp(loss)})
    save_config(cfg, run / "config.yaml")
    return SimpleNamespace(
        run_dir=run,
        best_checkpoint=None,
        last_checkpoint=None,
        best_metric=loss,
        metrics={"val_loss": loss},
        steps=steps,
        stopped_early=False,
    )


def base_config(data: str = "data", **kw) -> TrainConfig:
    return TrainConfig(data=data, model="tiny", max_steps=40, eval_every=10, **kw).validate()


def db_rows(db: Path, sql: str):
    with sqlite3.connect(db) as con:
        return con.execute(sql).fetchall()


# --- the search space --------------------------------------------------------------------------------------------


def test_parse_space_kinds():
    space = parse_space(
        [
            "lr=log:1e-4:3e-3",
            "batch_size=int:4:32",
            "weight_decay=float:0:0.2:0.05",
            "lora_r=cat:4,8,16",
            "warmup-steps=logint:1:200",
            "epochs=cat:1,2,3",
            "lora=cat:true,false",
        ]
    )
    assert space["lr"] == Param("lr", "log", 1e-4, 3e-3)
    assert space["batch_size"] == Param("batch_size", "int", 4, 32)
    assert space["weight_decay"].step == 0.05
    assert space["lora_r"].choices == (4, 8, 16)
    assert space["warmup_steps"].kind == "logint"
    assert space["epochs"].choices == (1.0, 2.0, 3.0)  # coerced to the field's type (float)
    assert space["lora"].choices == (True, False)
    assert space["lr"].contains(1e-3) and not space["lr"].contains(1e-2)
    assert space["lora_r"].describe() == "cat:4,8,16"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lrr=log:1e-4:3e-3", "did you mean lr"),
        ("btach_size=int:4:32", "did you mean batch_size"),
        ("out=cat:a,b", "cannot be searched"),
        ("lr=uniform:0:1", "kind must be one of"),
        ("lr=1e-3", "put key=value overrides before --space"),
        ("lr=log:0:1", "LOW > 0"),
        ("lr=float:1:0.1", "LOW must be below HIGH"),
        ("batch_size=float:4:32", "use int:4:32"),
        ("batch_size=int:4.5:32", "whole-number"),
        ("lr=log:1e-4", "expected log:LOW:HIGH"),
        ("lora_r=cat:4,x", "lora_r"),
        ("lr=log:a:1", "'a' is not a number"),
    ],
)
def test_parse_space_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_space([spec])


def test_space_file(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(
        "space:\n  lr: log:1e-4:3e-3\n  batch_size: {type: int, low: 4, high: 32, log: true}\n"
        "  dropout: {type: float, low: 0, high: 0.3}\n  lora_r: {choices: [4, 8]}\n"
    )
    space = load_space_file(f)
    assert space["lr"].kind == "log" and space["batch_size"] == Param("batch_size", "logint", 4, 32)
    assert space["dropout"].high == 0.3 and space["lora_r"].choices == (4, 8)
    f.write_text("space:\n  dropot: float:0:0.3\n")
    with pytest.raises(ConfigError, match=r"space.yaml: 'dropot' is not a training setting; did you mean dropout"):
        load_space_file(f)
    with pytest.raises(ConfigError, match="no such file"):
        load_space_file(tmp_path / "missing.yaml")


def test_default_space_per_task():
    lm = default_space(base_config())
    assert set(lm) == {"lr", "batch_size", "warmup_steps", "weight_decay", "dropout"}
    assert lm["lr"].kind == "log" and lm["lr"].low == pytest.approx(1e-4) and lm["lr"].high == pytest.approx(1e-2)
    assert lm["warmup_steps"].high == 20  # at most half of max_steps=40
    clf = default_space(TrainConfig(task="classify", data="d", lora=True))
    assert set(clf) == {"lr", "batch_size", "epochs", "lora_r"}
    assert metric_for(base_config()) == ("val_loss", "minimize")
    assert metric_for(TrainConfig(task="classify")) == ("accuracy", "maximize")
    assert metric_for(TrainConfig(task="classify", metric="macro_f1")) == ("macro_f1", "maximize")
    assert make_param("lr", "log:1e-5:1e-3", "x").low == 1e-5


# --- the study ---------------------------------------------------------------------------------------------------


def test_study_in_sqlite_best_config_summary_plots(tmp_path):
    out = tmp_path / "tune"
    res = tune(
        base_config(),
        out=out,
        trials=5,
        space=parse_space(["lr=log:1e-4:3e-2", "dropout=float:0:0.3"]),
        pruner="none",
        train_fn=fake_train,
        command="owngpt tune --trials 5",
    )
    db = out / "study.db"
    assert db.exists()
    tables = {r[0] for r in db_rows(db, "select name from sqlite_master where type='table'")}
    assert {"studies", "trials", "trial_params", "trial_values", "trial_intermediate_values"} <= tables
    assert db_rows(db, "select study_name from studies") == [("tune",)]
    states = db_rows(db, "select state, count(*) from trials group by state")
    assert states == [("COMPLETE", 5)]
    # every evaluation was reported as an intermediate value (4 per trial: steps 10, 20, 30, 40)
    assert db_rows(db, "select count(*) from trial_intermediate_values")[0][0] == 20
    # trial 0 is the base config's own values (the baseline)
    params0 = dict(
        db_rows(
            db,
            "select p.param_name, p.param_value from trial_params p join trials t "
            "using (trial_id) where t.number = 0 and p.param_name = 'dropout'",
        )
    )
    assert params0 == {"dropout": 0.0}
    assert res.n_complete == 5 and res.best_trial is not None
    # the objective is the best evaluation; the fake's loss at step 40 is 1 + |log10(lr/3e-3)| + 0.05
    assert res.best_value == pytest.approx(1.05 + abs(math.log10(res.best_params["lr"] / BEST_LR)))
    assert all((out / f"trial_{i:04d}" / "config.yaml").exists() for i in range(5))
    # best.yaml is a config `owngpt train --config` takes, headed by the command and the value
    text = res.best_config.read_text()
    assert text.startswith("# Best config of the Optuna study 'tune'") and "owngpt tune --trials 5" in text
    cfg = load_config(TrainConfig, str(res.best_config))
    assert cfg.lr == pytest.approx(res.best_params["lr"]) and cfg.dropout == pytest.approx(res.best_params["dropout"])
    assert cfg.data == "data" and cfg.model == "tiny" and cfg.max_steps == 40 and cfg.out == str(out / "best_run")
    assert cfg.extra["tune"]["trial"] == res.best_trial
    summary = (out / "summary.md").read_text()
    assert "| trial | state | val_loss | lr | dropout |" in summary and "COMPLETE (best)" in summary
    assert len((out / "summary.csv").read_text().splitlines()) == 6
    for name in ("history", "importances"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resuming a finished study runs nothing new
    calls = []
    tune(
        base_config(),
        out=out,
        trials=5,
        space=parse_space(["lr=log:1e-4:3e-2", "dropout=float:0:0.3"]),
        train_fn=lambda cfg, callbacks=(): calls.append(cfg),
    )
    assert calls == []


def test_hopeless_trial_is_pruned(tmp_path):
    # Three fixed trials: two good ones complete (the pruner's start-up), then lr=1e-7 whose loss stays 4.5 decades
    # worse than the median: pruned at its second evaluation (never at the first).
    out = tmp_path / "tune"
    seen_steps = []

    def train(cfg, callbacks=()):
        if cfg.lr < 1e-6:
            orig = callbacks[0]
            callbacks = (lambda step, m: (seen_steps.append(step), orig(step, m)),)
        return fake_train(cfg, callbacks)

    res = tune(
        base_config(lr=BEST_LR),
        out=out,
        trials=3,
        space=parse_space(["lr=log:1e-8:1e-1"]),
        enqueue=[{"lr": BEST_LR * 2}, {"lr": 1e-7}],
        train_fn=train,
    )
    rows = db_rows(out / "study.db", "select number, state from trials order by number")
    assert rows == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "PRUNED")]
    assert seen_steps == [10, 20]
    assert res.n_pruned == 1 and res.best_trial == 0
    assert "PRUNED" in (out / "summary.md").read_text()


def test_failing_trials(tmp_path):
    # A trial whose loss diverges after an evaluation is a hopeless trial (pruned, error kept); the study goes on.
    def diverging(cfg, callbacks=()):
        if cfg.lr > 0.05:
            callbacks[0](10, {"val_loss": 9.0})
            raise ConfigError("the training loss became nan at step 12: lower --lr")
        return fake_train(cfg, callbacks)

    out = tmp_path / "a"
    res = tune(
        base_config(),
        out=out,
        trials=2,
        space=parse_space(["lr=log:1e-4:1e-1"]),
        enqueue=[{"lr": 0.09}],
        train_fn=diverging,
    )
    with sqlite3.connect(out / "study.db") as con:
        rows = con.execute("select number, state from trials order by number").fetchall()
        error = con.execute("select value_json from trial_user_attributes where key = 'error'").fetchall()
    assert rows == [(0, "COMPLETE"), (1, "PRUNED")] and res.n_finished == 2
    assert "loss became nan" in error[0][0]

    # An error before any trial completed (bad data, bad base config) stops the search with that error.
    def broken(cfg, callbacks=()):
        raise ConfigError("--data d: no meta.json")

    with pytest.raises(ConfigError, match="no meta.json"):
        tune(base_config(), out=tmp_path / "b", trials=3, space=parse_space(["lr=log:1e-4:1e-1"]), train_fn=broken)


def test_classify_maximizes_accuracy_with_the_default_space(tmp_path):
    def classify_train(cfg, callbacks=()):
        accuracy = 1.0 - abs(math.log10(cfg.lr / BEST_LR)) / 10  # best at lr=3e-3
        for step in range(cfg.eval_every, cfg.max_steps + 1, cfg.eval_every):
            for cb in callbacks:
                cb(step, {"val_loss": 1 - accuracy, "accuracy": accuracy * step / cfg.max_steps, "macro_f1": 0.5})
        return SimpleNamespace(steps=cfg.max_steps, best_checkpoint=None, best_metric=accuracy)

    out = tmp_path / "clf"
    res = tune(base_config(task="classify"), out=out, trials=4, train_fn=classify_train)
    assert res.metric == "accuracy" and res.direction == "maximize"
    assert set(res.best_params) == {"lr", "batch_size"}  # --max-steps fixes the length: no epochs
    with sqlite3.connect(out / "study.db") as con:
        values = [v for (v,) in con.execute("select value from trial_values")]
    assert res.best_value == pytest.approx(max(values))
    assert "maximize accuracy" in (out / "summary.md").read_text()


def test_importances_degenerate_study_is_a_note(tmp_path):
    out = tmp_path / "tune"
    res = tune(base_config(), out=out, trials=1, space=parse_space(["lr=log:1e-4:1e-2"]), train_fn=fake_train)
    assert (out / "history.png").exists() and not (out / "importances.png").exists()
    assert any("importances" in n for n in res.notes)
    assert "Note: no importances plot" in (out / "summary.md").read_text()


def test_bad_metric_and_mismatched_study(tmp_path):
    with pytest.raises(ConfigError, match="metric 'accuracy' is not among the evaluation's metrics"):
        tune(
            base_config(metric="accuracy"),
            out=tmp_path / "a",
            trials=1,
            space=parse_space(["lr=log:1e-4:1e-2"]),
            train_fn=fake_train,
        )
    # the same study name with another direction is refused with a way out
    tune(base_config(), out=tmp_path / "b", trials=1, space=parse_space(["lr=log:1e-4:1e-2"]), train_fn=fake_train)
    with pytest.raises(ConfigError, match="pass a different --study-name"):
        tune(
            base_config(metric="accuracy"),
            out=tmp_path / "b",
            trials=2,
            space=parse_space(["lr=log:1e-4:1e-2"]),
            train_fn=fake_train,
        )


def test_cli_errors_are_one_line(tmp_path, capsys):
    from owngpt.cli import main

    assert main(["tune", "--data", "d", "--space", "lrr=log:1e-4:1e-2", "--out", str(tmp_path)]) == 2
    assert "did you mean lr" in capsys.readouterr().err
    assert main(["tune", "--data", "d", "--max-steps", "100", "--show-space"]) == 0
    shown = capsys.readouterr().out
    assert "objective: minimize val_loss" in shown and "warmup_steps=int:0:50" in shown


# --- resume after kill -9, parallel processes ----------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys, functools
    sys.path.insert(0, {tests!r})
    from test_tune import fake_train, base_config
    from owngpt.tune import tune, parse_space
    tune(base_config(), out={out!r}, trials={trials}, space=parse_space(["lr=log:1e-5:1e-1", "dropout=float:0:0.3"]),
         storage={storage!r}, study_name="s", heartbeat_interval=1, grace_period=2, pruner="none",
         train_fn=functools.partial(fake_train, delay={delay}))
    """
)


def tune_process(tmp_path: Path, out: Path, storage: str, trials: int, delay: float) -> subprocess.Popen:
    code = SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), trials=trials, storage=storage, delay=delay)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(pred, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def count(db: Path, state: str) -> int:
    if not db.exists():
        return 0
    try:
        return db_rows(db, f"select count(*) from trials where state = '{state}'")[0][0]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return 0


def reported_running(db: Path) -> bool:
    try:
        return bool(
            db_rows(db, "select 1 from trial_intermediate_values join trials using (trial_id) where state = 'RUNNING'")
        )
    except sqlite3.OperationalError:
        return False


def test_resume_after_kill(tmp_path):
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    out = tmp_path / "tune"
    proc = tune_process(tmp_path, out, storage, trials=3, delay=0.4)  # a trial takes 4 evaluations x 0.4 s
    try:
        # kill it in the middle of its second trial (after that trial reported an evaluation)
        wait_for(lambda: count(db, "COMPLETE") >= 1 and reported_running(db))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = db_rows(db, "select number, state from trials where state = 'COMPLETE'")
    value0 = db_rows(db, "select v.value from trial_values v join trials t using (trial_id) where t.number = 0")
    killed = db_rows(db, "select number from trials where state = 'RUNNING'")
    assert first == [(0, "COMPLETE")] and len(killed) == 1
    killed_params = db_rows(
        db,
        f"select param_name, param_value from trial_params join trials using (trial_id) "
        f"where number = {killed[0][0]} order by param_name",
    )

    # Run the same search again: it keeps trial 0, fails the killed trial once its heartbeat is stale, retries its
    # parameters, and stops at 3 finished trials in total.
    res = tune(
        base_config(),
        out=out,
        trials=3,
        space=parse_space(["lr=log:1e-5:1e-1", "dropout=float:0:0.3"]),
        storage=storage,
        study_name="s",
        heartbeat_interval=1,
        grace_period=2,
        pruner="none",
        train_fn=fake_train,
    )
    rows = dict(db_rows(db, "select number, state from trials"))
    assert rows[0] == "COMPLETE" and rows[killed[0][0]] == "FAIL"
    assert list(rows.values()).count("COMPLETE") == 3 and "RUNNING" not in rows.values()
    assert db_rows(db, "select v.value from trial_values v join trials t using (trial_id) where t.number = 0") == value0
    retried = [
        n
        for n in rows
        if n > killed[0][0]
        and db_rows(
            db,
            f"select param_name, param_value from trial_params join trials using (trial_id) "
            f"where number = {n} order by param_name",
        )
        == killed_params
    ]
    assert retried and rows[retried[0]] == "COMPLETE"
    assert res.n_finished == 3


def test_two_processes_share_a_study(tmp_path):
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    out = tmp_path / "tune"
    procs = [tune_process(tmp_path, out, storage, trials=4, delay=0.15) for _ in range(2)]
    logs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    states = [r[0] for r in db_rows(db, "select state from trials")]
    # --trials counts running trials of other processes, so the study stops at 4 (5 if both started the last one
    # in the same instant)
    assert states.count("COMPLETE") in (4, 5) and set(states) == {"COMPLETE"}
    # both processes ran trials, and they did not repeat each other's random start-up points
    assert all("trial " in log for log in logs)
    params = db_rows(db, "select group_concat(param_value) from trial_params group by trial_id")
    assert len(set(params)) == len(params)
    assert (out / "best.yaml").exists()


def test_optunas_plots_leave_matplotlibs_settings_as_they_were(tmp_path):
    """optuna's matplotlib plots switch the process to the ggplot style; the report's plots must not leak it into
    the loss.png and report plots drawn later in the same process."""
    import matplotlib
    import optuna

    from owngpt.tune.report import _plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.optimize(lambda t: (t.suggest_float("lr", 1e-4, 1e-2, log=True) - 1e-3) ** 2, n_trials=4)
    before = dict(matplotlib.rcParams)
    plots = {}
    assert _plots(study, tmp_path, plots, "val_loss") == []
    assert set(plots) == {"history", "importances"} and all(p.stat().st_size > 0 for p in plots.values())
    assert matplotlib.rcParams["axes.facecolor"] == before["axes.facecolor"]  # ggplot's is #E5E5E5
    assert {k: v for k, v in matplotlib.rcParams.items() if before.get(k) != v} == {}
