"""The decode engine (owngpt.engine): oracle = a fresh forward pass over the window the engine says it used."""

from __future__ import annotations

import pytest
import torch

import fixtures
from owngpt.engine import Decoder, Row, RowSettings, run_to_end

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we", "A", "KING " * 12]  # the last is longer than the context


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return fixtures.char_tokenizer()


def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def decode_traced(model, tok, n_rows, context, shift, use_cache, max_tokens=70):
    rows = []
    for i, p in enumerate(PROMPTS[:n_rows]):
        # greedy and sampled rows, different lengths, in one batch
        s = RowSettings(max_tokens=max_tokens + 3 * i, temperature=0 if i % 2 == 0 else 1.0, top_k=20, seed=i)
        rows.append(Row(tok.encode(p), s))
        rows[-1].trace = []
    run_to_end(Decoder(model, tok, context, shift=shift, use_cache=use_cache), rows)
    return rows


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("n_rows", [1, 4])
def test_every_step_equals_a_fresh_forward_over_its_window(tok, arch, use_cache, n_rows):
    model = fixtures.tiny_gpt2(tok, n_positions=64) if arch == "gpt2" else tiny_llama(tok)
    context = 24
    rows = decode_traced(model, tok, n_rows, context, shift=5, use_cache=use_cache)
    for r in rows:
        assert len(r.trace) == len(r.token_ids) == r.settings.max_tokens
        starts = [s for s, _e, _lg in r.trace]
        assert len(set(starts)) >= 5  # the window moved several times
        for s, e, logits in r.trace:
            assert 0 < e - s <= context and e <= len(r.ids)
            with torch.no_grad():
                ref = model(torch.tensor([r.ids[s:e]])).logits[0, -1]
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_shift_one_is_nanogpts_window_the_last_context_tokens(tok):
    model = fixtures.tiny_gpt2(tok, n_positions=64)
    (r,) = decode_traced(model, tok, 1, context=16, shift=1, use_cache=True, max_tokens=40)
    prompt = len(r.prompt_ids)
    for step, (s, e, _lg) in enumerate(r.trace):
        assert e == prompt + step and e - s == min(e, 16)


def test_window_length_stays_between_context_minus_shift_and_context(tok):
    model = fixtures.tiny_gpt2(tok, n_positions=64)
    (r,) = decode_traced(model, tok, 1, context=20, shift=6, use_cache=True, max_tokens=60)
    lengths = [e - s for s, e, _ in r.trace]
    assert max(lengths) == 20 and min(lengths[10:]) == 20 - 6 + 1


def test_a_row_that_must_not_slide_ends_at_the_context(tok):
    model = fixtures.tiny_gpt2(tok, n_positions=64)
    prompt = tok.encode("ROMEO:")
    row = Row(prompt, RowSettings(max_tokens=100, temperature=0, slide=False))
    row.trace = []
    run_to_end(Decoder(model, tok, 20), [row])
    assert row.finish_reason == "length"
    assert len(prompt) + len(row.token_ids) == 21  # the last token is never read: every position read is < 20
    assert max(e for _s, e, _ in row.trace) == 20 and min(s for s, _e, _ in row.trace) == 0


def test_rows_joining_mid_decode_compute_what_they_would_alone(tok):
    model = fixtures.tiny_gpt2(tok, n_positions=64)

    def alone(p):
        r = Row(tok.encode(p), RowSettings(max_tokens=30, temperature=0))
        run_to_end(Decoder(model, tok, 24), [r])
        return r.token_ids

    d = Decoder(model, tok, 24)
    first = Row(tok.encode(PROMPTS[1]), RowSettings(max_tokens=30, temperature=0))
    d.add(first)
    for _ in range(7):
        d.step()
    late = Row(tok.encode(PROMPTS[0]), RowSettings(max_tokens=30, temperature=0))
    d.add(late)
    while d.active:
        d.step()
    assert first.token_ids == alone(PROMPTS[1]) and late.token_ids == alone(PROMPTS[0])


def test_seeded_rows_do_not_depend_on_their_batch(tok):
    model = fixtures.tiny_gpt2(tok, n_positions=64)
    s = RowSettings(max_tokens=40, temperature=1.0, top_p=0.9, seed=123)
    a = Row(tok.encode("KING"), s)
    run_to_end(Decoder(model, tok, 24), [a])
    b = Row(tok.encode("KING"), s)
    others = [Row(tok.encode(p), RowSettings(max_tokens=10, temperature=1.0)) for p in PROMPTS]
    run_to_end(Decoder(model, tok, 24), [*others, b])
    assert a.token_ids == b.token_ids


def test_a_reply_cut_inside_a_character_ends_without_replacement_characters(tok):
    from owngpt.engine import IncrementalDecoder

    ids = tok.encode("Ay 好")  # 好 is three byte-fallback tokens in this vocabulary
    for cut in (1, 2):  # the reply ended (length limit) after one or two of its three bytes
        dec = IncrementalDecoder(tok)
        text = "".join(dec.push(i) for i in ids[:-cut]) + dec.flush()
        assert text == "Ay " and "\ufffd" not in text
    # bytes that are invalid, not merely incomplete (a model can write them), still show as decode() shows them
    bad = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xFF, 0xFE, 0xFD, 0xFC, 0xFB)]
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in bad) + dec.flush()
    assert text == tok.decode(bad) and "\ufffd" in text


def test_loading_for_generation_prints_no_progress_bars(tiny_ckpt, capfd):
    from transformers.utils import logging as hf_logging

    from owngpt.generation import load_for_generation

    hf_logging.enable_progress_bar()  # as in a fresh process
    load_for_generation(str(tiny_ckpt))
    out, err = capfd.readouterr()
    assert "Loading" not in out + err and "%|" not in out + err
