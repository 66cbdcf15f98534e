"""Tests written to kill mutants of owngpt.chat_format that tools/mutate.py found surviving (docs/testing.md)."""

from __future__ import annotations

from tokenizers import processors

import fixtures
from owngpt.chat_format import EOS, IM_END, PAD, render_mmi, stop_token_ids


def test_stop_token_ids_are_end_of_turn_then_end_of_text():
    # oracle: the tokenizer's own ids of the two documented tokens. Kills `tok is None` -> `is not None` (every
    # real token skipped)
    tok = fixtures.char_tokenizer()
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOS)]
    assert tok.convert_tokens_to_ids(EOS) == tok.eos_token_id


def test_render_mmi_never_includes_a_tokenizers_own_start_token():
    # kills render_mmi's enc `add_special_tokens=False` -> True, with a tokenizer that adds a start token of its own
    tok = fixtures.char_tokenizer()
    plain_ids, plain_mask = render_mmi(tok, "hi there", ["how are you", "yo"])
    start = tok.convert_tokens_to_ids(PAD)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{PAD} $A", pair=f"{PAD} $A $B", special_tokens=[(PAD, start)]
    )
    assert tok("hi")["input_ids"][0] == start
    ids, mask = render_mmi(tok, "hi there", ["how are you", "yo"])
    assert (ids, mask) == (plain_ids, plain_mask) and start not in ids
    assert tok.decode(ids) == f"hi there{EOS}how are you{EOS}yo{EOS}"
