"""`owngpt tune`: hyperparameter search with Optuna over any training setting (see owngpt.tune)."""

from __future__ import annotations

import argparse

HELP = "hyperparameter search with Optuna"
DESCRIPTION = """Search training settings with Optuna (TPE sampler, median pruner fed by each trial's validation metric).
Each trial is a training run in OUT/trial_NNNN/. The study lives in a database (default OUT/study.db), so a killed
search resumes where it stopped (run the same command again: --trials N counts finished trials of the whole study), and
several terminals running the same command share the work. At the end: OUT/best.yaml (for `owngpt train --config`),
OUT/summary.md and summary.csv, OUT/history.png and OUT/importances.png.

The base config is built like `owngpt train`'s: --config RUN.yaml, then key=value overrides, then flags.
Objective: val_loss (minimized) for lm, chat, mmi; accuracy (maximized) for classify; metric=NAME picks another.

Search space (--space NAME=SPEC ..., or a YAML file with --space-file), over any training setting:
  log:LOW:HIGH        float on a log scale         lr=log:1e-4:3e-3
  float:LOW:HIGH[:STEP]  float                     weight_decay=float:0:0.2  dropout=float:0:0.3
  int:LOW:HIGH[:STEP] integer (logint: log scale)  batch_size=int:4:32  warmup_steps=int:0:200
  cat:A,B,C           one of the values            lora_r=cat:4,8,16  epochs=cat:1,2,3
Default space: lm/chat/mmi: lr (a decade around the base lr), batch_size, warmup_steps, weight_decay, dropout;
classify: lr, batch_size, epochs (when no --max-steps); plus lora_r with lora=true.

examples:
  owngpt tune --data data/shakespeare --model tiny --max-steps 300 --eval-every 50 --trials 10 --out runs/tune
  owngpt tune --config run.yaml --trials 20 --space lr=log:1e-4:3e-3 batch_size=cat:8,16,32
  owngpt tune --config run.yaml --trials 20 --storage sqlite:///study.db --study-name sst2   # in 2 terminals
  owngpt train --config runs/tune/best.yaml --max-steps 5000 --out runs/best"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="training settings for every trial (before --space), e.g. block_size=64 lora=true",
    )
    p.add_argument("--config", default=None, help="a run YAML (as for owngpt train): the base of every trial")
    g = p.add_argument_group("base training settings (as in owngpt train)")
    g.add_argument("--data", default=None, help="a data dir made by `owngpt prepare`")
    g.add_argument("--model", default=None, help="a preset (tiny, mini, small, scratch:gpt2...) or a checkpoint dir")
    g.add_argument("--task", default=None, choices=("lm", "chat", "mmi", "classify"), help="what is trained")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps per trial (the trial budget)")
    g.add_argument("--epochs", type=float, default=None, help="epochs per trial, when --max-steps is not given")
    g.add_argument(
        "--eval-every", type=int, default=None, help="steps between evaluations; each evaluation feeds the pruner"
    )
    g.add_argument("--eval-batches", type=int, default=None, help="batches per evaluation (0 = all of val)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step (unless searched)")
    g.add_argument("--block-size", type=int, default=None, help="tokens per sequence")
    g.add_argument("--lr", type=float, default=None, help="base learning rate (the default space spans lr/10..lr*10)")
    g.add_argument("--seed", type=int, default=None, help="training seed, the same in every trial")
    g.add_argument("--lora", action="store_true", default=None, help="fine-tune with LoRA (adds lora_r to the space)")
    s = p.add_argument_group("search")
    s.add_argument(
        "--trials",
        type=int,
        default=20,
        help="finished (complete or pruned) trials the study should have in total (default 20)",
    )
    s.add_argument(
        "--space",
        nargs="+",
        action="extend",
        default=None,
        metavar="NAME=SPEC",
        help="search dimensions, e.g. lr=log:1e-4:3e-3 batch_size=int:4:32 lora_r=cat:4,8,16",
    )
    s.add_argument(
        "--space-file",
        default=None,
        help="YAML search space: 'space: {lr: log:1e-4:3e-3, ...}' (merged with --space, which wins)",
    )
    s.add_argument(
        "--out", default="runs/tune", help="directory for trial runs, best.yaml, summary and plots (default runs/tune)"
    )
    s.add_argument(
        "--storage",
        default=None,
        help="Optuna database URL (default sqlite:///OUT/study.db); share it to run processes in parallel",
    )
    s.add_argument("--study-name", default=None, help="study name in the database (default: the --out dir's name)")
    s.add_argument(
        "--pruner",
        default="median",
        choices=("median", "none"),
        help="median: stop a trial whose best metric so far is worse than the median of completed trials "
        "at the same step (never at its first evaluation); none: run every trial to the end",
    )
    s.add_argument(
        "--startup-trials", type=int, default=2, help="complete trials before the pruner may prune (default 2)"
    )
    s.add_argument("--sampler-seed", type=int, default=None, help="seed of the TPE sampler (default: --seed)")
    s.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="do not run the base config's own values as the first trial",
    )
    s.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        metavar="SECONDS",
        help="seconds between a running trial's heartbeats; a trial silent for 3x this long (its process "
        "was killed) is marked failed and retried (default 10)",
    )
    s.add_argument("--show-space", action="store_true", help="print the search space and objective, then exit")


def run(args: argparse.Namespace) -> int:
    from owngpt import tune as T
    from owngpt.config import TrainConfig, load_config
    from owngpt.errors import ConfigError

    flags = {
        k: getattr(args, k)
        for k in (
            "data",
            "model",
            "task",
            "max_steps",
            "epochs",
            "eval_every",
            "eval_batches",
            "batch_size",
            "block_size",
            "lr",
            "seed",
            "lora",
        )
    }
    base = load_config(TrainConfig, args.config, args.overrides, flags)
    space = T.load_space_file(args.space_file) if args.space_file else {}
    space.update(T.parse_space(args.space or []))
    if not space:
        space = T.default_space(base)
    metric, direction = T.metric_for(base)
    if args.show_space:
        print(f"objective: {direction} {metric}")
        for name, param in space.items():
            print(f"  {name}={param.describe()}")
        return 0
    if args.heartbeat < 1:
        raise ConfigError(f"--heartbeat {args.heartbeat}: must be at least 1 second")
    result = T.tune(
        base,
        out=args.out,
        trials=args.trials,
        space=space,
        storage=args.storage,
        study_name=args.study_name,
        sampler_seed=args.sampler_seed,
        pruner=args.pruner,
        startup_trials=args.startup_trials,
        baseline=args.baseline,
        heartbeat_interval=args.heartbeat,
        grace_period=3 * args.heartbeat,
        command=T.command_line(),
    )
    return 0 if result.n_complete else 1
