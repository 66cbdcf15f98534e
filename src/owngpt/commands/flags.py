"""Command-line flags shared by several commands: argparse in, plain typed values out.

Library modules take plain arguments (`owngpt.generation.SamplingParams`, a device string); the flags that set them
live here, with the commands:

- `add_sampling_arguments(parser, defaults)` / `params_from_args(args, ...)`: one flag per SamplingParams field
  (`owngpt generate`, `owngpt chat`), and `unescape` for the backslash escapes a value such as `--stop "\\n"` holds;
- `add_device_argument(parser)`: `--device`, the same in every command that runs a model (owngpt.device decides
  what it means).
"""

from __future__ import annotations

import argparse
from typing import Any

from owngpt.device import DEVICE_HELP
from owngpt.generation import SamplingParams, fit_max_new_tokens


def add_sampling_arguments(parser: argparse.ArgumentParser, defaults: SamplingParams | None = None) -> None:
    """Add one flag per SamplingParams field (argparse); `params_from_args` turns them back into SamplingParams."""
    d = defaults or SamplingParams()
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens to generate at most (default {d.max_new_tokens}); any length: past the model's trained "
        "context the model reads the last tokens (a chat reply ends at the context instead)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        metavar="T",
        help=f"randomness; 0 = greedy, always the most likely token (default {d.temperature})",
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=d.top_k,
        metavar="K",
        help=f"sample only among the K most likely tokens; 0 = no limit (default {d.top_k})",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=d.top_p,
        metavar="P",
        help=f"nucleus sampling: only the most likely tokens whose probabilities add up to P, in (0, 1] "
        f"(default {d.top_p}: no limit)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=d.repetition_penalty,
        metavar="R",
        help="> 1 makes tokens already in the text less likely (CTRL's rule, also right for negative "
        f"logits); 1 = off (default {d.repetition_penalty})",
    )
    g.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=d.no_repeat_ngram_size,
        metavar="N",
        help=f"never repeat any N tokens in a row; 0 = off (default {d.no_repeat_ngram_size})",
    )
    g.add_argument(
        "--num-beams",
        type=int,
        default=d.num_beams,
        metavar="B",
        help="beam search with B beams (with --temperature 0: the most likely sequence it finds); "
        "cannot stream (default 1: off)",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop before this text (repeatable); backslash escapes such as \\n are understood",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        metavar="S",
        help="random seed: the same seed, prompt and settings give the same text (default: random)",
    )


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\\\` in a command-line value -> newline, tab, backslash (other characters untouched)."""
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def params_from_args(
    args: argparse.Namespace, context: int | None = None, default_max_new_tokens: int = 200, **overrides: Any
) -> SamplingParams:
    """SamplingParams from the flags of `add_sampling_arguments`, validated (against `context` when given).

    Without --max-new-tokens the length is `default_max_new_tokens`, or half the context if that is smaller.
    """
    mnt = args.max_new_tokens
    p = SamplingParams(
        max_new_tokens=fit_max_new_tokens(default_max_new_tokens, context) if mnt is None else mnt,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_beams=args.num_beams,
        stop=[unescape(s) for s in (args.stop or [])],
        seed=args.seed,
        **overrides,
    )
    return p.validate(context)


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """The --device flag, the same in every command (train, eval, generate, chat, serve, predict, export)."""
    parser.add_argument("--device", default=default, metavar="DEVICE", help=DEVICE_HELP)
