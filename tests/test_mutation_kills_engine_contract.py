"""The decode engine's contract, written against the classes of mutants that survived in engine (#25): the default
window shift, the batch cache past its first capacity when a head is wider than that capacity, and what a failed
step leaves behind. Oracles: each row decoded alone, the module docstring's window rule, the rows handed in."""

from __future__ import annotations

import pytest

import fixtures
from owngpt.engine import Decoder, Row, RowSettings, default_shift, run_to_end

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return fixtures.char_tokenizer()


@pytest.mark.parametrize("context", [1, 3, 4, 20, 41])
def test_the_default_shift_is_a_quarter_of_the_context(context):
    assert default_shift(context) == max(1, context // 4)


def test_a_window_moves_by_a_quarter_of_the_context_by_default(tok):
    # without `shift`, a window that reaches the context keeps its last context - context // 4 + 1 tokens
    model = fixtures.tiny_gpt2(tok, n_positions=64)
    row = Row(tok.encode("ROMEO:"), RowSettings(max_tokens=60, temperature=0))
    row.trace = []
    run_to_end(Decoder(model, tok, 20), [row])
    lengths = [e - s for s, e, _ in row.trace]
    assert max(lengths) == 20 and min(lengths[20:]) == 20 - 20 // 4 + 1


def test_a_head_wider_than_the_first_cache_capacity_decodes_past_it(tok):
    # two rows of one token, one head of 128 dimensions, 80 tokens in a context of 100: the batch cache's first 64
    # columns fill while every column is still in both windows, so it must grow (oracle: each row without a cache)
    model = fixtures.tiny_gpt2(tok, n_layer=1, n_embd=128, n_head=1, n_positions=128)

    def rows():
        return [Row(tok.encode(p), RowSettings(max_tokens=80, temperature=0)) for p in ("A", "K")]

    cached, plain = rows(), rows()
    run_to_end(Decoder(model, tok, 100), cached)
    for r in plain:
        run_to_end(Decoder(model, tok, 100, use_cache=False), [r])
    assert [r.token_ids for r in cached] == [r.token_ids for r in plain]
    assert all(len(r.token_ids) == 80 for r in cached)


def test_a_failed_step_ends_every_row_it_held_with_the_error(tok, monkeypatch):
    # rows decoding, rows just added (prefilled in the failing step): fail() ends them all with the message, returns
    # them, and leaves the decoder empty for the next rows
    model = fixtures.tiny_gpt2(tok, n_positions=64)
    d = Decoder(model, tok, 64)
    running = [Row(tok.encode(p), RowSettings(max_tokens=20, temperature=0)) for p in ("KING", "QUEEN")]
    for r in running:
        d.add(r)
    d.step()
    new = Row(tok.encode("Romeo"), RowSettings(max_tokens=20, temperature=0))
    d.add(new)

    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError):
        d.step()
    ended = d.fail("generation failed: RuntimeError: boom")
    assert sorted(map(id, ended)) == sorted(map(id, [*running, new]))
    assert all((r.finish_reason, r.error) == ("error", "generation failed: RuntimeError: boom") for r in ended)
    assert d.active == 0
    monkeypatch.undo()
    later = Row(tok.encode("KING"), RowSettings(max_tokens=3, temperature=0))
    run_to_end(d, [later])
    assert later.finish_reason == "length" and len(later.token_ids) == 3


@pytest.mark.parametrize("window", [False, True])
def test_a_decoding_context_cut_inside_a_character_keeps_its_whole_characters(window):
    # The stream decodes each new token after the prompt's last few tokens. Cut inside a character made of byte
    # tokens, those leading bytes are dropped and the rest of the context kept: with a SentencePiece-style decoder
    # (LLaMA's: "▁" is a space, the text's first space stripped) the context decides whether a word starts with a
    # space. Oracle: the tokenizer's decode() of the kept context and the new token.
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from owngpt.engine import IncrementalDecoder

    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}, "x": 258, "▁world": 259}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")
    context = [vocab["<0xA5>"], vocab["<0xBD>"], vocab["x"]]  # the last two bytes of 好 (E5 A5 BD), then x
    assert tok.decode(context).startswith("\ufffd")
    d = IncrementalDecoder(tok, context)
    if window:
        d.stream = None  # the window over decode(), for tokenizers without DecodeStream
    want = tok.decode([vocab["x"], vocab["▁world"]])[len(tok.decode([vocab["x"]])) :]
    assert want == " world" and tok.decode([vocab["▁world"]]) == "world"
    assert d.push(vocab["▁world"]) + d.flush() == want


def test_a_row_joining_with_a_window_longer_than_twice_the_cache_computes_what_it_would_alone(tok):
    # the cache holds one short row (64 columns); a row with a 150-token window joins: the buffers must grow to hold
    # it whole (oracle: each row decoded alone)
    model = fixtures.tiny_gpt2(tok, n_positions=256)
    prompts = ["A", ("KING RICHARD: " * 12)[:150]]

    def alone(p):
        r = Row(tok.encode(p), RowSettings(max_tokens=6, temperature=0))
        run_to_end(Decoder(model, tok, 200), [r])
        return r.token_ids

    d = Decoder(model, tok, 200)
    rows = [Row(tok.encode(p), RowSettings(max_tokens=6, temperature=0)) for p in prompts]
    assert len(rows[1].prompt_ids) == 150
    d.add(rows[0])
    d.step()
    d.add(rows[1])
    while d.active:
        d.step()
    assert [r.token_ids for r in rows] == [alone(p) for p in prompts]


def test_a_decoder_caches_keys_and_values_unless_told_not_to(tok):
    # the default is the KV cache (a step reads one new token per row); use_cache=False recomputes every window
    model = fixtures.tiny_gpt2(tok, n_positions=64)
    assert Decoder(model, tok, 64).use_cache is True
    assert Decoder(model, tok, 64, use_cache=False).use_cache is False


@pytest.mark.parametrize("window", [False, True])
def test_flush_drops_an_incomplete_last_character_but_keeps_invalid_bytes_the_model_wrote(tok, window):
    # At the end a reply cut inside a character (at most 3 bytes of a 4-byte one) loses those bytes; a longer run of
    # invalid bytes is what the model wrote and stays, as decode() shows it. Oracle: decode().
    from owngpt.engine import IncrementalDecoder

    v = tok.get_vocab()
    ok = tok("ok", add_special_tokens=False)["input_ids"]
    cut = [v["<0xF0>"], v["<0x9F>"], v["<0x98>"]]  # the first 3 bytes of an emoji
    for ids, want in ((ok + cut, "ok"), (ok + [v["<0x80>"], *cut], tok.decode(ok + [v["<0x80>"], *cut]))):
        d = IncrementalDecoder(tok, [])
        if window:
            d.stream = None
        assert "".join(d.push(i) for i in ids) + d.flush() == want
    assert want == "ok" + "\ufffd" * 4


@pytest.mark.parametrize("stop", [(), ("ea",)])
def test_a_row_tells_its_consumer_it_finished_exactly_once(tok, stop):
    # whether it ends at its length or on a stop string, the last event is ("", finished=True) and the only one
    events = []
    row = Row(tok.encode("Say:"), RowSettings(max_tokens=8, stop=stop), lambda r, p, f: events.append((p, f)))
    row.begin(tok, tok.eos_token_id)
    for t in tok("the sea, the sea", add_special_tokens=False)["input_ids"]:
        row.feed(t)
    row.finish("length")
    assert [f for _, f in events].count(True) == 1 and events[-1] == ("", True)
    assert row.finish_reason == ("stop" if stop else "length")
    assert "".join(p for p, _ in events) == row.text == ("the s" if stop else "the sea,")


def test_an_empty_prompt_starts_from_end_of_text_and_finished_rows_leave_the_batch_at_once(tok):
    model = fixtures.tiny_gpt2(tok, n_positions=64)
    d = Decoder(model, tok, 64)
    assert d.start_id == tok.eos_token_id is not None
    short, empty = Row(tok.encode("KING"), RowSettings(max_tokens=1, temperature=0)), Row([], RowSettings(max_tokens=3))
    d.add(short)
    d.add(empty)
    assert empty.ids == [tok.eos_token_id]  # unconditional sampling starts a document
    from owngpt.tokenizer import gpt2_tokenizer

    gpt2 = gpt2_tokenizer()  # an end-of-text id other than 0 (this char tokenizer's is 0)
    other, row = Decoder(model, gpt2, 64), Row([], RowSettings(max_tokens=1))
    other.add(row)
    assert other.start_id == row.ids[0] == gpt2.eos_token_id == 50256
    done = d.step()
    assert done == [short] and short.finish_reason == "length"
    assert d.active == 1 and d.rows == [empty]  # the finished row has left the batch
