"""The search-space language of `owngpt tune`: which TrainConfig fields a study may search, how one dimension is
written (`lr=log:1e-4:3e-3`, `batch_size=int:4:32`, `lora_r=cat:4,8,16`, or a YAML mapping), the default space of
a task, and the metric a study optimizes.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owngpt.config import TrainConfig, coerce, field_types
from owngpt.errors import ConfigError

# Fields a search must not touch: they say what is trained and where, not how well.
NOT_TUNABLE = ("task", "data", "out", "model", "resume", "overwrite", "extra", "metric")
KINDS = ("float", "log", "int", "logint", "cat")
# Metrics where lower is better; every other metric (accuracy, macro_f1, ...) is maximized.
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "bpb", "bits_per_byte", "error")


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
            return "cat:" + ",".join(format_value(c) for c in self.choices)
        s = f"{self.kind}:{format_value(self.low)}:{format_value(self.high)}"
        return s + (f":{format_value(self.step)}" if self.step else "")


def format_value(v: Any) -> str:
    """A value as the logs and summaries show it: floats to 4 significant digits."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def check_field(name: str, source: str) -> None:
    """Refuse a name that is no training setting (naming the nearest) or one a search must not touch."""
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
    check_field(name, source)
    tp = field_types(TrainConfig)[name]
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

        choices = tuple(coerce(name, yaml.safe_load(c), tp, where) for c in raw)
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
        hint = f"; use int:{format_value(low)}:{format_value(high)}" if int in base_types else ""
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
