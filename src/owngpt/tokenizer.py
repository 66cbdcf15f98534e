"""Tokenizers: train a byte-level BPE or a char-level tokenizer, load GPT-2's BPE or a checkpoint's tokenizer.

Every tokenizer owngpt builds is a `transformers.PreTrainedTokenizerFast` saved as a Hugging Face tokenizer dir, with
the special tokens of `owngpt.chat_format.SPECIAL_TOKENS` reserved and owngpt's chat template attached.
"""

from __future__ import annotations

import os
from pathlib import Path

from owngpt.errors import CheckpointError


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer dir (a data dir's tokenizer/ or a checkpoint), never running remote code."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no tokenizer directory there")
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{p}: transformers could not load a tokenizer from it: {e}") from e
    return tok
