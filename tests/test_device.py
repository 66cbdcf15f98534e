"""Device and precision choice (owngpt.device) with the hardware mocked: what auto picks, what each device gets."""

from __future__ import annotations

import json

import pytest
import torch

from owngpt import device as dev
from owngpt.errors import ConfigError


@pytest.fixture
def machine(monkeypatch):
    """Pretend hardware: set(cuda=N GPUs, bf16=..., mps=..., macos14=...)."""
    state = {"cuda": 0, "bf16": True, "mps": False, "macos14": True}
    monkeypatch.delenv(dev.ENV, raising=False)  # conftest pins the suite to the CPU through it

    def set_(**kw):
        state.update(kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["cuda"] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["cuda"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Mock GPU")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: state["mps"])
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: state["macos14"])
    # configure_matmul writes torch's global flags: record the call instead of touching a CPU build's settings
    calls = []
    monkeypatch.setattr(dev, "configure_matmul", lambda d: calls.append(str(d)))
    set_.matmul_calls = calls
    return set_


def test_auto_prefers_cuda_then_mps_then_cpu(machine):
    machine(cuda=2, mps=True)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # one GPU per torchrun rank
    machine(cuda=0, mps=True)
    assert dev.resolve_device("auto") == torch.device("mps")
    machine(cuda=0, mps=False)
    assert dev.resolve_device("auto") == torch.device("cpu")


def test_owngpt_device_sets_what_auto_means(machine, monkeypatch):
    machine(cuda=2)
    monkeypatch.setenv(dev.ENV, "cpu")
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit device wins
    monkeypatch.setenv(dev.ENV, "cuda:1")
    assert dev.resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv(dev.ENV, "gpu")
    with pytest.raises(ConfigError, match="'gpu'"):
        dev.resolve_device("auto")


def test_explicit_devices_are_checked_against_the_machine(machine):
    machine(cuda=2)
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    assert dev.resolve_device("CUDA:1") == torch.device("cuda", 1)
    assert dev.resolve_device("cpu") == torch.device("cpu")  # cpu even where a GPU is present
    with pytest.raises(ConfigError, match="2 CUDA device"):
        dev.resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="no Apple GPU"):
        dev.resolve_device("mps")
    machine(cuda=0)
    with pytest.raises(ConfigError, match="no CUDA GPU.*--device cpu"):
        dev.resolve_device("cuda")
    for bad in ("gpu", "cuda:", "cuda:x", "tpu", ""):
        with pytest.raises(ConfigError, match="expected one of auto"):
            dev.resolve_device(bad)


def test_precision_per_device(machine):
    cuda, mps, cpu = torch.device("cuda", 0), torch.device("mps"), torch.device("cpu")
    machine(cuda=1, bf16=True)
    assert dev.autocast_dtype(cuda, "auto") is torch.bfloat16
    assert dev.autocast_dtype(cuda, "fp32") is None
    machine(bf16=False)  # a pre-Ampere GPU: fp32 (with TF32 off the table too, but that is the hardware's business)
    assert dev.autocast_dtype(cuda, "auto") is None
    with pytest.raises(ConfigError, match="no bf16 support"):
        dev.autocast_dtype(cuda, "bf16")
    machine(macos14=True)
    assert dev.autocast_dtype(mps, "auto") is torch.bfloat16
    machine(macos14=False)  # MPS bf16 needs macOS 14
    assert dev.autocast_dtype(mps, "auto") is None
    assert dev.autocast_dtype(cpu, "auto") is None  # bf16 is slower than fp32 on a CPU without AMX
    assert dev.autocast_dtype(cpu, "bf16") is torch.bfloat16  # asked for: given
    with pytest.raises(ConfigError, match="precision"):
        dev.autocast_dtype(cpu, "fp16")


def test_choose_sets_tf32_and_describes_the_choice(machine, capsys):
    machine(cuda=1, bf16=True)
    p = dev.choose("auto")
    assert (p.device, p.dtype, p.pin_memory) == (torch.device("cuda", 0), torch.bfloat16, True)
    assert machine.matmul_calls == ["cuda:0"]
    dev.announce(p, "auto")
    assert capsys.readouterr().err == "device: cuda:0 (Mock GPU), bf16 autocast (auto)\n"
    assert dev.choose("cuda", "fp32").describe() == "cuda:0 (Mock GPU), fp32, TF32 matmuls"
    machine(cuda=0, mps=True, macos14=True)
    p = dev.choose("auto")
    assert (p.device.type, p.dtype, p.pin_memory) == ("mps", torch.bfloat16, False)
    machine(mps=False)
    p = dev.choose("auto")
    assert (p.device.type, p.dtype) == ("cpu", None)
    assert p.describe() == "cpu, fp32"
    with p.autocast():  # disabled for fp32: matmuls stay fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32


def test_configure_matmul_turns_tf32_on_for_cuda_only(monkeypatch):
    import types

    fake = types.SimpleNamespace(fp32_precision="ieee")
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    dev.configure_matmul(torch.device("cpu"))
    assert fake.fp32_precision == "ieee"
    dev.configure_matmul(torch.device("cuda", 0))
    assert fake.fp32_precision == "tf32"


def test_inference_device_is_quiet_only_for_auto_on_a_cpu(machine, capsys):
    assert dev.inference_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == ""
    assert dev.inference_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().err == "device: cpu, fp32\n"
    machine(cuda=1)
    assert dev.inference_device(None) == torch.device("cuda", 0)
    assert "device: cuda:0 (Mock GPU), fp32, TF32 matmuls (auto)" in capsys.readouterr().err


def test_every_command_takes_device_and_a_missing_gpu_is_a_clear_error(
    machine, tiny_ckpt, tiny_lm_data, tmp_path, capsys
):
    from owngpt.cli import main

    machine(cuda=0, mps=False)
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n", encoding="utf-8")
    ck = str(tiny_ckpt)
    commands = {
        "train": ["train", "--data", str(tiny_lm_data), "--out", str(tmp_path / "run"), "--model", ck],
        "eval": ["eval", ck, "--data", str(tiny_lm_data)],
        "generate": ["generate", ck, "--prompt", "a", "--max-new-tokens", "2"],
        "chat": ["chat", ck],
        "serve": ["serve", ck, "--port", "0"],
        "predict": ["predict", ck, "--input", str(texts)],
        "export": ["export", ck, "--out", str(tmp_path / "hf"), "--to", "hf"],
    }
    for name, argv in commands.items():
        assert main([*argv, "--device", "cuda"]) == 2, name
        err = capsys.readouterr().err
        assert "error: --device cuda: this torch sees no CUDA GPU" in err, (name, err)
    assert main([*commands["export"][:-2], "--to", "int8", "--device", "mps"]) == 2
    assert "measured on the CPU" in capsys.readouterr().err
    assert main([*commands["generate"], "--device", "cpu", "--temperature", "0"]) == 0
    assert "device: cpu, fp32" in capsys.readouterr().err


@pytest.mark.cuda
def test_training_on_cuda_learns_in_bf16_and_saves_a_cpu_loadable_checkpoint(tiny_lm_data, tiny_ckpt, tmp_path):
    from train_helpers import quick_cfg, weights

    from owngpt.train import train

    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, device="cuda", max_steps=30, eval_every=15))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0]
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in weights(res.last_checkpoint).values())


@pytest.mark.cuda
def test_inference_on_cuda_matches_the_cpu(tiny_ckpt):
    from owngpt.generation import load_for_generation

    cpu = load_for_generation(str(tiny_ckpt), device=torch.device("cpu"))
    gpu = load_for_generation(str(tiny_ckpt), device=dev.inference_device("cuda", quiet=True))
    assert next(gpu.model.parameters()).device.type == "cuda"
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        a = cpu.model(input_ids=ids).logits
        b = gpu.model(input_ids=ids.cuda()).logits.cpu()
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # TF32 matmuls on the GPU
