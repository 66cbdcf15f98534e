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

What this module is not: a training loop (that is `owngpt.train`) or a scheduler of processes (run the command in
several terminals for parallelism).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt.config import TrainConfig, _coerce, _field_types
from owngpt.errors import ConfigError, OwnGPTError
from owngpt.outdir import TUNE, check_out, kind_of

# Fields a search must not touch: they say what is trained and where, not how well.
NOT_TUNABLE = ("task", "data", "out", "model", "resume", "overwrite", "extra", "metric")
KINDS = ("float", "log", "int", "logint", "cat")
FINISHED = ("COMPLETE", "PRUNED")
# Metrics where lower is better; every other metric (accuracy, macro_f1, ...) is maximized.
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "bpb", "bits_per_byte", "error")

TrainFn = Callable[..., Any]
MAX_FAILURES = 3  # trials failing in a row (before any evaluation) stop the search


class _TrialFailed(Exception):
    """A trial failed on its own settings (the study goes on; the error is in the trial's user attrs)."""


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a TrainConfig field and the distribution Optuna samples it from."""

    name: str
    kind: str  # float | log | int | logint | cat
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "cat":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind in ("int", "logint"):
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.kind == "logint"
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.kind == "log")

    def contains(self, value: Any) -> bool:
        """Whether `value` (e.g. the base config's) lies in this dimension, so it can be enqueued as a trial."""
        if self.kind == "cat":
            return value in self.choices
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if self.kind in ("int", "logint") and float(value) != int(value):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "cat":
            return "cat:" + ",".join(_fmt(c) for c in self.choices)
        s = f"{self.kind}:{_fmt(self.low)}:{_fmt(self.high)}"
        return s + (f":{_fmt(self.step)}" if self.step else "")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_field(name: str, source: str) -> None:
    names = _field_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; settings are: {', '.join(names)}"
        raise ConfigError(f"{source}: '{name}' is not a training setting{hint}")
    if name in NOT_TUNABLE:
        raise ConfigError(
            f"{source}: '{name}' cannot be searched (it says what is trained, not how); set it with "
            f"--{name.replace('_', '-')} or {name}=VALUE instead"
        )


def _number(text: str, source: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{source}: '{text}' is not a number") from None


def make_param(name: str, spec: Any, source: str) -> Param:
    """Build a Param from `KIND:LOW:HIGH[:STEP]` / `cat:A,B,C`, or from a mapping {type, low, high, step, choices}.

    Values are checked against the field's type (`batch_size=float:...` is refused, categorical values are coerced).
    """
    _check_field(name, source)
    tp = _field_types(TrainConfig)[name]
    if isinstance(spec, Mapping):
        kind = str(spec.get("type", "cat" if "choices" in spec else "float"))
        if kind == "float" and spec.get("log"):
            kind = "log"
        if kind == "int" and spec.get("log"):
            kind = "logint"
        parts = (
            [",".join(str(c) for c in spec.get("choices") or [])]
            if kind == "cat"
            else [str(spec.get("low")), str(spec.get("high"))] + ([str(spec["step"])] if spec.get("step") else [])
        )
    elif isinstance(spec, str):
        kind, _, rest = spec.partition(":")
        parts = rest.split(":") if kind != "cat" else [rest]
    else:
        raise ConfigError(f"{source}: {name}: expected a string like 'log:1e-4:3e-3' or a mapping, got {spec!r}")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ConfigError(
            f"{source}: {name}={spec!r}: the kind must be one of {', '.join(KINDS)} "
            "(e.g. lr=log:1e-4:3e-3 batch_size=int:4:32 dropout=float:0:0.3 lora_r=cat:4,8,16)"
        )
    where = f"{source}: {name}={spec if isinstance(spec, str) else kind}"
    if kind == "cat":
        raw = [c.strip() for c in parts[0].split(",") if c.strip()]
        if not raw:
            raise ConfigError(f"{where}: a categorical dimension needs values, e.g. {name}=cat:4,8,16")
        import yaml

        choices = tuple(_coerce(name, yaml.safe_load(c), tp, where) for c in raw)
        if any(not isinstance(c, (int, float, str, bool, type(None))) for c in choices):
            raise ConfigError(f"{where}: categorical values must be numbers, strings or booleans")
        return Param(name, "cat", choices=tuple(dict.fromkeys(choices)))
    if len(parts) not in (2, 3):
        raise ConfigError(f"{where}: expected {kind}:LOW:HIGH or {kind}:LOW:HIGH:STEP")
    low, high = _number(parts[0], where), _number(parts[1], where)
    step = _number(parts[2], where) if len(parts) == 3 else None
    base_types = {a for a in (getattr(tp, "__args__", None) or (tp,)) if a is not type(None)}
    if kind in ("int", "logint"):
        if int not in base_types and float not in base_types:
            raise ConfigError(f"{where}: '{name}' is not a number setting")
        if not (low.is_integer() and high.is_integer() and (step is None or step.is_integer())):
            raise ConfigError(f"{where}: an int dimension needs whole-number bounds")
    elif float not in base_types:
        hint = f"; use int:{_fmt(low)}:{_fmt(high)}" if int in base_types else ""
        raise ConfigError(f"{where}: '{name}' is not a float setting{hint}")
    if not low < high:
        raise ConfigError(f"{where}: LOW must be below HIGH")
    if kind in ("log", "logint") and low <= 0:
        raise ConfigError(f"{where}: a log-scale dimension needs LOW > 0")
    if step is not None and (step <= 0 or kind in ("log", "logint")):
        raise ConfigError(f"{where}: STEP must be positive and cannot be combined with a log scale")
    return Param(name, kind, low, high, step)


def parse_space(specs: Sequence[str], source: str = "--space") -> dict[str, Param]:
    """Parse `--space` items like `lr=log:1e-4:3e-3`, `batch_size=int:4:32`, `lora_r=cat:4,8,16`."""
    space: dict[str, Param] = {}
    for item in specs:
        name, eq, spec = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or not spec:
            raise ConfigError(f"{source}: '{item}' must look like NAME=KIND:LOW:HIGH (e.g. lr=log:1e-4:3e-3)")
        if ":" not in spec:
            raise ConfigError(
                f"{source}: '{item}' is not a search dimension (KIND:LOW:HIGH with KIND one of {', '.join(KINDS)}); "
                "if it is a fixed setting, put key=value overrides before --space"
            )
        space[name] = make_param(name, spec, source)
    return space


def load_space_file(path: str | Path) -> dict[str, Param]:
    """Read a YAML search space: `space: {lr: "log:1e-4:3e-3", batch_size: {type: int, low: 4, high: 32}}`.

    The top-level `space:` key is optional (a bare mapping of name: spec works too).
    """
    import yaml

    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--space-file {p}: no such file") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise ConfigError(f"{p}{f':{line + 1}' if line is not None else ''}: not valid YAML") from e
    if isinstance(loaded, dict) and set(loaded) == {"space"}:
        loaded = loaded["space"]
    if not isinstance(loaded, dict) or not loaded:
        raise ConfigError(f"{p}: expected a mapping 'space: {{name: spec}}', e.g. space: {{lr: 'log:1e-4:3e-3'}}")
    return {str(k): make_param(str(k), v, str(p)) for k, v in loaded.items()}


def default_space(base: TrainConfig) -> dict[str, Param]:
    """A sensible space for the task when none is given.

    lm/chat/mmi: lr (log, a decade either side of the base lr), batch size, warmup, weight decay, dropout.
    classify: lr, batch size and (when no max_steps fixes the length) epochs. lora_r when LoRA is on.
    """
    lr = base.lr
    space = {
        "lr": Param("lr", "log", lr / 10, lr * 10),
        "batch_size": Param("batch_size", "cat", choices=(4, 8, 16, 32)),
    }
    if base.task == "classify":
        if base.max_steps is None:
            space["epochs"] = Param("epochs", "cat", choices=(1.0, 2.0, 3.0, 4.0, 5.0))
    else:
        # Warmup longer than half the run leaves no time at the peak rate.
        top = 200 if base.max_steps is None else min(200, base.max_steps // 2)
        if top >= 1:
            space["warmup_steps"] = Param("warmup_steps", "int", 0, top)
        space["weight_decay"] = Param("weight_decay", "float", 0.0, 0.2)
        space["dropout"] = Param("dropout", "float", 0.0, 0.3)
    if base.lora:
        space["lora_r"] = Param("lora_r", "cat", choices=(4, 8, 16))
    return space


def metric_for(base: TrainConfig) -> tuple[str, str]:
    """The metric the study optimizes and its direction: val_loss (minimize) or accuracy / macro_f1 (maximize)."""
    metric = base.metric or ("accuracy" if base.task == "classify" else "val_loss")
    direction = "minimize" if any(k in metric.lower() for k in LOWER_IS_BETTER) else "maximize"
    return metric, direction


@dataclass
class TuneResult:
    """What a search produced. `best_*` are None when no trial completed."""

    study_name: str
    storage: str
    metric: str
    direction: str
    n_finished: int
    n_complete: int
    n_pruned: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    best_config: Path | None
    summary: Path
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _optuna():
    from owngpt.errors import require

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
    types_ = _field_types(TrainConfig)
    values = {k: _coerce(k, v, types_[k], "--space") for k, v in params.items()}
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
    log = log or _stderr
    if trials < 1:
        raise ConfigError(f"--trials {trials}: must be at least 1")
    if base.data is None:
        raise ConfigError("no data: pass --data DIR (a dir made by `owngpt prepare`) or set data: in --config")
    if train_fn is None and base.cv:  # objective: the mean over K folds of cross-validation
        from owngpt.cv import cross_validate as train_fn
    if train_fn is None:
        from owngpt.train import train as train_fn
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
        _check_field(name, "--space")
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
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
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
        from owngpt.report import report_after_run

        report_after_run(out / f"trial_{result.best_trial:04d}")
    return result


def _stderr(message: str) -> None:
    """Print a line to stderr without breaking the training loop's progress bar (pruning happens mid-run)."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr, flush=True)


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    study: Any,
    out: Path,
    *,
    metric: str,
    direction: str,
    url: str,
    command: str,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Write OUT/best.yaml, OUT/summary.md, OUT/summary.csv and the PNG plots of a study; print the summary table."""
    import yaml

    log = log or _stderr
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    best = None
    if complete:
        best = study.best_trial
    notes: list[str] = []

    best_path = None
    if best is not None:
        cfg = dict(best.user_attrs.get("config") or {})
        if cfg:
            cfg["out"] = str(out / "best_run")
            cfg["resume"] = False
            cfg["overwrite"] = False
            cfg["extra"] = {
                **(cfg.get("extra") or {}),
                "tune": {"study": study.study_name, "storage": url, "trial": best.number, metric: best.value},
            }
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
            header = (
                f"# Best config of the Optuna study '{study.study_name}' ({url}), found by:\n"
                f"#   {command}\n"
                f"# trial {best.number}: {metric} = {best.value:.6g} ({direction}) with {params}\n"
                f"# {len(complete)} complete and {len(pruned)} pruned trials. The trial budget was max_steps="
                f"{cfg.get('max_steps')}, epochs={cfg.get('epochs')}: raise them for a longer run.\n"
                f"# Train it: owngpt train --config {out / 'best.yaml'}\n"
            )
            best_path = out / "best.yaml"
            _atomic_write(best_path, header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        else:
            notes.append(f"trial {best.number} has no stored config (it was not created by owngpt tune)")

    names = list(dict.fromkeys(k for t in trials for k in t.params))
    header_row = ["trial", "state", metric, *names, "steps", "seconds", "run_dir"]
    rows = []
    for t in trials:
        value = (
            t.value
            if t.value is not None
            else (t.intermediate_values[t.last_step] if t.last_step is not None else None)
        )
        rows.append(
            [
                t.number,
                t.state.name + (" (best)" if best is not None and t.number == best.number else ""),
                "" if value is None else f"{value:.5g}",
                *[_fmt(t.params[k]) if k in t.params else "" for k in names],
                t.user_attrs.get("steps", "" if t.last_step is None else t.last_step),
                t.user_attrs.get("seconds", ""),
                t.user_attrs.get("run_dir", ""),
            ]
        )

    plots: dict[str, Path] = {}
    plots_note = _plots(study, out, plots, metric)
    notes += plots_note

    table = "| " + " | ".join(map(str, header_row)) + " |\n|" + "---|" * len(header_row) + "\n"
    table += "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows)
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    md = [
        f"# Study '{study.study_name}'",
        "",
        f"- storage: `{url}`",
        f"- command: `{command}`",
        f"- objective: {direction} {metric} (a trial's value is its best evaluation; pruned trials show their last)",
        "- trials: " + ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n),
    ]
    if best is not None:
        md.append(
            f"- best: trial {best.number}, {metric} = {best.value:.6g}, "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        )
        if best_path:
            md.append(f"- best config: `{best_path}` (`owngpt train --config {best_path}`)")
    else:
        md.append("- best: none (no trial completed)")
    md += ["", table]
    for name, path in plots.items():
        md.append(f"![{name}]({path.name})")
    md += [f"Note: {n}" for n in notes]
    _atomic_write(out / "summary.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header_row)
    writer.writerows(rows)
    _atomic_write(out / "summary.csv", buf.getvalue())

    print(table, end="")
    if best is not None:
        print(f"best: trial {best.number}, {metric} {best.value:.6g}; config {best_path}")
    for n in notes:
        log(f"note: {n}")
    return TuneResult(
        study_name=study.study_name,
        storage=url,
        metric=metric,
        direction=direction,
        n_finished=len(complete) + len(pruned),
        n_complete=len(complete),
        n_pruned=len(pruned),
        best_value=None if best is None else best.value,
        best_params={} if best is None else dict(best.params),
        best_trial=None if best is None else best.number,
        best_config=best_path,
        summary=out / "summary.md",
        plots=plots,
        notes=notes,
    )


def _plots(study: Any, out: Path, plots: dict[str, Path], metric: str) -> list[str]:
    """Optuna's matplotlib plots: optimization history and parameter importances. Failures become notes."""
    notes: list[str] = []
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return ["no plots: matplotlib is not installed (pip install matplotlib)"]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    jobs = [("history", ovm.plot_optimization_history, 1), ("importances", ovm.plot_param_importances, 2)]
    for name, fn, needed in jobs:
        if len(complete) < needed:
            notes.append(f"no {name} plot: it needs at least {needed} complete trial(s), the study has {len(complete)}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study, target_name=metric)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            path = out / f"{name}.png"
            tmp = out / f".{name}.{os.getpid()}.tmp.png"
            fig.savefig(tmp, dpi=100, format="png")
            plt.close(fig)
            os.replace(tmp, path)
            plots[name] = path
        except Exception as e:  # e.g. importances of a study whose parameters never varied
            notes.append(f"no {name} plot: {type(e).__name__}: {e}")
    return notes


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed, for the header of best.yaml."""
    argv = list(sys.argv if argv is None else argv)
    argv[0] = "owngpt" if argv and Path(argv[0]).name in ("owngpt", "__main__.py", "cli.py") else argv[0]
    return shlex.join(argv)
