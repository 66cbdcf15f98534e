import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OWNGPT_NO_REPORT", "1")  # train() writes report.html only where a test asks (test_report.py)
# `--device auto` means the CPU in tests, subprocesses included: comparisons with CPU references (bitwise resume,
# textbook loops, greedy texts) then hold on a GPU machine too; tests marked `cuda` ask for cuda by name
os.environ.setdefault("OWNGPT_DEVICE", "cpu")

import fixtures  # noqa: E402

# Property tests are reproducible by default: `derandomize` draws the same examples on every run (a failure in CI is
# a failure on every machine), and no example database carries state between runs. To hunt for new failures, run
# with HYPOTHESIS_PROFILE=explore: random seeds, and 1000 examples where a test does not set its own max_examples
# (a failure prints the blob that reproduces it).
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where torch sees a CUDA GPU (on a CPU machine they are skipped, not failed)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session", autouse=True)
def _native_kernel_built_before_the_tests():
    """owngpt's native decode kernel is compiled the first time a model is packed (owngpt.native_kernels), with one
    line on stderr: build it before any test captures output, so a fresh machine (CI) behaves as a warm one."""
    from owngpt.native_kernels import native_gemv

    native_gemv()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands run in-process may pin torch to one thread (small-model decoding); later tests must not inherit
    that: bitwise-resume tests compare in-process runs with subprocess runs, and thread count changes reductions."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures(...)`): on a
    shared 2-core machine a second thread only adds spin-waiting (about 10x slower for these models)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
