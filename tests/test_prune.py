"""owngpt prune: asked sparsity reached, structured MLP pruning really shrinks and loads in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

import fixtures
from owngpt.checkpoint import load_model
from owngpt.errors import ConfigError
from owngpt.measure import weight_bytes
from owngpt.prune import magnitude_prune, prunable, prune, prune_mlp, sparsity


def _model():
    return fixtures.tiny_gpt2(fixtures.char_tokenizer(), n_layer=2, n_embd=32, n_head=2)


def _ids():
    return torch.tensor([fixtures.char_tokenizer().encode(fixtures.TEXT)[:40]])


@pytest.mark.parametrize("amount", [0.3, 0.7])
def test_global_magnitude_reaches_sparsity(amount):
    m = _model()
    before = {n: mod.weight.detach().clone() for n, mod in prunable(m)}
    magnitude_prune(m, amount, "global")
    s = sparsity(m)
    assert abs(s["prunable_sparsity"] - amount) < 1e-3
    # the zeros are the smallest magnitudes: every surviving weight is >= every pruned one
    kept, gone = [], []
    for n, mod in prunable(m):
        w0 = before[n]
        kept.append(w0[mod.weight != 0].abs())
        gone.append(w0[mod.weight == 0].abs())
    assert torch.cat(kept).min() >= torch.cat(gone).max()
    assert not any(hasattr(mod, "weight_orig") for _, mod in prunable(m))  # made permanent
    assert m.transformer.wte.weight.ne(0).all()  # embeddings (and the tied head) untouched


def test_per_layer_magnitude_prunes_each_matrix():
    m = _model()
    magnitude_prune(m, 0.5, "layer")
    for _, mod in prunable(m):
        assert abs((mod.weight == 0).float().mean().item() - 0.5) < 0.01


def test_mlp_pruning_removing_dead_neurons_keeps_outputs():
    """Oracle: neurons whose output weights are zero contribute nothing, so removing them leaves logits unchanged."""
    m = _model()
    inner = m.transformer.h[0].mlp.c_fc.weight.shape[1]
    with torch.no_grad():
        for block in m.transformer.h:
            block.mlp.c_proj.weight[: inner // 4] = 0  # importance 0 -> the first to go
        want = m(_ids()).logits
    assert prune_mlp(m, 0.25) == inner - inner // 4
    assert m.config.n_inner == inner - inner // 4 and m.transformer.h[1].mlp.c_proj.weight.shape[0] == m.config.n_inner
    with torch.no_grad():
        assert (m(_ids()).logits - want).abs().max() < 1e-5


def test_structured_mlp_checkpoint_is_smaller_and_loads_in_transformers(tiny_ckpt, tiny_lm_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mlp"
    rep = prune(tiny_ckpt, out, 0.5, structured="mlp", data=str(tiny_lm_data), decode_tokens=4, eval_tokens_max=200)
    assert weight_bytes(out) < weight_bytes(tiny_ckpt)
    m = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()  # config.json alone describes it
    assert m.config.n_inner == 64 and m.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)
    assert rep["pruning"]["parameters"]["after"] < rep["pruning"]["parameters"]["before"]
    assert rep["result"]["perplexity"] > 0 and rep["original"]["perplexity"] > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["pruning"]["n_inner"] == {"before": 128, "after": 64}
    assert json.loads((out / "owngpt.json").read_text())["pruning"]["structured"] == "mlp"
    out_ids = m.generate(_ids()[:, :5], max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert out_ids.shape == (1, 10)


def test_unstructured_checkpoint_keeps_sparsity_on_disk(tiny_ckpt, tmp_path):
    out = tmp_path / "mag"
    prune(tiny_ckpt, out, 0.4, measure_result=False)
    m = load_model(out)
    assert abs(sparsity(m)["prunable_sparsity"] - 0.4) < 1e-3


def test_heads_refused_with_reason(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="prune_heads.*n_head x head_dim"):
        prune(tiny_ckpt, tmp_path / "h", 0.5, structured="heads")
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1])
def test_bad_sparsity_refused(tiny_ckpt, tmp_path, bad):
    with pytest.raises(ConfigError, match="--sparsity"):
        prune(tiny_ckpt, tmp_path / "x", bad)


def test_finetune_needs_data(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="--data"):
        prune(tiny_ckpt, tmp_path / "x", 0.5, finetune_steps=5)


def test_recovery_finetune_keeps_unstructured_sparsity(tiny_ckpt, tiny_lm_data, tmp_path):
    pytest.importorskip("owngpt.train")
    out = tmp_path / "ft"
    rep = prune(tiny_ckpt, out, 0.5, finetune_steps=3, data=str(tiny_lm_data), measure_result=False)
    m = load_model(out)
    assert abs(sparsity(m)["prunable_sparsity"] - 0.5) < 1e-3
    assert rep["pruning"]["finetune"]["steps"] == 3
    ref = load_model(tiny_ckpt)
    # the fine-tune really changed the surviving weights
    w, w0 = m.transformer.h[0].attn.c_attn.weight, ref.transformer.h[0].attn.c_attn.weight
    assert not torch.allclose(w[w != 0], w0[w != 0])
