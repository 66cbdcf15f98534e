"""The study loop of `owngpt tune`: an Optuna study in an SQLite (or any RDB) storage, one training run per trial,
a median pruner fed by every evaluation, heartbeats so that a killed process's trials are retried, and several
processes sharing one study. The end of a search writes the report (owngpt.tune.report).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from owngpt.config import TrainConfig, coerce, field_types
from owngpt.console import say_above_bar
from owngpt.cv import cross_validate
from owngpt.errors import ConfigError, OwnGPTError, require
from owngpt.outdir import TUNE, check_out, kind_of
from owngpt.report import report_after_run
from owngpt.train import train
from owngpt.tune.report import TuneResult, write_report
from owngpt.tune.space import Param, check_field, default_space, format_value, metric_for

FINISHED = ("COMPLETE", "PRUNED")

TrainFn = Callable[..., Any]
MAX_FAILURES = 3  # trials failing in a row (before any evaluation) stop the search


class _TrialFailed(Exception):
    """A trial failed on its own settings (the study goes on; the error is in the trial's user attrs)."""


def _optuna():

    optuna = require("optuna", "tune")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we log trials ourselves
    # Heartbeats, the retry callback and the matplotlib plots are flagged experimental; we rely on them knowingly.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _storage_url(storage: str | None, out: Path) -> str:
    if storage is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    if "://" not in storage:
        raise ConfigError(f"--storage {storage!r}: expected a database URL such as sqlite:///study.db")
    if storage.startswith("sqlite:///"):
        db = Path(storage[len("sqlite:///") :])
        if db.parent and not db.parent.exists():
            db.parent.mkdir(parents=True, exist_ok=True)
    return storage


def _open_storage(url: str, heartbeat_interval: int, grace_period: int | None):
    optuna = _optuna()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes share one SQLite file: wait for the write lock instead of failing at SQLite's 5 s default.
        kwargs["connect_args"] = {"timeout": 120}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
        except Exception as e:  # sqlalchemy's errors vary by backend; the message is what the user needs
            # Processes started together race to create the schema (a UNIQUE error in alembic_version for the
            # loser): the tables exist by the next attempt.
            if attempt == 4:
                raise ConfigError(f"--storage {url}: cannot open the study database ({e})") from e
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def _counts(study: Any, grace_period: int) -> tuple[int, int, int]:
    """(complete, pruned, running) trials of the study, after failing trials whose process stopped beating."""
    import datetime

    optuna = _optuna()
    optuna.storages.fail_stale_trials(study)
    # Optuna only fails a RUNNING trial that has recorded a heartbeat. A process killed between creating the trial
    # and its first heartbeat (while the sampler runs, milliseconds) would leave it RUNNING forever, and block
    # `--trials N`; our objective stores run_dir at once, so a RUNNING trial without it after a long margin is dead.
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0
        if "run_dir" not in t.user_attrs and age > grace_period + 60:
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, RuntimeError):  # another process got there first
                pass
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return states.count("COMPLETE"), states.count("PRUNED"), states.count("RUNNING")


def _sampler(optuna: Any, seed: int, n_existing: int, trials: int):
    # One sampler per trial, seeded by (seed, trials so far): a fresh search is reproducible, and processes sharing a
    # study draw different random start-up points (a single seeded sampler per process would repeat the same ones).
    # TPE's default 10 random start-up trials would leave a 10-trial search without any model-guided trial.
    startup = max(2, min(10, trials // 3))
    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + n_existing) % 2**32, n_startup_trials=startup)


def _pruner(optuna: Any, kind: str, base: TrainConfig, startup_trials: int):
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind != "median":
        raise ConfigError(f"--pruner {kind!r}: expected median or none")
    # Never prune at a trial's first evaluation (at step eval_every, early losses say little): warm-up covers it.
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=base.eval_every + 1)


def trial_config(base: TrainConfig, params: Mapping[str, Any], run_dir: Path, note: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one trial: the base with the sampled values (coerced to the fields' types)."""
    types_ = field_types(TrainConfig)
    values = {k: coerce(k, v, types_[k], "--space") for k, v in params.items()}
    # no report card per trial (each would sample from its model); tune writes the best trial's at the end
    cfg = dataclasses.replace(base, **values, out=str(run_dir), extra={**base.extra, "tune": note}, report=False)
    return cfg.validate()


def tune(
    base: TrainConfig,
    *,
    out: str | Path,
    trials: int,
    space: Mapping[str, Param] | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    sampler_seed: int | None = None,
    pruner: str = "median",
    startup_trials: int = 2,
    baseline: bool = True,
    enqueue: Sequence[Mapping[str, Any]] = (),
    heartbeat_interval: int = 10,
    grace_period: int | None = None,
    command: str | None = None,
    train_fn: TrainFn | None = None,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Run (or resume) a study until it has `trials` finished trials, then write best.yaml, summary and plots.

    `base` is the training config every trial starts from (`out` is ignored: trials go to OUT/trial_NNNN).
    `baseline` enqueues the base config's own values as the study's first trial, so the search is compared with (and
    can never report worse than) the settings you started from. `enqueue` adds further fixed trials (dicts of
    param -> value) on a fresh study. `train_fn` defaults to `owngpt.train.train` (tests inject a fake).
    """
    optuna = _optuna()
    log = log or say_above_bar
    if trials < 1:
        raise ConfigError(f"--trials {trials}: must be at least 1")
    if base.data is None:
        raise ConfigError("no data: pass --data DIR (a dir made by `owngpt prepare`) or set data: in --config")
    if train_fn is None:  # objective: one run, or the mean over K folds of cross-validation
        train_fn = cross_validate if base.cv else train
    out = Path(out)
    check_out(out, [("data dir (--data)", base.data), ("model (--model)", base.model)], suggest="tune")
    if out.is_dir() and any(out.iterdir()) and kind_of(out) != TUNE:  # a study resumes only in its own dir
        raise ConfigError(
            f"--out {out} already exists and is not an owngpt tuning study (no study.db, best.yaml or trial_*): "
            "choose a new --out, or the --out of the study to continue"
        )
    out.mkdir(parents=True, exist_ok=True)
    space = dict(space) if space else default_space(base)
    for name in space:
        check_field(name, "--space")
    metric, direction = metric_for(base)
    url = _storage_url(storage, out)
    name = study_name or out.resolve().name
    seed = base.seed if sampler_seed is None else sampler_seed
    rdb = _open_storage(url, heartbeat_interval, grace_period)
    study = optuna.create_study(
        storage=rdb,
        study_name=name,
        direction=direction,
        sampler=_sampler(optuna, seed, 0, trials),
        pruner=_pruner(optuna, pruner, base, startup_trials),
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study '{name}' in {url} was created to {study.direction.name.lower()} another metric; "
            f"this search would {direction} {metric}: pass a different --study-name"
        )
    space_desc = {k: p.describe() for k, p in space.items()}
    old_space = study.user_attrs.get("space")
    if old_space is None:
        study.set_user_attr("space", space_desc)
        study.set_user_attr("metric", metric)
    elif old_space != space_desc:
        log(f"note: study '{name}' was started with the space {old_space}; this run samples {space_desc}")

    if not study.get_trials(deepcopy=False):
        fixed = list(enqueue)
        if baseline:
            start = {k: getattr(base, k) for k, p in space.items() if p.contains(getattr(base, k))}
            if start:
                fixed.insert(0, start)
        for params in fixed:
            study.enqueue_trial(dict(params), user_attrs={"enqueued": True}, skip_if_exists=True)

    run_tag = command or "owngpt tune"
    last_error: list[str] = []  # set by a trial that failed on its own settings

    def objective(trial: Any) -> float:
        params = {k: p.suggest(trial) for k, p in space.items()}
        run_dir = out / f"trial_{trial.number:04d}"
        note = {"study": name, "storage": url, "trial": trial.number}
        cfg = trial_config(base, params, run_dir, note)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config", _config_dict(cfg))
        shown = ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
        log(f"trial {trial.number}: {shown} -> {run_dir}")
        seen: list[float] = []

        def report(step: int, metrics: Mapping[str, Any]) -> None:
            if metric not in metrics:
                raise ConfigError(
                    f"metric '{metric}' is not among the evaluation's metrics ({', '.join(sorted(metrics))}): "
                    "pass metric=NAME"
                )
            value = float(metrics[metric])
            seen.append(value)
            trial.report(value, int(step))
            if trial.should_prune():
                log(f"trial {trial.number}: pruned at step {step} ({metric} {value:.4g})")
                raise optuna.TrialPruned(f"{metric}={value:.4g} at step {step}")

        started = time.monotonic()
        try:
            result = train_fn(cfg, callbacks=(report,))
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
            raise
        except OwnGPTError as e:
            trial.set_user_attr("error", str(e))
            if seen:
                # It trained and was evaluated, then failed on its own settings (typically a diverged loss at a
                # high lr): a hopeless trial, recorded as pruned so that it counts and TPE learns from its values.
                log(f"trial {trial.number}: stopped: {e}")
                raise optuna.TrialPruned(str(e)) from e
            if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                raise  # nothing ever worked: most likely the base config or the data, the same for every trial
            log(f"trial {trial.number}: failed: {e}")
            last_error.append(str(e))
            raise _TrialFailed(str(e)) from e
        trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
        trial.set_user_attr("steps", getattr(result, "steps", None))
        if getattr(result, "best_checkpoint", None):
            trial.set_user_attr("best_checkpoint", str(result.best_checkpoint))
        values = [v for v in seen if not math.isnan(v)]
        if not values:
            best = getattr(result, "best_metric", None)
            if best is None:
                raise OwnGPTError(
                    f"trial {trial.number} never evaluated: set eval_every (now {cfg.eval_every}) below max_steps"
                )
            return float(best)
        # The trial's value is its best evaluation: the run keeps that checkpoint (checkpoints/best).
        value = min(values) if direction == "minimize" else max(values)
        log(f"trial {trial.number}: {metric} {value:.4g}")
        return value

    announced, failures = False, 0
    while True:
        complete, pruned, running = _counts(study, grace_period or 2 * heartbeat_interval)
        if complete + pruned >= trials:
            break
        if complete + pruned + running >= trials:
            # The remaining trials run in other processes (or belong to a killed process: those are failed once
            # their heartbeat is `grace_period` old, and re-enqueued). Wait, so this process can write the summary.
            if not announced:
                log(f"waiting for {running} running trial(s) of study '{name}' to finish")
                announced = True
            time.sleep(max(1, heartbeat_interval // 2))
            continue
        announced = False
        n_existing = len(study.get_trials(deepcopy=False))
        study.sampler = _sampler(optuna, seed, n_existing, trials)
        last_error.clear()
        study.optimize(objective, n_trials=1, catch=(_TrialFailed,))
        failures = failures + 1 if last_error else 0
        if failures >= MAX_FAILURES:
            raise OwnGPTError(f"{MAX_FAILURES} trials in a row failed, the last with: {last_error[0]}")
    result = write_report(study, out, metric=metric, direction=direction, url=url, command=run_tag, log=log)
    if base.report and not base.cv and result.best_trial is not None:  # the best trial's report card (never fails)
        report_after_run(out / f"trial_{result.best_trial:04d}")
    return result


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
