"""`atomic_dir`: an export's directory built aside and renamed into place (owngpt.outdir.replacing).

A module of its own, below the format writers (onnx.py, gguf.py), so that they need not import the `owngpt.export`
dispatcher that imports them. owngpt.quantize.save_quantized reaches it as `owngpt.export.atomic_dir`. The
atomic-write module of issue 21 replaces it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from owngpt.outdir import CHECKPOINT, replacing


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary sibling dir renamed to `out_dir` on success (never a half-written output); see datadir.building."""
    with replacing(out_dir, kind=CHECKPOINT, overwrite=overwrite, create=True) as tmp:
        yield tmp
