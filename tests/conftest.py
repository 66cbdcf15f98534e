import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random tiny GPT-2 LM checkpoint (char tokenizer, chat template). Do not modify it in tests."""
    return fixtures.save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_llama_ckpt(tmp_path_factory) -> Path:
    """A random tiny LLaMA-style LM checkpoint (char tokenizer, chat template). Do not modify it in tests."""
    return fixtures.save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_lm_data(tmp_path_factory) -> Path:
    """A small language-modelling data dir in the documented format. Do not modify it in tests."""
    return fixtures.write_lm_data_dir(tmp_path_factory.mktemp("data") / "lm")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands run in-process may pin torch to one thread (small-model decoding); later tests must not inherit
    that: bitwise-resume tests compare in-process runs with subprocess runs, and thread count changes reductions."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
