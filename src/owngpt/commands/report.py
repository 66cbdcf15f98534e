"""`owngpt report`: the report card of a run (or two side by side) as one self-contained HTML page + Markdown."""

from __future__ import annotations

import argparse

HELP = "an HTML + Markdown report of a run (or two side by side): data, config, curves, metrics, samples"
DESCRIPTION = """Write one self-contained HTML page (no network requests; images inlined) and its Markdown twin about a
training run: the environment, the data (sources, what cleaning dropped and why, split sizes, tokenizer), the
resolved config, loss and metric curves, final and best metrics, speed (tokens/s, wall time, MFU), checkpoint sizes,
and what the model does: samples (lm), a few dialogue turns (chat, also reranked with --mmi), or the confusion
matrix, per-class scores and most confident mistakes (classify). `owngpt train` writes RUN/report.html by itself at
the end of every run (report=false turns that off).

Two runs give the same sections with a column each and the curves overlaid.

examples:
  owngpt report runs/shakespeare
  owngpt report runs/shakespeare --lang zh --out shakespeare.zh.html
  owngpt report runs/lr3e-4 runs/lr1e-3
  owngpt report runs/chat --mmi runs/mmi/checkpoints/best"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run dir (the --out of owngpt train); two to compare")
    p.add_argument(
        "--out", default=None, help="the HTML file (default RUN/report.html; RUN_A/compare_<RUN_B>.html for two)"
    )
    p.add_argument("--lang", default="en", choices=("en", "zh"), help="labels in English or Chinese (default en)")
    p.add_argument("--prompt", action="append", default=None, help="lm: a prompt to sample from (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="lm: tokens per sample (default 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--mmi", default=None, help="chat: an MMI (backward) checkpoint; dialogue turns shown both ways")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (or its .md twin) that owngpt did not write"
    )
    p.add_argument("--no-samples", action="store_true", help="do not load the model (no samples, no confusion matrix)")


def run(args: argparse.Namespace) -> int:
    from owngpt.errors import ConfigError
    from owngpt.report import write_report

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    html_path, md_path = write_report(
        args.runs,
        out=args.out,
        lang=args.lang,
        samples=not args.no_samples,
        prompts=args.prompt,
        mmi=args.mmi,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"{html_path}\n{md_path}")
    return 0
