"""`owngpt demo`: prepare the bundled sample, train a small model on the CPU in minutes, print samples."""

from __future__ import annotations

import argparse

HELP = "prepare the bundled sample, train a small model in minutes, sample from it"
DESCRIPTION = """The whole owngpt path on bundled data, offline, in about five minutes on a laptop CPU:
prepare (clean + character tokenizer), train `llama-tiny` (RoPE, RMSNorm, SwiGLU) with Muon on nanoGPT's CPU budget, print samples.
It leaves a data dir and a run dir whose checkpoint `owngpt generate`, `chat` and `serve` take.

examples:
  owngpt demo                      # Tiny Shakespeare
  owngpt demo --corpus tang        # 唐诗三百首, in Chinese
  owngpt demo --max-steps 300      # a one-minute taste"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        default="shakespeare",
        choices=["shakespeare", "tang"],
        help="bundled sample: shakespeare (English) or tang (Chinese poems) (default shakespeare)",
    )
    p.add_argument("--out", default=None, help="where to put data/ and run/ (default runs/demo-CORPUS)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="training steps (default 2000 for shakespeare, 1500 for tang)"
    )
    p.add_argument("--samples", type=int, default=3, help="samples to print at the end (default 3)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=500,
        help="characters per sample (default 500: several times the block the model was trained on; past it the "
        "model reads the last block of text, as nanoGPT samples)",
    )
    p.add_argument("--seed", type=int, default=1337, help="seed for data split, init and sampling")
    p.add_argument("--overwrite", action="store_true", help="prepare the data again even if it exists")


def run(args: argparse.Namespace) -> int:
    from owngpt.demo import run_demo
    from owngpt.errors import ConfigError

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError("--max-steps must be at least 1")
    run_demo(args.corpus, args.out, args.max_steps, args.samples, args.max_new_tokens, args.seed, args.overwrite)
    return 0
