"""`owngpt predict`: label texts with a classifier checkpoint, or an ensemble averaging several."""

from __future__ import annotations

import argparse

from owngpt.commands.flags import add_device_argument

HELP = "classify texts with one checkpoint or an ensemble"
DESCRIPTION = """Classify texts with a checkpoint trained by `owngpt train --task classify` (or any Hugging Face
sequence classifier saved as safetensors) and write each text's label and class probabilities.

examples:
  owngpt predict run/checkpoints/best --input reviews.csv > predictions.jsonl
  echo "a gripping, beautiful film" | owngpt predict run/checkpoints/best --input -
  owngpt predict --models runA/checkpoints/best runB/checkpoints/best --input test.csv --format csv --output pred.csv

Input: CSV or TSV with a header (the text is in --text-column), JSONL objects with a "text" field, or plain text
with one text per line; the format is guessed from the extension (or, for stdin, the content) unless
--input-format says. Output: JSONL, one {"text", "label", "probs": {label: p}} per line, or CSV with columns
text,label,p_<label>... Labels are the names the training data used. An ensemble (--models) averages the models'
probabilities; the models must share one label set."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="classifier checkpoint dir (e.g. RUN/checkpoints/best); or use --models",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="CKPT",
        help="several checkpoints whose probabilities are averaged (an ensemble)",
    )
    p.add_argument(
        "--input",
        "-i",
        required=True,
        metavar="FILE|-",
        help="texts to classify: a .csv/.tsv/.jsonl file, a plain text file (one per line), or - for stdin",
    )
    p.add_argument(
        "--input-format",
        default="auto",
        choices=["auto", "csv", "tsv", "jsonl", "lines"],
        help="how to read --input (default: guess from the extension, then the content)",
    )
    p.add_argument(
        "--text-column", default="text", help="the CSV/TSV column (or JSONL field) holding the text (default: text)"
    )
    p.add_argument(
        "--output",
        "-o",
        default=None,
        metavar="FILE",
        help="write predictions here (written aside, then renamed) instead of standard output",
    )
    p.add_argument(
        "--format",
        default="jsonl",
        choices=["jsonl", "csv"],
        help="jsonl: {text, label, probs} per line (default); csv: text,label,p_<label>...",
    )
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from owngpt import atomic
    from owngpt.device import inference_device
    from owngpt.errors import ConfigError
    from owngpt.predict import (
        check_predictions_output,
        ensemble_predict,
        load_classifier,
        read_texts,
        write_predictions,
    )

    ckpts = ([args.checkpoint] if args.checkpoint else []) + list(args.models or [])
    if not ckpts:
        raise ConfigError("pass a checkpoint (owngpt predict CKPT --input F) or --models CKPT1 CKPT2 ...")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if args.output is not None:  # before any work: --output must not replace the texts, a model or your file
        inputs = [("input (--input)", args.input)] + [("checkpoint", c) for c in ckpts]
        check_predictions_output(args.output, inputs)
    texts = read_texts(args.input, args.text_column, args.input_format)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars per model: noise next to our own progress bar
    device = inference_device(args.device)
    classifiers = [load_classifier(c, device=device) for c in ckpts]
    progress = len(texts) > 256 and sys.stderr.isatty()
    labels, probs = ensemble_predict(classifiers, texts, batch_size=args.batch_size, progress=progress)
    if args.output is None:
        write_predictions(sys.stdout, texts, labels, probs, args.format)
        sys.stdout.flush()
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_aside(out, newline="") as f:
        write_predictions(f, texts, labels, probs, args.format)
    print(f"wrote {len(texts)} predictions to {out}", file=sys.stderr)
    return 0
