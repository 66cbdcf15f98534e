"""The `owngpt` command: a thin dispatcher over one module per command.

Each command lives in `owngpt.commands.<name>` and defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int | None`. Command modules import nothing heavy at module level, so `owngpt --help` and
`owngpt CMD --help` are instant; torch and transformers are imported inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from owngpt.errors import OwnGPTError
from owngpt.version import __version__

# command -> (module, one-line summary). The summary is repeated here so that `owngpt --help` imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("owngpt.commands.prepare", "clean raw text/dialogues/labelled data and tokenize it into a data dir"),
    "estimate": ("owngpt.commands.estimate", "parameters, memory and expected speed of a model on this machine"),
    "train": ("owngpt.commands.train", "train a model (lm, chat, mmi, classify) from scratch or a checkpoint"),
    "eval": ("owngpt.commands.eval", "loss/perplexity/bits-per-byte, or accuracy/F1, of a checkpoint"),
    "generate": ("owngpt.commands.generate", "generate text from a checkpoint"),
    "chat": ("owngpt.commands.chat", "talk to a checkpoint in the terminal"),
    "predict": ("owngpt.commands.predict", "classify texts with one checkpoint or an ensemble"),
    "serve": ("owngpt.commands.serve", "OpenAI-compatible HTTP server with a web chat page"),
    "export": ("owngpt.commands.export", "export a checkpoint: hf, int8, onnx, gguf"),
    "prune": ("owngpt.commands.prune", "magnitude or structured pruning, optional recovery fine-tune"),
    "tune": ("owngpt.commands.tune", "hyperparameter search with Optuna"),
    "report": ("owngpt.commands.report", "an HTML + Markdown report of a run (or two side by side)"),
    "explain": ("owngpt.commands.explain", "HTML: per-token surprisal and attention (lm), attributions (classify)"),
    "demo": ("owngpt.commands.demo", "prepare the bundled sample, train a small model in minutes, sample from it"),
    "download": ("owngpt.commands.download", "fetch a checkpoint from the Hugging Face Hub (safetensors only)"),
    "models": ("owngpt.commands.models", "list from-scratch presets and checkpoints on disk"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the `only` command's module is imported (its flags are added)."""
    parser = argparse.ArgumentParser(
        prog="owngpt",
        description="Train your own GPT on your own data. Run `owngpt COMMAND --help` for a command's flags.",
        epilog="Start here: `owngpt demo` trains a small model on Tiny Shakespeare in about five minutes.",
    )
    parser.add_argument("--version", action="version", version=f"owngpt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=summary)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=summary,
            description=getattr(mod, "DESCRIPTION", summary),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
        parser.set_defaults(_subparser=p)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str], command: str | None) -> argparse.Namespace:
    """Parse so that `key=value` overrides may stand anywhere among the flags (`train a=1 --lr 3 b=2`).

    Plain `parse_args` stops collecting a `nargs="*"` positional at the first flag; `parse_intermixed_args` does
    not, but it cannot handle the subparsers action itself, so the command's own parser parses its arguments.
    """
    sub = parser.get_default("_subparser")
    if command is None or sub is None or argv[0] != command:
        return parser.parse_args(argv)
    try:
        args = sub.parse_intermixed_args(argv[1:])
    except TypeError:  # a parser feature intermixed parsing does not support
        return parser.parse_args(argv)
    args.command = command
    return args


def _version() -> str:
    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        command = None  # let argparse report the unknown command
    parser = build_parser(only=command or "")
    args = _parse(parser, argv, command)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    previous = _unwind_on_sigterm()
    try:
        code = args._run(args)
    except OwnGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `owngpt generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(code or 0)


def _unwind_on_sigterm():
    """Make SIGTERM (`kill`, `docker stop`, systemd) unwind like an exception, so that every `finally` runs and
    temporary dirs are removed; Python's default would end the process on the spot. Returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminated)


if __name__ == "__main__":
    raise SystemExit(main())
