"""Tests written to kill mutants of owngpt.quantize that tools/mutate.py found surviving (docs/testing.md lists them)."""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch

import fixtures


def test_an_int8_copy_is_built_for_inference_with_dropout_off():
    # GPT-2's config has dropout 0.1 by default; an int8 model is for inference: two forwards give the same logits.
    # Kills build_quantized_model's `model.eval()` dropped (a model built from a config starts in training mode).
    from transformers import GPT2Config, GPT2LMHeadModel

    from owngpt.quantize import quantize_model

    tok = fixtures.char_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.1,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    fp32 = GPT2LMHeadModel(cfg).eval()
    q = quantize_model(fp32)
    assert not any(m.training for m in q.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([tok.encode("KING RICHARD")])
    with torch.no_grad():
        assert torch.equal(q(ids).logits, q(ids).logits)


def test_an_int8_checkpoint_with_foreign_tensors_names_the_first_five(tiny_ckpt, tmp_path):
    # kills build_quantized_model's `unexpected[:5]` -> `[:6]`
    from safetensors.torch import load_file

    from owngpt.checkpoint import load_config
    from owngpt.errors import CheckpointError
    from owngpt.export import export
    from owngpt.quantize import build_quantized_model

    out = tmp_path / "int8"
    export(tiny_ckpt, out, "int8", measure_result=False)
    info = json.loads((out / "owngpt.json").read_text())["quantization"]
    tensors = load_file(str(out / "model.safetensors"))
    extra = {f"foreign.t{i}": torch.zeros(1) for i in range(7)}
    with pytest.raises(CheckpointError, match="has tensors the model does not") as e:
        build_quantized_model(load_config(out), {**tensors, **extra}, info)
    named = re.search(r"does not: (\[.*?\])", str(e.value)).group(1)
    assert len(ast.literal_eval(named)) == 5 and set(ast.literal_eval(named)) <= set(extra)


def test_an_int8_export_keeps_the_generation_config(tiny_ckpt, tmp_path):
    # the end-of-text ids and sampling defaults of the checkpoint travel with its int8 copy (kills the
    # generation_config save in save_quantized dropped or its `is not None` test inverted)
    from owngpt.export import export

    out = tmp_path / "int8"
    export(tiny_ckpt, out, "int8", measure_result=False)
    want = json.loads((tiny_ckpt / "generation_config.json").read_text())
    got = json.loads((out / "generation_config.json").read_text())
    assert {k: v for k, v in got.items() if k != "transformers_version"} == {
        k: v for k, v in want.items() if k != "transformers_version"
    }


def test_an_int8_llama_gets_its_rotary_buffers_back():
    # LLaMA's rotary `inv_freq` is computed at init and never saved: the int8 model, built on the meta device, must
    # build those modules again (kills that rebuild dropped). Oracle: the fp32 model's logits, within int8 error.
    from owngpt.quantize import quantize_model

    tok = fixtures.char_tokenizer()
    fp32 = fixtures.tiny_llama(tok)
    q = quantize_model(fp32)
    ids = torch.tensor([tok.encode("KING RICHARD")])
    with torch.no_grad():
        a, b = fp32(ids).logits, q(ids).logits
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.1 * a.abs().max()
