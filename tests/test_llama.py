"""LLaMA-style presets (transformers' LlamaForCausalLM): checkpoints are transformers' own, and every task and
every export works with them. Oracles: transformers loading the checkpoint alone, its `generate`, and a NumPy
forward pass in llama.cpp's conventions over the GGUF tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import quick_cfg, weights, write_chat_data_dir

import fixtures
from owngpt.checkpoint import load_model
from owngpt.estimate import estimate
from owngpt.export import export
from owngpt.models import PRESETS
from owngpt.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _ids(n=40):
    return torch.tensor([fixtures.char_tokenizer().encode(fixtures.TEXT)[:n]])


def test_llama_preset_checkpoint_gives_transformers_own_logits(tiny_lm_data, tmp_path):
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", "llama-tiny", max_steps=2, block_size=16, batch_size=2))
    config = json.loads((res.last_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (
        config["tie_word_embeddings"] is True
        and config["intermediate_size"] == 344 == PRESETS["llama-tiny"]["intermediate_size"]
    )
    assert "lm_head.weight" not in weights(res.last_checkpoint)  # tied: stored once
    meta = json.loads((res.last_checkpoint / "owngpt.json").read_text())
    assert meta["source"]["preset"]["arch"] == "llama"
    ours = load_model(res.last_checkpoint).eval()(_ids()).logits
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert type(m).__name__ == 'LlamaForCausalLM'\n"
        "ids = torch.tensor([AutoTokenizer.from_pretrained(sys.argv[1]).encode(sys.argv[3])[:40]])\n"
        "torch.save(m(ids).logits, sys.argv[2])\n"
        "assert 'owngpt' not in sys.modules\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(res.last_checkpoint), str(tmp_path / "l.pt"), fixtures.TEXT],
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
        cwd=tmp_path,
    )
    torch.testing.assert_close(ours, torch.load(tmp_path / "l.pt", weights_only=True), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama-tiny", "llama-base"])
def test_llama_preset_parameter_count_equals_transformers(name):
    from transformers import LlamaForCausalLM

    from owngpt.model_init import preset_config

    class Vocab(list):
        eos_token_id, pad_token_id = 0, 1

    cfg = preset_config(PRESETS[name], Vocab(range(50257)), 0.0, {})
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    e = estimate(name, batch_size=1, gflops=100.0)
    assert e.parameters == sum(p.numel() for p in m.parameters()) and e.arch == "llama"


def test_chat_mmi_and_lora_train_a_llama_checkpoint(tmp_path, tiny_llama_ckpt):
    from peft import PeftModel

    data = write_chat_data_dir(tmp_path / "chat-data")
    for task in ("chat", "mmi"):
        r = train(quick_cfg(data, tmp_path / f"{task}-run", tiny_llama_ckpt, task=task, max_steps=2, block_size=48))
        assert r.metrics["val_loss"] > 0
    r = train(
        quick_cfg(data, tmp_path / "lora", tiny_llama_ckpt, task="chat", max_steps=3, block_size=48, lora=True, lr=1e-2)
    )
    adapter = json.loads((r.last_checkpoint / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    # oracle: peft's own unmerged model (base + adapter) gives the merged checkpoint's logits
    base = load_model(tiny_llama_ckpt).eval()
    unmerged = PeftModel.from_pretrained(base, r.last_checkpoint / "adapter").eval()
    merged = load_model(r.last_checkpoint).eval()
    with torch.no_grad():
        a, b = unmerged(_ids()).logits, merged(_ids()).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, load_model(tiny_llama_ckpt).eval()(_ids()).logits, atol=1e-3)  # LoRA trained


def test_classify_from_a_llama_preset(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from owngpt.tasks.classify import classifier_logits

    rows = [("good good", "pos"), ("bad bad", "neg"), ("so good", "pos"), ("so bad", "neg")] * 6
    data = fixtures.write_classify_data_dir(tmp_path / "cls", rows, rows[:8])
    r = train(
        quick_cfg(
            data,
            tmp_path / "run",
            "llama-tiny",
            task="classify",
            max_steps=3,
            block_size=16,
            batch_size=4,
            metric="accuracy",
        )  # fmt: skip
    )
    m = AutoModelForSequenceClassification.from_pretrained(r.last_checkpoint).eval()
    assert type(m).__name__ == "LlamaForSequenceClassification" and m.config.num_labels == 2
    # left padding: positions counted over real tokens give a row its unpadded logits (rotary positions too)
    tok = fixtures.char_tokenizer()
    a, b = tok.encode("so good"), tok.encode("bad")
    pad = tok.pad_token_id
    ids = torch.tensor([a, [pad] * (len(a) - len(b)) + b])
    mask = (ids != pad).long()
    with torch.no_grad():
        both = classifier_logits(m, ids, mask)
        alone = classifier_logits(m, torch.tensor([b]), torch.ones(1, len(b), dtype=torch.long))
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_int8_export_of_llama(tiny_llama_ckpt, tmp_path):
    out = tmp_path / "int8"
    export(tiny_llama_ckpt, out, "int8", measure_result=False)
    q = json.loads((out / "owngpt.json").read_text())["quantization"]
    assert q["tied_embedding"] == "model.embed_tokens" and "model.layers.1.mlp.down_proj" in q["modules"]
    ref, got = load_model(tiny_llama_ckpt).eval(), load_model(out).eval()
    with torch.no_grad():
        a, b = ref(_ids()).logits, got(_ids()).logits
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_structured_mlp_pruning_of_llama_equals_zeroing_the_removed_neurons(tiny_llama_ckpt):
    """Oracle: the pruned model's logits equal the original's with the removed neurons' gate rows zeroed
    (silu(0) = 0 silences a SwiGLU neuron exactly)."""
    from owngpt.prune import prune_mlp

    model, original = load_model(tiny_llama_ckpt).eval(), load_model(tiny_llama_ckpt).eval()
    kept_rows = []
    assert prune_mlp(model, 0.5) == 44 and model.config.intermediate_size == 44
    for layer, orig in zip(model.model.layers, original.model.layers, strict=True):
        kept = [
            int(torch.nonzero((orig.mlp.down_proj.weight.T == col).all(1))[0]) for col in layer.mlp.down_proj.weight.T
        ]
        kept_rows.append(kept)
        dropped = sorted(set(range(88)) - set(kept))
        with torch.no_grad():
            orig.mlp.gate_proj.weight[dropped] = 0
        assert layer.mlp.gate_proj.weight.shape == (44, 32) and layer.mlp.down_proj.weight.shape == (32, 44)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, original(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_onnx_export_of_llama_decodes_like_transformers(tiny_llama_ckpt, tmp_path):
    from owngpt.export.onnx import OnnxLM

    out = tmp_path / "onnx"
    export(tiny_llama_ckpt, out, "onnx", measure_result=False)  # checks |logits - PyTorch| itself
    m = load_model(tiny_llama_ckpt).eval()
    onx = OnnxLM(out / "model.onnx", m.config)
    ids = _ids(6)
    with torch.no_grad():
        want = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=1)[0, 6:].tolist()
    logits, past = onx.step(ids.numpy(), None)
    got = []
    for _ in range(8):
        nxt = logits[:, -1:].argmax(-1)
        got.append(int(nxt[0, 0]))
        logits, past = onx.step(nxt, past)
    assert got == want


def _llama_cpp_forward(t: dict[str, np.ndarray], meta: dict, ids: list[int]) -> np.ndarray:
    """Logits (T, V) of llama.cpp's LLaMA graph, written out in NumPy from the GGUF tensors and metadata: RMSNorm,
    rotary embedding on adjacent pairs (llama.cpp's NORM rope, not transformers' rotate_half), causal attention,
    SwiGLU, output = token_embd when output.weight is absent. It is the oracle for the GGUF's layout, not llama.cpp."""
    f = {k: v.astype(np.float64) for k, v in t.items()}
    eps, heads, base = meta["eps"], meta["heads"], meta["rope_base"]
    x = f["token_embd.weight"][ids]  # (T, C)
    T, C = x.shape
    hd = C // heads
    pos = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None]  # (T, hd/2)
    cos, sin = np.cos(pos), np.sin(pos)

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):  # (T, H, hd): rotate (v[2i], v[2i+1]) by angle pos * theta_i
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    for i in range(meta["layers"]):
        p = f"blk.{i}."
        h = norm(x, f[p + "attn_norm.weight"])
        q = rope((h @ f[p + "attn_q.weight"].T).reshape(T, heads, hd))
        k = rope((h @ f[p + "attn_k.weight"].T).reshape(T, heads, hd))
        v = (h @ f[p + "attn_v.weight"].T).reshape(T, heads, hd)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(T, C)
        x = x + a @ f[p + "attn_output.weight"].T
        h = norm(x, f[p + "ffn_norm.weight"])
        g = h @ f[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ f[p + "ffn_up.weight"].T)) @ f[p + "ffn_down.weight"].T
    head = f.get("output.weight", f["token_embd.weight"])
    return norm(x, f["output_norm.weight"]) @ head.T


def test_gguf_export_of_llama_computes_transformers_logits_in_llama_cpps_layout(tiny_llama_ckpt, tmp_path):
    """Without llama.cpp: the GGUF is read back with gguf's reader and run through _llama_cpp_forward; logits and
    greedy tokens must be transformers'. tests/test_gguf_llamacpp.py runs the file in llama.cpp itself (when
    llama-cpp-python is installed)."""
    from gguf import GGUFReader

    path = tmp_path / "g"
    export(tiny_llama_ckpt, path, "gguf", measure_result=False, gguf_type="f32")
    r = GGUFReader(os.path.join(path, "model.gguf"))

    def field(name):
        return r.fields[name].contents()

    m = load_model(tiny_llama_ckpt).eval()
    cfg = m.config
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 32
    assert field("llama.feed_forward_length") == 88 and field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 16 and field("llama.context_length") == 128
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    assert "output.weight" not in t and len(t) == 1 + 9 * 2 + 1  # tied head: llama.cpp reuses token_embd
    meta = dict(
        eps=field("llama.attention.layer_norm_rms_epsilon"),
        heads=field("llama.attention.head_count"),
        rope_base=field("llama.rope.freq_base"),
        layers=field("llama.block_count"),
    )
    ids = _ids(20)
    with torch.no_grad():
        want = m(ids).logits[0].double().numpy()
    np.testing.assert_allclose(_llama_cpp_forward(t, meta, ids[0].tolist()), want, atol=1e-4)
    # without the q/k permutation the rotary pairs are wrong: the oracle can tell
    t_unpermuted = dict(t)
    sd = m.state_dict()
    for i in range(2):
        t_unpermuted[f"blk.{i}.attn_q.weight"] = sd[f"model.layers.{i}.self_attn.q_proj.weight"].numpy()
        t_unpermuted[f"blk.{i}.attn_k.weight"] = sd[f"model.layers.{i}.self_attn.k_proj.weight"].numpy()
    assert np.abs(_llama_cpp_forward(t_unpermuted, meta, ids[0].tolist()) - want).max() > 1e-3
    # greedy tokens agree with transformers' generate
    with torch.no_grad():
        ref = m.generate(ids[:, :6], max_new_tokens=10, do_sample=False, pad_token_id=1)[0].tolist()
    seq = ids[0, :6].tolist()
    for _ in range(10):
        seq.append(int(_llama_cpp_forward(t, meta, seq)[-1].argmax()))
    assert seq == ref
    assert cfg.tie_word_embeddings


def test_generation_and_server_engine_with_llama(tiny_llama_ckpt):
    from owngpt.generation import SamplingParams, encode_prompt, generate_batch, load_for_generation

    lm = load_for_generation(str(tiny_llama_ckpt))
    ids = encode_prompt(lm.tokenizer, "ROMEO:")
    with torch.no_grad():
        ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=1)
    ref = ref[0, len(ids) :].tolist()
    eos = lm.tokenizer.eos_token_id
    ref = ref[: ref.index(eos)] if eos in ref else ref
    (res,) = generate_batch(lm.model, lm.tokenizer, [ids], SamplingParams(max_new_tokens=20, temperature=0))
    assert res.token_ids == ref
