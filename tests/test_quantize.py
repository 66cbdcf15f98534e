"""int8 export: format (safetensors, no pickles), loading through checkpoint.load_model, and accuracy vs fp32.

Tolerance (stated in docs/deploy.md): on the tiny random GPT-2 of tests/fixtures.py, int8 logits differ from fp32 by
at most 5% of the largest |logit|, greedy next-token predictions agree on >= 90% of positions, and perplexity moves
by less than 1%.
"""

from __future__ import annotations

import json

import pytest
import torch

import fixtures
from owngpt.checkpoint import load_model
from owngpt.export import export
from owngpt.quantize import quantize_model, quantize_weight


def _ids():
    tok = fixtures.char_tokenizer()
    return torch.tensor([tok.encode(fixtures.TEXT)[:120]])


def _ppl(logits, ids) -> float:
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp().item()


@pytest.fixture(scope="module")
def int8_dir(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    export(tiny_ckpt, out, "int8", measure_result=False)
    return out


def test_quantize_weight_error_bounded():
    w = torch.randn(64, 48)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    # round-to-nearest: every element within half a quantization step of the original
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_int8_dir_format(int8_dir):
    from safetensors import safe_open

    assert not list(int8_dir.glob("*.bin")) and not list(int8_dir.glob("*.pt"))
    meta = json.loads((int8_dir / "owngpt.json").read_text())
    q = meta["quantization"]
    assert q["method"] == "int8-dynamic" and q["tied_embedding"] == "transformer.wte"
    assert "transformer.h.0.attn.c_attn" in q["modules"] and "transformer.h.1.mlp.c_proj" in q["modules"]
    with safe_open(int8_dir / "model.safetensors", "pt") as f:
        w = f.get_tensor("transformer.h.0.attn.c_attn.weight")
        assert w.dtype == torch.int8 and w.shape == (96, 32)  # nn.Linear layout: Conv1D (32, 96) transposed
        assert f.get_tensor("transformer.wte.weight").dtype == torch.int8
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    assert (int8_dir / "tokenizer.json").exists() and (int8_dir / "config.json").exists()


def test_int8_logits_within_tolerance_of_fp32(tiny_ckpt, int8_dir):
    ref, q = load_model(tiny_ckpt).eval(), load_model(int8_dir).eval()
    ids = _ids()
    with torch.no_grad():
        a, b = ref(ids).logits, q(ids).logits
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert abs(_ppl(b, ids) / _ppl(a, ids) - 1) < 0.01
    # the int8 modules are really in place: int8 matmuls on every projection and the tied head
    kinds = {type(m).__name__ for m in q.modules()}
    assert "Conv1D" not in kinds and "_Int8Embedding" in kinds
    assert q.transformer.wte.weight_int8 is not None and q.lm_head.weight().dtype == torch.qint8


def test_int8_saved_equals_in_memory(tiny_ckpt, int8_dir):
    ref = load_model(tiny_ckpt).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(quantize_model(ref)(ids).logits, load_model(int8_dir)(ids).logits)


def test_int8_kv_cache_decode_matches_recompute(int8_dir):
    q = load_model(int8_dir).eval()
    ids = _ids()[:, :20]
    with torch.no_grad():
        out = q.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=1)
        # recompute without cache, one token at a time
        seq = ids
        for _ in range(10):
            nxt = q(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_untied_head_quantized_separately(tmp_path):
    tok = fixtures.char_tokenizer()
    m = fixtures.tiny_gpt2(tok)
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.transformer.wte.weight.detach().clone() * 0.5)
    from owngpt.checkpoint import save_checkpoint
    from owngpt.quantize import save_quantized

    src = save_checkpoint(tmp_path / "untied", m, tok, {"task": "lm"})
    m2 = load_model(src).eval()
    save_quantized(m2, tok, tmp_path / "q", {"task": "lm"})
    info = json.loads((tmp_path / "q" / "owngpt.json").read_text())["quantization"]
    assert info["tied_embedding"] is None and "lm_head" in info["modules"]
    q = load_model(tmp_path / "q").eval()
    ids = _ids()
    with torch.no_grad():
        a, b = m2(ids).logits, q(ids).logits
    assert (a - b).abs().max() <= 0.05 * a.abs().max()


def test_int8_generates_through_cli(int8_dir, capsys):
    from owngpt.cli import main

    assert main(["generate", str(int8_dir), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0"]) == 0


def test_export_refuses_already_quantized(int8_dir, tmp_path):
    from owngpt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="already quantized"):
        export(int8_dir, tmp_path / "x", "int8", measure_result=False)


@pytest.mark.parametrize("shape", [(1, 96), (8, 96), (2, 3, 96)])
def test_int8_linear_equals_the_dequantized_product(shape):
    # Oracle by hand: x @ (q * scale).T + bias in float64. The kernel quantizes x per call to 8 (or, without VNNI,
    # 7) bits over [min(x, 0), max(x, 0)]: each element moves by at most one step, so each output moves by at most
    # step * sum_k |W[o, k]|; the bias passes in fp32. A transposed weight, a wrong scale or a lost bias is far off.
    from owngpt.quantize import _int8_linear, _reduce_range

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(80, 96, generator=g) * 0.05, torch.randn(80, generator=g)
    q, s = quantize_weight(w)
    lin = _int8_linear(q, s, b)
    x = torch.randn(*shape, generator=g) * 3
    want = x.double() @ (q.double() * s.double()[:, None]).t() + b.double()
    levels = 127 if _reduce_range() else 255
    step = float(x.max().clamp(min=0) - x.min().clamp(max=0)) / levels
    bound = step * (q.double() * s.double()[:, None]).abs().sum(1) + 1e-5
    for got in (lin(x), lin.kernel()(x)):
        assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 80)
        assert ((got.double() - want).abs() <= bound).all()
    assert _int8_linear(q, s, None)(x).shape == want.shape


def test_int8_linear_kernel_is_the_module_then_its_post_op():
    # the decode-step contract (owngpt.decode_kernels' PackedLinear.kernel): post(x W^T + b) as a plain callable
    from owngpt.quantize import _int8_linear

    g = torch.Generator().manual_seed(1)
    q, s = quantize_weight(torch.randn(40, 24, generator=g))
    lin = _int8_linear(q, s, torch.randn(40, generator=g))
    x = torch.randn(3, 24, generator=g)
    y = lin(x)
    F = torch.nn.functional
    assert torch.equal(lin.kernel(True)(x), y) and torch.equal(lin.kernel(False)(x[:1]), lin(x[:1]))
    assert torch.equal(lin.kernel(True, ("gelu", "tanh"))(x), F.gelu(y, approximate="tanh"))
    assert torch.equal(lin.kernel(False, ("gelu", "none"))(x), F.gelu(y))
    assert torch.equal(lin.kernel(True, ("swish", ""))(x), F.silu(y))
    with pytest.raises(ValueError, match="post-op"):
        lin.kernel(True, ("relu6", ""))


def test_int8_linear_does_not_saturate_at_full_range():
    # The case fbgemm's 16-bit pair sums (AVX2 without VNNI) would clip: every activation at the top of its range
    # times every weight at +127, so uint8 255 * int8 127 * 2 > 32767. The module quantizes activations to 7 bits
    # exactly when the CPU lacks VNNI (owngpt.quantize._reduce_range), so the sum is right either way.
    from owngpt.quantize import _int8_linear

    q = torch.full((16, 64), 127, dtype=torch.int8)
    s = torch.full((16,), 1 / 127)
    x = torch.ones(1, 64)
    assert torch.allclose(_int8_linear(q, s, None)(x), torch.full((1, 16), 64.0), rtol=1e-3)


def test_save_quantized_never_replaces_a_users_folder(tiny_ckpt, tmp_path):
    """Called from Python with a folder of the user's, the int8 writer refuses and leaves it whole (it replaces only
    an owngpt checkpoint, as the export command does)."""
    from owngpt.errors import OwnGPTError
    from owngpt.quantize import save_quantized

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "diary.txt").write_text("mine")
    model = load_model(tiny_ckpt)
    with pytest.raises(OwnGPTError, match="notes"):
        save_quantized(model, None, folder, {"task": "lm"})
    assert (folder / "diary.txt").read_text() == "mine" and sorted(p.name for p in folder.iterdir()) == ["diary.txt"]
    out = save_quantized(model, None, tmp_path / "int8", {"task": "lm"})
    save_quantized(model, None, out, {"task": "lm"})  # its own output is replaced
    assert (out / "model.safetensors").is_file()
