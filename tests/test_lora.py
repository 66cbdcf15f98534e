"""LoRA through peft: an exact no-op at step 0, merged == unmerged, base frozen, adapter saved on its own, resume."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import quick_cfg, weights

from owngpt.checkpoint import load_model
from owngpt.config import TrainConfig
from owngpt.model_init import apply_lora
from owngpt.train import train

IDS = torch.arange(5, 37).unsqueeze(0)


def test_lora_starts_as_an_exact_no_op(tiny_ckpt):
    base = load_model(tiny_ckpt).eval()
    expected = base(IDS).logits
    lora = apply_lora(load_model(tiny_ckpt), TrainConfig(lora=True), "causal_lm").eval()
    torch.testing.assert_close(lora(IDS).logits, expected, rtol=0, atol=0)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_training_merged_equals_unmerged_and_base_is_untouched(tiny_lm_data, tiny_ckpt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = train(
        quick_cfg(
            tiny_lm_data, tmp_path / "run", tiny_ckpt, lora=True, merge_lora=True, lr=3e-2, max_steps=4, eval_every=4
        )
    )
    last = res.last_checkpoint
    assert (last / "adapter" / "adapter_config.json").exists()
    assert (last / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((last / "owngpt.json").read_text())["lora"] is True
    # unmerged: the untouched base + the adapter, as peft applies it
    unmerged = PeftModel.from_pretrained(load_model(tiny_ckpt), last / "adapter").eval()
    # merged: what transformers loads from the checkpoint dir itself (the adapter must not be applied twice)
    merged = AutoModelForCausalLM.from_pretrained(last).eval()
    with torch.no_grad():
        out_u, out_m = unmerged(IDS).logits, merged(IDS).logits
        base = load_model(tiny_ckpt).eval()(IDS).logits
    assert (out_u - base).abs().max() > 1e-3  # the adapter learnt something
    torch.testing.assert_close(out_m, out_u, rtol=1e-5, atol=1e-5)
    merged_dir = tmp_path / "run/checkpoints/merged"
    assert not (merged_dir / "adapter").exists()
    w_last, w_merged = weights(last), weights(merged_dir)
    assert all(torch.equal(w_last[k], w_merged[k]) for k in w_last)


def test_lora_resume_is_exact(tiny_lm_data, tiny_ckpt, tmp_path):
    class Stop(Exception):
        pass

    def stop(step, metrics):
        if step == 2:
            raise Stop

    kw = dict(lora=True, lora_dropout=0.1, max_steps=4, eval_every=2, lr=1e-2)
    a = train(quick_cfg(tiny_lm_data, tmp_path / "a", tiny_ckpt, **kw))
    with pytest.raises(Stop):
        train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, **kw), callbacks=[stop])
    b = train(quick_cfg(tiny_lm_data, tmp_path / "b", tiny_ckpt, resume=True, **kw))
    from safetensors.torch import load_file

    wa = load_file(a.last_checkpoint / "adapter" / "adapter_model.safetensors")
    wb = load_file(b.last_checkpoint / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
