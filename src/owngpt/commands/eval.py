"""`owngpt eval`: loss, perplexity and bits per byte; assistant perplexity and distinct-n; accuracy and F1."""

from __future__ import annotations

import argparse

from owngpt.commands.flags import add_device_argument

HELP = "loss/perplexity/bits-per-byte, or accuracy/F1, of a checkpoint"
DESCRIPTION = """Evaluate a checkpoint on held-out data. What is reported depends on the data:

  language-model data dir or plain text file: loss, perplexity, bits per byte (comparable across tokenizers)
  chat data dir:   assistant-token loss and perplexity; distinct-1/2 of answers sampled for validation prompts
                   (with --mmi, also of the answers an MMI model picks among --candidates)
  classify data dir: accuracy, macro-F1, per-class precision and recall, confusion matrix PNG (in --out)

examples:
  owngpt eval runs/shakespeare/checkpoints/best --data data/shakespeare
  owngpt eval runs/shakespeare/checkpoints/best --data some_other_text.txt
  owngpt eval runs/chat/checkpoints/best --data data/chat --mmi runs/mmi/checkpoints/best"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint dir (e.g. RUN/checkpoints/best) or a cached Hub id")
    p.add_argument("--data", required=True, help="a data dir from `owngpt prepare`, or a UTF-8 text file")
    p.add_argument("--split", default="val", help="which split of a data dir (default val)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (a quick look)")
    p.add_argument("--samples", type=int, default=32, help="chat: prompts to sample answers for (0 = none)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="chat: tokens per sampled answer")
    p.add_argument("--mmi", default=None, help="chat: an MMI (backward) checkpoint to rerank sampled answers")
    p.add_argument("--candidates", type=int, default=5, help="chat with --mmi: candidates per prompt (default 5)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default=None, help="where to write eval.json (and a classifier's confusion matrix)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import sys

    from owngpt import atomic
    from owngpt.device import inference_device
    from owngpt.errors import ConfigError
    from owngpt.evaluate import evaluate, format_metrics

    if args.batch_size < 1 or args.samples < 0 or args.candidates < 1:
        raise ConfigError("--batch-size and --candidates must be at least 1, --samples at least 0")
    if args.out and os.path.lexists(args.out) and not os.path.isdir(args.out):  # before the (long) evaluation
        raise ConfigError(
            f"--out {args.out} is a file: choose a directory for eval.json (owngpt never replaces your files)"
        )
    m = evaluate(
        args.checkpoint,
        args.data,
        split=args.split,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        mmi=args.mmi,
        candidates=args.candidates,
        out_dir=args.out,
        progress=sys.stderr.isatty(),
        device=inference_device(args.device),
    )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        atomic.write_text(os.path.join(args.out, "eval.json"), json.dumps(m, ensure_ascii=False, indent=2))
    print(json.dumps(m, ensure_ascii=False, indent=2) if args.json else format_metrics(m))
    return 0
