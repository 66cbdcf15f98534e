"""owngpt export: hf (loads in plain transformers, LoRA merged), onnx (KV cache, logits vs PyTorch), gguf (read back)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fixtures
from owngpt.checkpoint import load_model
from owngpt.errors import CheckpointError
from owngpt.export import export
from owngpt.export.onnx import ONNX_TOLERANCE
from owngpt.measure import weight_bytes


def _ids(n=24):
    return torch.tensor([fixtures.char_tokenizer().encode(fixtures.TEXT)[:n]])


def test_hf_export_loads_in_transformers(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    export(tiny_ckpt, out, "hf", measure_result=False)
    m = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    ref = load_model(tiny_ckpt).eval()
    with torch.no_grad():
        assert torch.equal(m(_ids()).logits, ref(_ids()).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert json.loads((out / "config.json").read_text())["n_ctx"] == m.config.n_positions  # llama.cpp's converter
    assert m.generate(_ids(4), max_new_tokens=3, do_sample=False, pad_token_id=1).shape == (1, 7)


def test_hf_export_merges_peft_adapter(tiny_ckpt, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_ckpt).eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    with torch.no_grad():  # make the adapter do something (B is zero-initialised)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_ckpt)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(_ids()).logits
    export(adapter, tmp_path / "merged", "hf", measure_result=False)
    got = load_model(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        assert (got(_ids()).logits - want).abs().max() < 1e-4


@pytest.fixture(scope="module")
def onnx_dir(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "onnx"
    export(tiny_ckpt, out, "onnx", measure_result=False)
    return out


def test_onnx_prompt_then_decode_step_match_pytorch(tiny_ckpt, onnx_dir):
    import onnxruntime as ort

    m = load_model(tiny_ckpt).eval()
    cfg = m.config
    hd = cfg.n_embd // cfg.n_head
    sess = ort.InferenceSession(str(onnx_dir / "model.onnx"))
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in sess.get_outputs()][:2] == ["logits", "present.0.key"]
    ids = _ids(8).numpy()
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(8)[None]}
    feed.update({n: np.zeros((1, cfg.n_head, 0, hd), np.float32) for n in names[3:]})
    out = sess.run(None, feed)
    with torch.no_grad():
        ref = m(torch.from_numpy(ids), use_cache=True)
    assert np.abs(out[0] - ref.logits.numpy()).max() < ONNX_TOLERANCE
    # one decode step with the returned past vs PyTorch with its cache
    nxt = np.array([[5]])
    feed = {"input_ids": nxt, "attention_mask": np.ones((1, 9), np.int64), "position_ids": np.array([[8]])}
    feed.update(dict(zip(names[3:], out[1:])))
    out2 = sess.run(None, feed)
    with torch.no_grad():
        ref2 = m(torch.from_numpy(nxt), past_key_values=ref.past_key_values, use_cache=True)
    assert np.abs(out2[0] - ref2.logits.numpy()).max() < ONNX_TOLERANCE
    assert out2[1].shape == (1, cfg.n_head, 9, hd)


def test_onnx_greedy_generation_matches_transformers(tiny_ckpt, onnx_dir):
    from owngpt.export.onnx import OnnxLM

    m = load_model(tiny_ckpt).eval()
    onx = OnnxLM(onnx_dir / "model.onnx", m.config)
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
    meta = json.loads((onnx_dir / "owngpt.json").read_text())
    assert max(meta["onnx"]["max_abs_logit_error"].values()) < ONNX_TOLERANCE


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_round_trips_through_reader(tiny_ckpt, tmp_path, dtype):
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
    from gguf.quants import dequantize

    from owngpt.export.gguf import export_gguf
    from owngpt.measure import load_fp32

    m, tok, _, _ = load_fp32(tiny_ckpt)
    path = export_gguf(m, tok, tmp_path / "g", dtype=dtype)
    r = GGUFReader(path)

    def field(name):
        f = r.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[-1]

    assert field("general.architecture") == "gpt2"
    cfg = m.config
    assert field("gpt2.block_count") == cfg.n_layer and field("gpt2.embedding_length") == cfg.n_embd
    assert field("gpt2.context_length") == cfg.n_positions and field("gpt2.attention.head_count") == cfg.n_head
    assert field("gpt2.feed_forward_length") == 4 * cfg.n_embd
    # a char vocabulary is written for llama.cpp's SentencePiece tokenizer (see test_gguf_char_vocab_...)
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.add_space_prefix") is False
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[tok.eos_token_id] == "<|endoftext|>"
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert "tokenizer.ggml.merges" not in r.fields and len(field("tokenizer.ggml.scores")) == len(tokens)
    assert field("general.file_type") == {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}.get(
        dtype, LlamaFileType.MOSTLY_Q8_0
    )
    types = {x.name: x.tensor_type for x in r.tensors}
    t = {x.name: dequantize(x.data, x.tensor_type) for x in r.tensors}
    # llama.cpp's GPT-2 graph refuses a file without output.weight: the tied embedding is written again
    assert len(t) == 2 + 12 * cfg.n_layer + 2 + 1
    assert np.array_equal(t["output.weight"], t["token_embd.weight"])
    matrix = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16}.get(dtype, GGMLQuantizationType.Q8_0)
    # llama.cpp's converter: 1-D tensors, norms and the position table f32, every other matrix the file's type
    assert types["position_embd.weight"] == types["blk.0.attn_norm.bias"] == GGMLQuantizationType.F32
    assert types["token_embd.weight"] == types["output.weight"] == types["blk.1.ffn_up.weight"] == matrix
    # q8_0: each block of 32 is rounded to 1/127 of its largest |weight| (0.02-scaled init: about 3e-4)
    tol = {"f32": 0, "f16": 1e-3}.get(dtype, 2e-3)
    sd = m.state_dict()
    checks = {
        "token_embd.weight": sd["transformer.wte.weight"],
        "position_embd.weight": sd["transformer.wpe.weight"],
        "blk.1.attn_qkv.weight": sd["transformer.h.1.attn.c_attn.weight"].t(),  # Conv1D transposed
        "blk.0.ffn_down.weight": sd["transformer.h.0.mlp.c_proj.weight"].t(),
        "blk.0.attn_norm.bias": sd["transformer.h.0.ln_1.bias"],
        "output_norm.weight": sd["transformer.ln_f.weight"],
    }
    for name, want in checks.items():
        got = t[name].astype(np.float32)
        assert got.shape == tuple(want.shape), name
        assert np.abs(got - want.numpy()).max() <= tol, name
    assert t["blk.0.attn_norm.bias"].dtype == np.float32  # 1-D tensors stay f32


def test_gguf_char_vocab_tokenizes_like_owngpt():
    """A char vocabulary is written for llama.cpp's SentencePiece tokenizer: with no merges, it makes each character
    that is a token (space spelled U+2581) one token and any other character its <0xNN> byte tokens. That rule,
    written out here over the GGUF fields, gives owngpt's ids (tests/test_gguf_llamacpp.py runs llama.cpp itself)."""
    from gguf import TokenType

    from owngpt.export.gguf import gguf_tokenizer_fields

    tok = fixtures.char_tokenizer()
    f = gguf_tokenizer_fields(tok, len(tok) + 2)
    assert f["model"] == "llama" and f["merges"] is None
    assert len(set(f["tokens"])) == len(f["tokens"]) == len(tok) + 2
    assert f["tokens"][-1] == f"[PAD{len(tok) + 1}]" and f["types"][-1] == TokenType.UNUSED
    assert f["types"][tok.convert_tokens_to_ids("<0x41>")] == TokenType.BYTE
    assert f["types"][tok.convert_tokens_to_ids("<|im_end|>")] == TokenType.CONTROL
    ids = {t: i for i, t in enumerate(f["tokens"]) if f["types"][i] in (TokenType.NORMAL, TokenType.BYTE)}
    text = fixtures.TEXT + " 龘 unseen Z, é"
    got = []
    for c in text.replace(" ", "\u2581"):
        got += [ids[c]] if c in ids else [ids[f"<0x{b:02X}>"] for b in c.replace("\u2581", " ").encode("utf-8")]
    assert got == tok.encode(text, add_special_tokens=False)


def test_gguf_refuses_other_architectures(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from owngpt.checkpoint import save_checkpoint

    tok = fixtures.char_tokenizer()
    m = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    ck = save_checkpoint(tmp_path / "mistral", m, tok, {"task": "lm"})
    with pytest.raises(CheckpointError, match="GPT-2 and LLaMA architectures.*convert_hf_to_gguf"):
        export(ck, tmp_path / "g", "gguf", measure_result=False)
    assert not (tmp_path / "g").exists()


def test_report_measures_against_original(tiny_ckpt, tiny_lm_data, tmp_path, capsys):
    from owngpt.cli import main

    out = tmp_path / "int8"
    assert (
        main(
            [
                "export",
                str(tiny_ckpt),
                "--out",
                str(out),
                "--to",
                "int8",
                "--data",
                str(tiny_lm_data),
                "--decode-tokens",
                "4",
                "--eval-tokens",
                "300",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "decode tok/s" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["to"] == "int8" and rep["eval_tokens"] == 301
    assert rep["original"]["size_bytes"] == weight_bytes(tiny_ckpt)
    assert rep["result"]["size_bytes"] < 0.6 * rep["original"]["size_bytes"]
    assert rep["original"]["decode_tokens_per_s"] > 0 and rep["result"]["decode_tokens_per_s"] > 0
    assert abs(rep["ratios"]["perplexity"] - 1) < 0.01


def test_cli_errors_are_one_line(tmp_path, capsys):
    from owngpt.cli import main

    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_gguf_states_the_trained_context_not_the_position_table(tiny_ckpt, tmp_path):
    import json
    import shutil

    from gguf import GGUFReader

    from owngpt.export.gguf import export_gguf
    from owngpt.measure import load_fp32

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    meta = json.loads((ck / "owngpt.json").read_text())
    (ck / "owngpt.json").write_text(json.dumps({**meta, "block_size": 32, "trained_context": 32}))
    m, tok, _, _ = load_fp32(ck)
    r = GGUFReader(export_gguf(m, tok, tmp_path / "g", dtype="f32"))
    f = r.fields["gpt2.context_length"]
    assert (f.contents() if hasattr(f, "contents") else f.parts[-1]) == 32 < m.config.n_positions
    # llama.cpp refuses a position table with more rows than context_length: the trained rows are written
    pos = next(t for t in r.tensors if t.name == "position_embd.weight")
    assert np.array_equal(np.asarray(pos.data), m.state_dict()["transformer.wpe.weight"][:32].numpy())


def test_cli_gguf_type_q8_0_writes_a_q8_0_file_about_a_quarter_of_f32(tiny_ckpt, tmp_path, capsys):
    from gguf import GGUFReader, LlamaFileType

    from owngpt.cli import main

    sizes = {}
    for kind in ("f32", "q8_0"):
        out = tmp_path / kind
        assert (
            main(["export", str(tiny_ckpt), "--out", str(out), "--to", "gguf", "--gguf-type", kind, "--no-measure"])
            == 0
        )
        sizes[kind] = json.loads((out / "report.json").read_text())["result"]["size_bytes"]
    f = GGUFReader(tmp_path / "q8_0" / "model.gguf").fields["general.file_type"]
    assert f.contents() == LlamaFileType.MOSTLY_Q8_0
    assert 0.25 < sizes["q8_0"] / sizes["f32"] < 0.4  # 34 bytes per 32 weights; 1-D tensors and the position table f32
    with pytest.raises(SystemExit) as e:  # argparse: exit status 2 and the choices
        main(["export", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--to", "gguf", "--gguf-type", "q4_0"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
