"""owngpt: train your own GPT on your own data, on a laptop CPU first.

The Python API (documented in the README):

    import owngpt
    m = owngpt.load("runs/shakespeare/checkpoints/last")
    print(m.generate("ROMEO:", max_new_tokens=50))
    for piece in m.generate("ROMEO:", stream=True): ...
    m.chat([{"role": "user", "content": "Hello"}])

Heavy modules (torch, transformers) are imported lazily so that `owngpt --help` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from owngpt.errors import CheckpointError, ConfigError, DataError, MissingExtraError, OwnGPTError
from owngpt.version import __version__

__all__ = ["load", "OwnGPTError", "DataError", "ConfigError", "CheckpointError", "MissingExtraError", "__version__"]

if TYPE_CHECKING:
    from owngpt.api import Model


def load(checkpoint: str, **kwargs: Any) -> Model:
    """Load a checkpoint directory (or anything `--model` accepts) for generation and chat."""
    from owngpt.api import load as _load

    return _load(checkpoint, **kwargs)
