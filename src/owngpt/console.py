"""Lines for the person at the terminal: progress and notes go to stderr (stdout is the command's result), and the
libraries' own warnings are silenced while owngpt works inside them (they are about their internals, not the user).

Used by export, prune and tune; train's `_say` gates the same print on the main process.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator


def say(msg: str) -> None:
    """One line of progress on stderr, flushed at once (a step that takes minutes shows before it starts)."""
    print(msg, file=sys.stderr, flush=True)


def say_above_bar(message: str) -> None:
    """Print a line to stderr without breaking the training loop's progress bar (pruning happens mid-run)."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' and torch's warnings during export/tracing (they are about internals, not the user)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)
