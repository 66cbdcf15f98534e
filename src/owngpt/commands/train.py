"""`owngpt train`: train a model on a prepared data dir (lm, chat, mmi, classify); the loop is owngpt.train."""

from __future__ import annotations

import argparse

from owngpt.device import DEVICE_HELP

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

# (flag, config key, type, help): the common settings as flags; everything else via key=value
_FLAGS = [
    ("--task", "task", str, "lm | chat | mmi | classify (default: the data dir's task)"),
    ("--max-steps", "max_steps", int, "optimizer steps to train (wins over --epochs)"),
    ("--epochs", "epochs", float, "passes over the train split (default 1 when --max-steps is not given)"),
    ("--batch-size", "batch_size", int, "sequences per micro-batch per process"),
    ("--grad-accum", "grad_accum", int, "micro-batches accumulated per optimizer step"),
    ("--lr", "lr", float, "peak learning rate (AdamW's; Muon's is muon_lr)"),
    ("--optimizer", "optimizer", str, "auto (muon from scratch, adamw for a pretrained model) | adamw | muon"),
    ("--block-size", "block_size", int, "tokens per sequence (default: min(model context, 256))"),
    ("--eval-every", "eval_every", int, "steps between evaluations and checkpoints"),
    ("--patience", "patience", int, "evaluations without improvement before stopping early"),
    ("--seed", "seed", int, "random seed (initial weights, batches, dropout)"),
    ("--dropout", "dropout", float, "dropout probability"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--freeze-layers", "freeze_layers", int, "freeze the first N transformer blocks"),
    ("--device", "device", str, DEVICE_HELP),
]
_SWITCHES = [
    ("--resume", "resume", "continue the run in --out from checkpoints/last"),
    ("--overwrite", "overwrite", "replace the owngpt run in --out (kept until the new run has a checkpoint)"),
    ("--lora", "lora", "train a LoRA adapter (peft) instead of all weights"),
    ("--merge-lora", "merge_lora", "LoRA: also write checkpoints/merged"),
    ("--train-on-prompt", "train_on_prompt", "chat/mmi: train on every token, not only the assistant's"),
    ("--freeze-embeddings", "freeze_embeddings", "do not train the token and position embeddings"),
    ("--compile", "compile", "torch.compile the model (slow start, faster steps)"),
    ("--gradient-checkpointing", "gradient_checkpointing", "recompute activations: less memory, slower"),
]


# docs of the settings whose line in config.py has no comment
_MORE_DOCS = {
    "max_steps": "optimizer steps to train (wins over epochs)",
    "epochs": "passes over the train split (default 1 when max_steps is not set)",
    "lr": "peak learning rate (after warmup)",
    "warmup_steps": "steps of linear warmup from ~0 to lr",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "dropout": "dropout probability (a from-scratch model, or overriding a checkpoint's)",
    "seed": "random seed: initial weights, batches, dropout",
    "log_every": "steps between train-loss lines in metrics.jsonl",
    "gradient_checkpointing": "recompute activations in backward: less memory, about 30% slower",
    "freeze_embeddings": "do not train the token and position embeddings",
    "lora": "train a LoRA adapter (peft) instead of all weights",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling numerator (the delta is scaled by alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "resume": "continue the run in out from checkpoints/last",
    "overwrite": "replace an existing run in out",
    "fsdp": "under torchrun: shard parameters, gradients and optimizer state (FSDP) instead of DDP",
}


def _setting_docs() -> str:
    """Every TrainConfig key with its type, default and the comment next to it in config.py."""
    import dataclasses
    import inspect
    import re

    from owngpt.config import TrainConfig

    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)", line)
        if m:
            comments[m.group(1)] = m.group(2)
    lines = ["settings (key=value; the resolved set is saved as RUN/config.yaml):"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = comments.get(f.name) or _MORE_DOCS.get(f.name, "")
        lines.append(f"  {f.name + '=' + str(default):<30} {doc}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = _setting_docs()
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any setting, e.g. lr=3e-4 schedule=linear")
    p.add_argument("--data", default=None, help="a data dir made by `owngpt prepare`")
    p.add_argument("--out", default=None, help="the run dir (checkpoints, metrics, plots, config)")
    p.add_argument(
        "--model",
        default=None,
        help="a preset (tiny, mini, small, scratch:gpt2..., llama-tiny, llama-mini...) or a local Hugging Face "
        "checkpoint dir (default tiny)",
    )
    p.add_argument(
        "--config", default=None, metavar="RUN.yaml", help="settings from a YAML file (e.g. a run's config.yaml)"
    )
    for flag, key, tp, text in _FLAGS:
        p.add_argument(flag, dest=key, type=tp, default=None, help=text)
    for flag, key, text in _SWITCHES:
        p.add_argument(flag, dest=key, action="store_true", default=None, help=text)


def run(args: argparse.Namespace) -> int:
    from owngpt.config import TrainConfig, load_config
    from owngpt.outdir import check_out
    from owngpt.train import train

    keys = ["data", "out", "model"] + [k for _, k, _, _ in _FLAGS] + [k for _, k, _ in _SWITCHES]
    flags = {k: getattr(args, k) for k in keys}
    cfg = load_config(TrainConfig, args.config, args.overrides, flags)
    if cfg.out:  # train checks --data and --model itself; the config file is known only here
        check_out(cfg.out, [("config file (--config)", args.config)], suggest="new")
    if not _task_given(args):
        cfg.task = _data_task(cfg.data) or cfg.task  # default task: the data dir's
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
