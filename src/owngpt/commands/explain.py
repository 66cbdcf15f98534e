"""`owngpt explain`: an HTML page explaining one text: surprisal and attention (lm), attributions (classify)."""

from __future__ import annotations

import argparse

HELP = "HTML: per-token surprisal and attention (lm), or each token's attribution to the label (classify)"
DESCRIPTION = """Explain what a checkpoint does with one text, as a self-contained HTML page.

  language model: each token coloured by its surprisal (-ln p, nats; the mean is the loss `owngpt eval` gives
                  this text), the attention of one layer/head as a heatmap, and every layer and head at a glance
  classifier:     the predicted label and its probability, and each token's attribution to it by integrated
                  gradients on the token embeddings (Captum: pip install 'owngpt[explain]'); the attributions sum
                  to p(label | text) - p(label | baseline), shown on the page

Chinese and English alike: tokens are shown as the text they stand for (byte-level pieces joined into characters).

examples:
  owngpt explain runs/shakespeare/checkpoints/best --text "ROMEO: But soft, what light" --out romeo.html
  owngpt explain runs/shakespeare/checkpoints/best --text "..." --layer 0 --head 2 --out l0h2.html
  owngpt explain runs/sst2/checkpoints/best --text "a gripping, funny film" --out review.html"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint dir (e.g. RUN/checkpoints/best): a language model or a classifier")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="the text to explain")
    g.add_argument("--text-file", help="read the text from a UTF-8 file")
    p.add_argument("--out", default="explain.html", help="the HTML file to write (default explain.html)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--layer", type=int, default=-1, help="lm: the layer whose attention is drawn (default -1, the last)"
    )
    p.add_argument("--head", type=int, default=0, help="lm: the head whose attention is drawn (default 0)")
    p.add_argument("--steps", type=int, default=64, help="classify: integrated-gradients steps (default 64)")
    p.add_argument("--target", default=None, help="classify: explain this label instead of the predicted one")
    p.add_argument("--lang", default="en", choices=("en", "zh"), help="the page's words in English or Chinese")


def run(args: argparse.Namespace) -> int:
    from owngpt.errors import ConfigError, DataError
    from owngpt.explain import write_explanation

    text = args.text
    if args.text_file:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DataError(f"--text-file {args.text_file}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"--text-file {args.text_file}: not UTF-8 text (byte {e.start})") from e
    if args.steps < 2:
        raise ConfigError("--steps must be at least 2")
    path, r = write_explanation(
        args.checkpoint,
        text,
        args.out,
        layer=args.layer,
        head=args.head,
        n_steps=args.steps,
        target=args.target,
        overwrite=args.overwrite,
        lang=args.lang,
    )
    if r["kind"] == "classify":
        print(f"{r['target']} (p = {r['prob']:.4f})")
    else:
        print(f"mean surprisal {r['mean_surprisal']:.4f} nats/token over {len(r['ids']) - 1} predicted tokens")
    print(path)
    return 0
