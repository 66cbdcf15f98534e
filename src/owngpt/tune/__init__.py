"""Hyperparameter search over `owngpt.train.train` with Optuna: the library behind `owngpt tune`.

A study searches any `TrainConfig` field (learning rate on a log scale, batch size, warmup, weight decay, dropout,
epochs, LoRA rank, ...) with Optuna's TPE sampler. Each trial is an ordinary training run in `OUT/trial_0007/`; its
validation metric, reported after every evaluation, feeds a median pruner that stops hopeless trials early.

The study lives in an Optuna storage (SQLite by default, `OUT/study.db`) with `load_if_exists`, so:
  - a killed search resumes where it stopped: finished trials are kept, and `trials=N` counts the finished (complete
    or pruned) trials of the whole study, so a resumed search runs only the rest;
  - several processes can run the same command against the same database (e.g. one per terminal); each trial
    records a heartbeat, and a trial whose process died (no heartbeat for `grace_period` seconds) is marked FAIL and
    re-enqueued with the same parameters by Optuna's `RetryHeartbeatStaleTrialCallback`.

At the end (of every process that sees the study finished) it writes `OUT/best.yaml` (a config `owngpt train
--config` takes), `OUT/summary.md` + `OUT/summary.csv`, and the plots `OUT/history.png` and `OUT/importances.png`.

What this package is not: a training loop (that is `owngpt.train`) or a scheduler of processes (run the command in
several terminals for parallelism).

The package: owngpt.tune.space (the search-space language and the objective), owngpt.tune.study (the study loop,
`tune(...)`), owngpt.tune.report (best.yaml, the summary and the plots). The names below are its public API.
"""

from __future__ import annotations

from owngpt.tune.report import TuneResult, command_line, write_report
from owngpt.tune.space import (
    KINDS,
    NOT_TUNABLE,
    Param,
    default_space,
    load_space_file,
    make_param,
    metric_for,
    parse_space,
)
from owngpt.tune.study import MAX_FAILURES, trial_config, tune

__all__ = [
    "KINDS",
    "MAX_FAILURES",
    "NOT_TUNABLE",
    "Param",
    "TuneResult",
    "command_line",
    "default_space",
    "load_space_file",
    "make_param",
    "metric_for",
    "parse_space",
    "trial_config",
    "tune",
    "write_report",
]
