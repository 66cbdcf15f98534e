"""`owngpt prune`: magnitude or structured (MLP) pruning of a checkpoint, with an optional recovery fine-tune."""

from __future__ import annotations

import argparse

HELP = "magnitude or structured pruning, optional recovery fine-tune"
DESCRIPTION = """Prune a checkpoint and measure what it costs (size, decode tokens/s, perplexity vs the original).

  unstructured (default)  zero the --sparsity fraction of smallest-magnitude projection weights, over all layers at
                          once (--scope global) or in each matrix (--scope layer); the shape stays dense
  --structured mlp        remove the --sparsity fraction of least important MLP neurons in every block: the model
                          really shrinks (config.json n_inner) and still loads in plain transformers
  --structured heads      not supported with transformers 5 (the command explains why)

--finetune-steps N --data DATA_DIR runs N steps of owngpt's training loop on the pruned model to recover quality
(unstructured zeros are re-applied after it). The output is a checkpoint dir: `owngpt generate OUT` works.

examples:
  owngpt prune runs/shake/checkpoints/best --out pruned/mlp50 --sparsity 0.5 --structured mlp --data data/shake
  owngpt prune runs/shake/checkpoints/best --out pruned/mag30 --sparsity 0.3 --finetune-steps 200 --data data/shake"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the checkpoint dir to prune (e.g. RUN/checkpoints/best)")
    p.add_argument(
        "--out", required=True, help="output checkpoint dir (new, empty, or an earlier export with --overwrite)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is an owngpt checkpoint or export (never a run, a data dir or your own files; "
        "the old one stays whole until the new one is complete)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        required=True,
        help="fraction to remove, between 0 and 1: of the projection weights (unstructured) or of the "
        "MLP neurons (--structured mlp)",
    )
    p.add_argument(
        "--structured",
        choices=["heads", "mlp"],
        default=None,
        help="remove whole MLP neurons (mlp) instead of single weights; heads is refused with the reason",
    )
    p.add_argument(
        "--scope",
        choices=["global", "layer"],
        default="global",
        help="unstructured: one magnitude threshold over all matrices (global, default) or the same "
        "fraction in each matrix (layer)",
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="recovery fine-tune steps with owngpt's training loop (needs --data; default 0 = none)",
    )
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="learning rate of the recovery fine-tune")
    p.add_argument(
        "--finetune-block-size",
        type=int,
        default=None,
        help="tokens per sequence in the recovery fine-tune and perplexity windows (default: the block size the "
        "checkpoint was trained with, from owngpt.json)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="a language-modelling data dir with the checkpoint's tokenizer: fine-tune on its train "
        "split, measure perplexity on its val split",
    )
    p.add_argument("--eval-file", default=None, help="a UTF-8 text file to measure perplexity on (instead of --data)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="score at most this many tokens (default 8192)")
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=32,
        help="tokens per decode-speed run (median of 3, interleaved with the original; 0 skips it)",
    )
    p.add_argument("--no-measure", action="store_true", help="write the pruned checkpoint only; skip measurements")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from owngpt.errors import ConfigError
    from owngpt.measure import format_report
    from owngpt.prune import prune

    if args.eval_tokens < 2 or args.decode_tokens < 0:
        raise ConfigError("--eval-tokens must be at least 2 and --decode-tokens at least 0")
    if args.eval_file and args.data and not args.finetune_steps:
        raise ConfigError("pass --data or --eval-file, not both")
    rep = prune(
        args.checkpoint,
        args.out,
        args.sparsity,
        structured=args.structured,
        scope=args.scope,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
        finetune_block_size=args.finetune_block_size,
        data=args.data,
        eval_file=None if (args.data and not args.finetune_steps) else args.eval_file,
        eval_tokens_max=args.eval_tokens,
        decode_tokens=args.decode_tokens,
        measure_result=not args.no_measure,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    info = rep["pruning"]
    what = (
        f"mlp neurons {info['n_inner']['before']} -> {info['n_inner']['after']}"
        if info.get("structured")
        else (f"{info['prunable_sparsity']:.1%} of projection weights zero ({info['overall_sparsity']:.1%} of all)")
    )
    print(f"pruned {args.checkpoint} -> {args.out}: {what}")
    if "ratios" in rep:
        print(format_report(rep))
    print(f"report: {args.out}/report.json", file=sys.stderr)
    return 0
