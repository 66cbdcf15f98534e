import json
import subprocess
import sys

import pytest

from owngpt.estimate import estimate, gpt2_parameters
from owngpt.models import PRESETS


@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_preset_parameter_count_equals_transformers(name):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = PRESETS[name]
    with torch.device("meta"):
        m = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **shape))
    assert estimate(name, batch_size=1, gflops=100.0).parameters == sum(p.numel() for p in m.parameters())
    assert gpt2_parameters(12, 768, 50257, 1024) == 124_439_808  # GPT-2 small, as published


def test_local_checkpoint_is_counted_exactly(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    e = estimate(str(tiny_ckpt), seq_len=32, batch_size=2, gflops=100.0)
    assert e.kind == "local" and e.parameters == sum(p.numel() for p in m.parameters())


def test_memory_and_time_scale_with_the_run():
    small = estimate("tiny", seq_len=64, batch_size=4, vocab_size=65, gflops=100.0)
    big = estimate("tiny", seq_len=64, batch_size=16, vocab_size=65, gflops=100.0)
    assert big.train_fp32_bytes > small.train_fp32_bytes > 16 * small.parameters
    assert small.inference_bf16_bytes < small.inference_fp32_bytes < small.train_fp32_bytes
    # same model, same FLOPs per token: tokens/s depends only on the measured rate
    assert small.train_tokens_per_s == pytest.approx(big.train_tokens_per_s)
    assert estimate("gpt2", seq_len=256, batch_size=4, gflops=100.0).train_tokens_per_s < small.train_tokens_per_s


def test_cli_prints_json_and_rejects_unknown_models(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "owngpt",
            "estimate",
            "--model",
            "tiny",
            "--seq-len",
            "64",
            "--batch-size",
            "12",
            "--vocab-size",
            "65",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["parameters"] == gpt2_parameters(4, 128, 65, 256) and d["measured_gflops"] > 0
    bad = subprocess.run(
        [sys.executable, "-m", "owngpt", "estimate", "--model", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "nope" in bad.stderr
