"""engine.IncrementalDecoder streams through tokenizers' public DecodeStream; the window over the tokenizer's own
decode() (kept for tokenizers without a `tokenizers` backend) is the oracle: the same pieces, token for token."""

from __future__ import annotations

import pytest

import fixtures
from owngpt.engine import IncrementalDecoder


def _pieces(dec: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_decode_stream_gives_the_pieces_of_the_decode_window(kind):
    from owngpt.tokenizer import gpt2_tokenizer

    tok = fixtures.char_tokenizer() if kind == "char" else gpt2_tokenizer()
    text = "Ay 好世界, 床前明月光，疑是地上霜。 café 🙂 ok!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    context = tok("Say:", add_special_tokens=False)["input_ids"]
    stream = IncrementalDecoder(tok, context)
    assert stream.stream is not None  # the library's DecodeStream is what runs
    window = IncrementalDecoder(tok, context)
    window.stream = None  # the hand-written window over decode(): the oracle
    assert _pieces(stream, ids) == _pieces(window, ids)
    # an incomplete character at the very end: both drop it at flush (a reply cut by a length limit, not text)
    cut = ids[: next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))]
    a, b = IncrementalDecoder(tok, context), IncrementalDecoder(tok, context)
    b.stream = None
    pieces = _pieces(a, cut)
    assert pieces == _pieces(b, cut) and "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("kind", ["char", "gpt2"])
@pytest.mark.parametrize("window", [False, True])
def test_a_prompt_ending_in_multibyte_characters_adds_no_replacement_characters(kind, window):
    """The decoder's context is the prompt's last few tokens: cut inside a character made of byte tokens, its
    leading bytes must not reach the reply as U+FFFD. Oracle: the reply decoded on its own."""
    from owngpt.tokenizer import gpt2_tokenizer

    tok = fixtures.char_tokenizer() if kind == "char" else gpt2_tokenizer()
    reply = tok("\nFirst 床前", add_special_tokens=False)["input_ids"]
    for prompt in ("床前明月光，疑是", "疑是", "月", "🙂🙂", "ok 🙂"):
        dec = IncrementalDecoder(tok, tok(prompt, add_special_tokens=False)["input_ids"])
        if window:
            dec.stream = None
        assert "".join(_pieces(dec, reply)) == "\nFirst 床前", prompt
