"""`owngpt estimate`: parameters, memory and expected speed before a run."""

from __future__ import annotations

import argparse

HELP = "parameters, memory and expected speed of a model on this machine"
DESCRIPTION = """Print a model's parameter count, the memory it needs for inference and for training (fp32 and bf16:
weights, gradients, AdamW state, activations) and the training tokens/s to expect on this machine, from a matmul
rate measured now. Estimates, not measurements: real runs print their measured tokens/s.

examples:
  owngpt estimate --model tiny --seq-len 64 --batch-size 12
  owngpt estimate --model gpt2 --seq-len 256 --batch-size 4     # the 124M shape (no weights needed)
  owngpt estimate --model runs/shakespeare/checkpoints/last"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a preset (tiny, mini, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl; llama-tiny, llama-mini, "
        "llama-small, llama-base, llama-medium, llama-large, llama-xl) or a local model dir",
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size for a preset (default 50257, GPT-2's); a data dir's tokenizer may be smaller",
    )
    p.add_argument("--data", default=None, help="a data dir: take the vocabulary size and token count from it")
    p.add_argument("--tokens", type=int, default=None, help="total training tokens, to estimate the run's duration")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from owngpt.errors import ConfigError
    from owngpt.estimate import estimate, format_estimate

    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        raise ConfigError("--batch-size and --seq-len must be at least 1")
    vocab, tokens = args.vocab_size, args.tokens
    if args.data:
        from owngpt.data.datadir import open_data_dir

        d = open_data_dir(args.data)
        vocab = vocab or d.vocab_size
        tokens = tokens or d.split_meta("train").get("tokens")
    e = estimate(args.model, seq_len=args.seq_len, batch_size=args.batch_size, vocab_size=vocab)
    print(json.dumps(e.to_dict(), indent=2) if args.json else format_estimate(e, tokens))
    return 0
