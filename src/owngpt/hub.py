"""Hugging Face Hub access: download (safetensors only) and cache; a fast, helpful failure offline.

Placeholder until the Hub issue lands: every Hub id fails at once with instructions.
"""

from __future__ import annotations

from pathlib import Path

from owngpt.errors import CheckpointError


def fetch_model(model_id: str, revision: str | None = None) -> Path:
    raise CheckpointError(
        f"'{model_id}' is not a local directory. To use a Hub model, download it on a machine with a network "
        f"(`owngpt download {model_id} --out DIR`), copy DIR here and pass its path; to train from scratch use a "
        "preset such as `tiny` or `scratch:gpt2`.")
