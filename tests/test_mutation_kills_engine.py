"""Tests written to kill mutants of owngpt.engine that tools/mutate.py found surviving (docs/testing.md lists them).

They use the engine's public row API (Row, RowSettings, IncrementalDecoder), as the existing tests do, and oracles
that do not share its code: the whole text cut at the first stop string with str.find, and the tokenizer's decode().
"""

from __future__ import annotations

import pytest

from owngpt.engine import IncrementalDecoder, Row, RowSettings

TEXT = "Hello world. The quick brown fox, jumps over; the lazy dog! 床前明月光 ok"


@pytest.fixture(scope="module")
def gpt2_tok():
    from owngpt.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()  # byte-level BPE: most tokens are several characters, CJK characters several tokens


def _feed(tok, text: str, stops: tuple[str, ...]) -> tuple[Row, str]:
    """Feed the tokens of `text` to a row as if the model had chosen them; return the row and what it streamed."""
    streamed: list[str] = []
    row = Row(tok.encode("Say:"), RowSettings(max_tokens=1000, stop=stops))
    row.on_event = lambda _r, piece, _fin: piece and streamed.append(piece)
    row.begin(tok, tok.eos_token_id)
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        row.feed(t)
    row.finish("length")
    return row, "".join(streamed)


def test_a_stop_string_inside_a_multi_character_token_keeps_the_text_before_it(gpt2_tok):
    # kills engine Row._add: the text before a stop string that arrives in the same piece not emitted
    ids = gpt2_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(TEXT)  # multi-character tokens: a stop string can start in the middle of one
    checked = 0
    for i in range(len(TEXT)):
        for n in (1, 2, 4):
            stop = TEXT[i : i + n]
            row, streamed = _feed(gpt2_tok, TEXT, (stop,))
            want = TEXT[: TEXT.find(stop)]  # the oracle: the whole text cut at the first occurrence
            assert row.text == streamed == want, (stop, row.text)
            assert row.finish_reason == "stop"
            checked += 1
    # two stop strings: the text ends before whichever comes first
    for a, b in (("fox", "quick"), ("dog", " o"), ("月", "lazy")):
        row, streamed = _feed(gpt2_tok, TEXT, (a, b))
        assert row.text == streamed == TEXT[: min(TEXT.find(a), TEXT.find(b))]
    assert checked > 150


def test_without_a_stop_string_the_row_streams_exactly_the_decoded_text(gpt2_tok):
    row, streamed = _feed(gpt2_tok, TEXT, ("never appears",))
    assert row.text == streamed == TEXT and row.finish_reason == "length"


class _DecodeOnly:
    """A tokenizer with decode() and no `tokenizers` backend (a slow tokenizer): the incremental decoder's own
    window over decode() does the work. One token per UTF-8 byte, so a CJK character is three tokens."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_the_decode_window_never_releases_half_a_character():
    # kills engine IncrementalDecoder.push: `len(new) > len(prefix) and not new.endswith(U+FFFD)` -> `or`
    tok = _DecodeOnly()
    text = "Ay 好世界, café 🙂 done"
    ids = list(text.encode("utf-8"))
    dec = IncrementalDecoder(tok, list(b"Say:"))
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    # a character is released with the token that completes it, not before
    assert [p for p in pieces if p][3:6] == ["好", "世", "界"]


def test_many_rows_joining_one_by_one_with_long_windows_compute_what_they_would_alone():
    # Rows join a running batch one at a time, past the first slot capacity, and a late row's window is longer than
    # the cache's first column capacity, on a model whose head dim (128) is larger than that: each row's greedy text
    # must equal what it decodes alone. Kills engine _SlotCache.append's capacity checks compared against the head
    # count or the head dim instead of the slots or the columns.
    import torch

    import fixtures
    from owngpt.engine import Decoder, run_to_end

    tok = fixtures.char_tokenizer()
    model = fixtures.tiny_gpt2(tok, n_layer=1, n_embd=128, n_head=1, n_positions=128)
    context = 100
    prompts = ["A", "ROMEO:", "KING", "First", "Be", "O", "Citizen", "What", "He", "We"]
    prompts.append(("KING RICHARD " * 8)[:90])  # a 90-token window joining rows that hold a few tokens
    torch.set_num_threads(1)

    def settings():
        return RowSettings(max_tokens=6, temperature=0)

    def alone(p):
        r = Row(tok.encode(p), settings())
        run_to_end(Decoder(model, tok, context), [r])
        return r.token_ids

    d = Decoder(model, tok, context)
    rows = []
    for p in prompts:
        rows.append(Row(tok.encode(p), settings()))
        d.add(rows[-1])
        d.step()
    while d.active:
        d.step()
    assert [r.token_ids for r in rows] == [alone(p) for p in prompts]
    assert all(len(r.token_ids) == 6 for r in rows)


def test_rows_decoding_past_the_first_cache_capacity_compute_what_they_would_alone():
    # Three rows on a one-head model decode 80 tokens with a context of 100: the batch cache's columns fill up (its
    # first capacity is 64 columns) and grow with every row still in it. Kills engine _SlotCache.make_room growing to
    # as many slots as heads instead of rows.
    import torch

    import fixtures
    from owngpt.engine import Decoder, run_to_end

    tok = fixtures.char_tokenizer()
    model = fixtures.tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=1, n_positions=128)
    torch.set_num_threads(1)
    prompts = ["A", "ROMEO:", "KING"]

    def alone(p):
        r = Row(tok.encode(p), RowSettings(max_tokens=80, temperature=0))
        run_to_end(Decoder(model, tok, 100), [r])
        return r.token_ids

    rows = [Row(tok.encode(p), RowSettings(max_tokens=80, temperature=0)) for p in prompts]
    run_to_end(Decoder(model, tok, 100), rows)
    assert [r.token_ids for r in rows] == [alone(p) for p in prompts]
    assert all(len(r.token_ids) == 80 for r in rows)


def test_row_settings_cannot_change_under_a_running_row():
    # rows share and keep their settings while decoding: RowSettings is frozen (kills `frozen=True` -> False)
    import dataclasses

    s = RowSettings(max_tokens=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_tokens = 6  # type: ignore[misc]


def test_streamed_pieces_skip_special_tokens_as_decode_does():
    # oracle: the tokenizer's own decode(skip_special_tokens=True). Kills DecodeStream(skip_special_tokens=False).
    import fixtures
    from owngpt.chat_format import IM_END, PAD

    tok = fixtures.char_tokenizer()
    ids = tok.encode("Ay ") + [tok.convert_tokens_to_ids(PAD)] + tok.encode("ok") + [tok.convert_tokens_to_ids(IM_END)]
    dec = IncrementalDecoder(tok, tok.encode("Say:"))
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == tok.decode(ids, skip_special_tokens=True) == "Ay ok"
