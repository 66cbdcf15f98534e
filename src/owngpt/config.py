"""Run configuration: a YAML file, then `key=value` overrides and flags, then one dataclass.

Config flows one way: `TrainConfig` defaults < `--config RUN.yaml` < `key=value` overrides < explicit flags. Unknown
keys are rejected with the closest valid names; values are checked against the field's type. The resolved config is
saved as `config.yaml` in the run dir, and that file is itself a valid `--config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt.device import check_spec
from owngpt.errors import ConfigError
from owngpt.optim import FSDP_REFUSAL


@dataclass
class TrainConfig:
    """Everything a training run needs. Field docs are shown by `owngpt train --help`."""

    # what and where
    task: str = "lm"  # lm | chat | mmi | classify
    data: str | None = None  # a data dir made by `owngpt prepare`
    out: str | None = None  # the run dir (checkpoints, metrics, plots, config)
    model: str = "tiny"  # a from-scratch preset (tiny, small, scratch:gpt2, ...) or a local Hugging Face dir
    # length of training (max_steps wins when both are given)
    max_steps: int | None = None
    epochs: float | None = None
    # batch
    batch_size: int = 8  # sequences per optimizer step per process, before gradient accumulation
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    block_size: int | None = None  # tokens per sequence; default min(model context, 256)
    # optimizer and schedule
    optimizer: str = "auto"  # auto (muon from scratch, adamw for a pretrained model) | adamw | muon
    lr: float = 1e-3  # AdamW's peak lr (with optimizer=muon: for embeddings, head, norms and biases)
    min_lr: float | None = None  # floor of the cosine/linear decay; default lr / 10
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on 2-D weights (matmuls, embeddings) only; not on biases or norms (nanoGPT)
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    muon_lr: float = 0.02  # optimizer=muon: peak lr of the hidden matrices, same schedule shape as lr
    muon_momentum: float = 0.95  # optimizer=muon: Nesterov momentum of Muon
    muon_weight_decay: float = 0.0  # optimizer=muon: decoupled decay of the hidden matrices (x muon_lr per step)
    dropout: float = 0.0
    seed: int = 1337
    # evaluation, checkpoints, early stopping
    eval_every: int = 200  # steps between evaluations (and checkpoints)
    eval_batches: int = 20  # batches per evaluation (0 = the whole validation split)
    log_every: int = 10
    patience: int | None = None  # evaluations without improvement before stopping early
    metric: str | None = None  # early-stopping metric: val_loss (lm, chat, mmi) or accuracy / macro_f1 (classify)
    # speed and memory
    compile: bool = False  # torch.compile the model
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 autocast where the hardware has it, else fp32) | fp32 | bf16
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP) instead of DDP
    # what is trained
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # freeze the first N transformer blocks
    freeze_body: bool = False  # classify: train the head only
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # module names; default: the attention and MLP projections
    merge_lora: bool = False  # also save the merged model
    # chat
    train_on_prompt: bool = False  # chat: train on every token, not only the assistant's
    # classify
    class_weights: str | None = None  # None | balanced
    augment: float = 0.0  # classify: probability that a training example is augmented
    cv: int = 0  # classify: K-fold cross-validation of the train split (stratified, seeded); 0 = one run
    # run control
    resume: bool = False
    overwrite: bool = False
    report: bool = True  # write report.html and report.md into the run dir at the end (owngpt report)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run (e.g. tune trial)

    def validate(self) -> TrainConfig:
        choices = {
            "task": ("lm", "chat", "mmi", "classify"),
            "schedule": ("cosine", "linear", "constant"),
            "precision": ("auto", "fp32", "bf16"),
            "optimizer": ("auto", "adamw", "muon"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        for f in dataclasses.fields(self):  # nan passes every `x <= 0` test and fails deep inside torch
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name}={v}: must be a finite number")
        self.device = check_spec(self.device)
        positive = ("batch_size", "grad_accum", "eval_every", "log_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.muon_lr <= 0:
            raise ConfigError(f"muon_lr={self.muon_lr} must be positive")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError(FSDP_REFUSAL)
        if self.optimizer == "muon" and self.lora:
            raise ConfigError(
                "optimizer=muon with lora=true is not supported: LoRA's rank-r factors are not the full hidden "
                "matrices Muon orthogonalises; use optimizer=adamw (the default for fine-tuning)"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} must be at least 1")
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError(f"block_size={self.block_size} must be at least 2")
        if self.cv < 0 or self.cv == 1:
            raise ConfigError(f"cv={self.cv}: cross-validation takes cv=K with K >= 2 (0 = off)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        return self


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(key, value, a, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list):
            return [str(v) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{source}: {key}={value!r} is not a valid {getattr(tp, '__name__', tp)}")


def _check_key(cls, key: str, source: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        near = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(names)}"
        raise ConfigError(f"{source}: unknown setting '{key}'{hint}")


def load_config(
    cls=TrainConfig,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
):
    """Build `cls` from defaults, a YAML file, `key=value` overrides and flags (None flags are ignored)."""
    import yaml

    values: dict[str, Any] = {}
    types_ = _field_types(cls)
    if config_file:
        p = Path(config_file)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"--config {p}: no such file") from e
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f"{p}:{line + 1}" if line is not None else str(p)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a config file must be a mapping of setting: value")
        for k, v in loaded.items():
            _check_key(cls, k, str(p))
            values[k] = _coerce(k, v, types_[k], str(p))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. lr=3e-4)")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        _check_key(cls, k, "override")
        values[k] = _coerce(k, yaml.safe_load(v) if v else v, types_[k], "override")
    for k, v in (flags or {}).items():
        if v is not None:
            _check_key(cls, k, "flag")
            values[k] = _coerce(k, v, types_[k], f"--{k.replace('_', '-')}")
    cfg = cls(**values)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def save_config(cfg, path: str | Path, notes: list[str] | None = None) -> None:
    """Write the resolved config as YAML (atomically), readable back by `load_config`.

    `notes` become comment lines in the header (e.g. what `model` resolved to), so they never change the config."""
    import yaml

    from owngpt import atomic

    data = dataclasses.asdict(cfg)
    with atomic.open_aside(path) as f:
        f.write("# Resolved config of this run. Train again with: owngpt train --config THIS_FILE\n")
        for note in notes or []:
            f.write("# " + " ".join(note.splitlines()) + "\n")
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
