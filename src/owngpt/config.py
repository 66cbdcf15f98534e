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

from owngpt import atomic
from owngpt.device import DEVICE_HELP, check_spec
from owngpt.errors import ConfigError

# the refusal of optimizer=muon with fsdp=true: TrainConfig.validate gives it, and owngpt.optim for callers that build
# their own config
FSDP_REFUSAL = (
    "optimizer=muon with fsdp=true is not supported: Muon orthogonalises each whole weight matrix, and FSDP gives "
    "each process only a shard of it (gathering every matrix at every step would undo FSDP's saving); use DDP "
    "(fsdp=false) or optimizer=adamw"
)


def setting(default: Any, help: str) -> Any:
    """A settings field and its help, the one place a setting is documented: `owngpt train --help` and its flags are
    generated from it (owngpt.commands.train).

    The help lives in the field's metadata, as transformers' HfArgumentParser keeps it (`field(metadata={"help":
    ...})`), rather than in comments or a docstring parsed from the source (litgpt's jsonargparse reads docstrings):
    metadata is plain data that `dataclasses.fields` returns in any install, with no source to find and no parser
    that could silently drop a line.
    """
    if isinstance(default, (list, dict)):  # a mutable default: a fresh copy per instance
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field's help is shown by `owngpt train --help` (see `setting`)."""

    # what and where
    task: str = setting("lm", "what is trained: lm | chat | mmi | classify (owngpt train's default: the data dir's)")
    data: str | None = setting(None, "a data dir made by `owngpt prepare`")
    out: str | None = setting(None, "the run dir (checkpoints, metrics, plots, config)")
    model: str = setting(
        "tiny",
        "a from-scratch preset (tiny, mini, small, scratch:gpt2..., llama-tiny, llama-mini...) or a local Hugging "
        "Face checkpoint dir",
    )
    # length of training (max_steps wins when both are given)
    max_steps: int | None = setting(None, "optimizer steps to train (wins over epochs)")
    epochs: float | None = setting(None, "passes over the train split (default 1 when max_steps is not set)")
    # batch
    batch_size: int = setting(8, "sequences per micro-batch per process, before gradient accumulation")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step")
    block_size: int | None = setting(None, "tokens per sequence; default min(model context, 256)")
    # optimizer and schedule
    optimizer: str = setting("auto", "auto (muon from scratch, adamw for a pretrained model) | adamw | muon")
    lr: float = setting(
        1e-3,
        "peak learning rate, reached after warmup; with optimizer=muon, that of embeddings, head, norms and biases "
        "(muon_lr is the hidden matrices')",
    )
    min_lr: float | None = setting(None, "floor of the cosine/linear decay; default lr / 10")
    schedule: str = setting("cosine", "cosine | linear | constant")
    warmup_steps: int = setting(100, "steps of linear warmup from ~0 to lr")
    weight_decay: float = setting(0.1, "on 2-D weights (matmuls, embeddings) only; not on biases or norms (nanoGPT)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.99, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 disables clipping")
    muon_lr: float = setting(0.02, "optimizer=muon: peak lr of the hidden matrices, same schedule shape as lr")
    muon_momentum: float = setting(0.95, "optimizer=muon: Nesterov momentum of Muon")
    muon_weight_decay: float = setting(
        0.0, "optimizer=muon: decoupled decay of the hidden matrices (x muon_lr per step)"
    )
    dropout: float = setting(0.0, "dropout probability of a from-scratch model, or overriding a checkpoint's")
    seed: int = setting(1337, "random seed: initial weights, batches, dropout")
    # evaluation, checkpoints, early stopping
    eval_every: int = setting(200, "steps between evaluations, each followed by a checkpoint save")
    eval_batches: int = setting(20, "batches per evaluation (0 = the whole validation split)")
    log_every: int = setting(10, "steps between train-loss lines in metrics.jsonl")
    patience: int | None = setting(None, "evaluations without improvement before stopping early")
    metric: str | None = setting(
        None,
        "what decides checkpoints/best and early stopping: val_loss (lm, chat, mmi) or accuracy / macro_f1 "
        "(classify); default the task's",
    )
    # speed and memory
    compile: bool = setting(False, "torch.compile the model (slow start, faster steps)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, about 30% slower")
    precision: str = setting("auto", "auto (bf16 autocast where the hardware has it, else fp32) | fp32 | bf16")
    device: str = setting("auto", DEVICE_HELP)
    fsdp: bool = setting(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP) instead of DDP")
    # what is trained
    freeze_embeddings: bool = setting(False, "do not train the token and position embeddings")
    freeze_layers: int = setting(0, "freeze the first N transformer blocks")
    freeze_body: bool = setting(False, "classify: train the head only")
    lora: bool = setting(False, "train a LoRA adapter (peft) instead of all weights")
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: int = setting(16, "LoRA scaling numerator (the delta is scaled by alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input")
    lora_targets: list[str] | None = setting(
        None, "LoRA: module names to adapt; default: the attention and MLP projections"
    )
    merge_lora: bool = setting(False, "LoRA: also write checkpoints/merged (the merged model alone)")
    # chat
    train_on_prompt: bool = setting(
        False, "chat: train on every token, not only the assistant's; mmi: on the reply too, not only the history"
    )
    # classify
    class_weights: str | None = setting(
        None, "classify: None, or balanced: each class's loss weighted by n_examples / (n_classes x its count)"
    )
    augment: float = setting(0.0, "classify: probability that a training example is augmented")
    cv: int = setting(0, "classify: K-fold cross-validation of the train split (stratified, seeded); 0 = one run")
    # run control
    resume: bool = setting(False, "continue the run in out (--out) from checkpoints/last")
    overwrite: bool = setting(
        False, "replace the owngpt run in out (--out); it is kept until the new run has a checkpoint"
    )
    report: bool = setting(True, "write report.html and report.md into the run dir at the end (owngpt report)")
    extra: dict[str, Any] = setting({}, "free-form notes saved with the run (e.g. tune trial)")

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


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for a in args:
            try:
                return coerce(key, value, a, source)
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
    types_ = field_types(cls)
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
            values[k] = coerce(k, v, types_[k], str(p))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. lr=3e-4)")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        _check_key(cls, k, "override")
        values[k] = coerce(k, yaml.safe_load(v) if v else v, types_[k], "override")
    for k, v in (flags or {}).items():
        if v is not None:
            _check_key(cls, k, "flag")
            values[k] = coerce(k, v, types_[k], f"--{k.replace('_', '-')}")
    cfg = cls(**values)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def save_config(cfg, path: str | Path, notes: list[str] | None = None) -> None:
    """Write the resolved config as YAML (atomically), readable back by `load_config`.

    `notes` become comment lines in the header (e.g. what `model` resolved to), so they never change the config."""
    import yaml

    data = dataclasses.asdict(cfg)
    with atomic.open_aside(path) as f:
        f.write("# Resolved config of this run. Train again with: owngpt train --config THIS_FILE\n")
        for note in notes or []:
            f.write("# " + " ".join(note.splitlines()) + "\n")
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
