"""`owngpt train`: train a model on a prepared data dir (lm, chat, mmi, classify); the loop is owngpt.train."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import textwrap
import types as types_
import typing
from typing import Any

from owngpt.config import TrainConfig, load_config

HELP = "train a model (lm, chat, mmi, classify) from scratch or a checkpoint"
DESCRIPTION = """Train a model on a data dir made by `owngpt prepare`, from scratch (a preset) or from a local
Hugging Face checkpoint. Settings come from, in increasing priority: defaults < --config RUN.yaml < key=value
overrides < flags. Every setting below can be given as key=value; the common ones also as flags.

The run dir gets config.yaml (the resolved config, itself a valid --config), metrics.jsonl, loss.png, tb/
(TensorBoard) and checkpoints/{last,best}: Hugging Face dirs that transformers loads directly. A run killed at any
moment continues with --resume and ends with the same weights as an uninterrupted run.

examples:
  owngpt train --data data/shakespeare --out runs/shakespeare --model tiny --max-steps 2000
  owngpt train --data data/chat --out runs/chat --model runs/lm/checkpoints/best --task chat lora=true
  owngpt train --config runs/shakespeare/config.yaml --out runs/again lr=3e-4
  owngpt train --data data/shakespeare --out runs/shakespeare --resume
  owngpt train --data data/sst2 --out runs/sst2-cv --task classify cv=5   (5-fold cross-validation)
  torchrun --nproc_per_node 4 -m owngpt train --data data/big --out runs/big --model small   (data parallel)

presets (--model): tiny (4 layers x 128), mini (6 x 192), small (6 x 384), scratch:gpt2 (12 x 768),
scratch:gpt2-medium, scratch:gpt2-large, scratch:gpt2-xl (GPT-2); llama-tiny, llama-mini, llama-small,
llama-base (12 x 768), llama-medium, llama-large, llama-xl (LLaMA-style: rotary positions, RMSNorm, SwiGLU);
or a local checkpoint dir. optimizer=auto trains a preset with Muon (+ AdamW for embeddings, head, norms) and
fine-tunes a checkpoint with AdamW; see docs/training.md."""

# The settings that are also flags, in the order --help lists them; every setting (TrainConfig) is a key=value too.
# Name, type and help come from TrainConfig's field: a bool is a switch (--resume), anything else takes a value of
# the field's type (--max-steps 100). Flags default to None, "not given", so that they override only what they set.
FLAGS = (
    "data",
    "out",
    "model",
    "task",
    "max_steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "optimizer",
    "block_size",
    "eval_every",
    "patience",
    "seed",
    "dropout",
    "warmup_steps",
    "freeze_layers",
    "device",
    "resume",
    "overwrite",
    "lora",
    "merge_lora",
    "train_on_prompt",
    "freeze_embeddings",
    "compile",
    "gradient_checkpointing",
)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _setting_docs() -> str:
    """Every TrainConfig key with its default and its help, for the end of `owngpt train --help`."""
    width = min(max(shutil.get_terminal_size().columns - 2, 60), 118)  # argparse's width, kept readable
    lines = ["settings (key=value; the resolved set is saved as RUN/config.yaml):"]
    for f in dataclasses.fields(TrainConfig):
        head = f"  {f.name + '=' + str(_default(f)):<30} "
        lines.append(textwrap.fill(f.metadata["help"], width, initial_indent=head, subsequent_indent=" " * 33))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = _setting_docs()
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any setting, e.g. lr=3e-4 schedule=linear")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for key in FLAGS:
        f, tp = fields[key], hints[key]
        if typing.get_origin(tp) in (typing.Union, types_.UnionType):  # `int | None`: a value is an int
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        text = f.metadata["help"].replace("%", "%%")  # argparse %-formats flag help
        if _default(f) is not None and _default(f) is not False and "default" not in text:
            text += f" (default {_default(f)})"
        flag = "--" + key.replace("_", "-")
        if tp is bool:
            p.add_argument(flag, dest=key, action="store_true", default=None, help=text)
        else:
            p.add_argument(flag, dest=key, type=tp, default=None, help=text)
        if key == "model":  # where the settings come from, next to where the data and the model do
            p.add_argument(
                "--config",
                default=None,
                metavar="RUN.yaml",
                help="settings from a YAML file (e.g. a run's config.yaml)",
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: defaults < --config RUN.yaml < key=value overrides < flags; the task, when none of them
    names one, is the data dir's."""
    from owngpt.outdir import check_out

    cfg = load_config(TrainConfig, args.config, args.overrides, {k: getattr(args, k) for k in FLAGS})
    if cfg.out:  # train checks --data and --model itself; the config file is known only here
        check_out(cfg.out, [("config file (--config)", args.config)], suggest="new")
    if not _task_given(args):
        cfg.task = _data_task(cfg.data) or cfg.task  # default task: the data dir's
    return cfg


def run(args: argparse.Namespace) -> int:
    from owngpt.train import train

    cfg = config_from_args(args)
    if cfg.cv:  # K-fold cross-validation: K ordinary runs of the same loop (owngpt.cv)
        from owngpt.cv import cross_validate, format_cv

        print(format_cv(cross_validate(cfg)))
        return 0
    train(cfg)
    return 0


def _task_given(args: argparse.Namespace) -> bool:
    """Whether --task, task=... or the config file chose the task."""
    if args.task is not None or any(o.split("=", 1)[0].strip() == "task" for o in args.overrides):
        return True
    if args.config:
        import yaml

        try:
            with open(args.config, encoding="utf-8") as f:
                return "task" in (yaml.safe_load(f) or {})
        except (OSError, yaml.YAMLError, TypeError):
            return False
    return False


def _data_task(data: str | None) -> str | None:
    if not data:
        return None
    from owngpt.data.datadir import open_data_dir

    return open_data_dir(data).task
