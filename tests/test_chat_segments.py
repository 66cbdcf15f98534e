"""chat_format encodes a rendered conversation in pieces cut at special tokens (linear in the turns, where one long
string is not); the ids and offsets must be exactly those of the whole string. Here: every tokenizer kind owngpt
builds or adapts takes the piece path and agrees with the whole string on awkward text; GPT-2's byte-level BPE
agrees with the pre-change oracle of test_chat_render_parity; and tokenizers for which cutting would change the ids
(an added token spanning a cut, a pre-tokenizer that treats the first piece differently) are refused."""

from __future__ import annotations

import pytest
from test_chat_render_parity import _bert, _bpe, corpus, old_render

import fixtures
from owngpt import chat_format as cf

AWKWARD = [  # contents that touch the cut tokens: partial markers, markers inside content, edge whitespace
    "ends with <|im_",
    "<|im_end|> inside",
    "  two spaces  ",
    "\n",
    "",
    "<|im_start|>user\nfake turn<|im_end|>",
    "[SEP [SEP] [CLS",
    "床前<|endoftext|>明月光",
    "😀 ",
]


def _whole(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _gpt2():
    from owngpt.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="module", params=["char", "bpe", "eos", "sep", "gpt2"])
def tok(request, tmp_path_factory):
    return {
        "char": fixtures.char_tokenizer,
        "bpe": lambda: _bpe(with_chatml=True),
        "eos": lambda: _bpe(with_chatml=False),
        "sep": lambda: _bert(tmp_path_factory),
        "gpt2": _gpt2,
    }[request.param]()


@pytest.mark.parametrize("piece_chars", [0, 40, cf._PIECE_CHARS])  # cut at every special token, some, the default
def test_pieces_equal_the_whole_string(tok, piece_chars, monkeypatch):
    monkeypatch.setattr(cf, "_PIECE_CHARS", piece_chars)
    assert cf._segment_rule(tok) is not None, "this kind should take the piece path"
    convs = corpus()
    convs.append([{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(AWKWARD)])
    convs.append([m for conv in convs for m in conv if m["role"] != "system"] * 4)  # long enough for default cuts
    for conv in convs:
        text, _spans = cf._assistant_spans(tok, conv)
        assert cf._encode(tok, text) == _whole(tok, text), conv
    for text in AWKWARD:
        assert cf._encode(tok, text) == _whole(tok, text), text


def test_gpt2_ids_and_masks_equal_the_previous_implementation():
    tok = _gpt2()
    for conv in corpus(seed=1, n=12):
        full, _ = old_render(tok, conv)
        for max_tokens in (None, len(full) // 2, 7):
            assert cf.render(tok, conv, max_tokens=max_tokens) == old_render(tok, conv, max_tokens=max_tokens)


def _naive_pieces(tok):
    """Cut at owngpt's special tokens, whatever the rule says (what a wrong boundary rule would do)."""
    import re

    cuts = {x: tok.convert_tokens_to_ids(x) for x in cf.SPECIAL_TOKENS}
    pattern = re.compile("|".join(re.escape(x) for x in sorted(cuts, key=len, reverse=True)))
    return lambda text: cf._encode_pieces(tok.backend_tokenizer, pattern, cuts, text, min_chars=0)


def _spanning_token():
    """An added token that runs across the cut before <|im_end|>: in the whole string "o<|im_end|>" is one token
    (and, starting with a word character, it is no cut itself)."""
    tok = fixtures.char_tokenizer(fixtures.TEXT + "!")
    tok.add_special_tokens({"additional_special_tokens": ["o<|im_end|>"]})
    return tok


def _first_piece_prefix():
    """Metaspace with prepend_scheme="first": only the text before the first special token gets "▁"."""
    from tokenizers import pre_tokenizers

    tok = fixtures.char_tokenizer(fixtures.TEXT + "▁")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    return tok


@pytest.mark.parametrize("make", [_spanning_token, _first_piece_prefix])
def test_cuts_that_would_change_the_ids_are_refused(make, monkeypatch):
    monkeypatch.setattr(cf, "_PIECE_CHARS", 0)
    tok = make()
    conv = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "ok!"},
        {"role": "assistant", "content": "床前明月光!"},
    ]
    text, _ = cf._assistant_spans(tok, conv)
    # the planted case is real: cutting at owngpt's special tokens gives other ids than the whole string
    assert _naive_pieces(tok)(text) != _whole(tok, text)
    assert cf._encode(tok, text) == _whole(tok, text)
    for max_tokens in (None, 20):
        assert cf.render(tok, conv, max_tokens=max_tokens) == old_render(tok, conv, max_tokens=max_tokens)


def test_the_spanning_token_only_stops_the_cuts_it_spans():
    rule = cf._segment_rule(_spanning_token())
    assert rule is not None and cf.IM_START in rule[1] and cf.IM_END not in rule[1]
    assert cf._segment_rule(_first_piece_prefix()) is None


def test_truncation_left_on_the_backend_is_not_applied_to_pieces():
    """transformers leaves truncation set on the shared backend after a truncating call; pieces must not inherit it."""
    tok = fixtures.char_tokenizer()
    conv = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} 床前明月光"} for i in range(200)]
    expected = old_render(tok, conv)
    assert cf.render(tok, conv) == expected  # the piece path's rule is found and kept for this tokenizer
    tok("hi there " * 50, truncation=True, max_length=4)
    assert cf.render(tok, conv) == expected
    tok("hi there " * 50, truncation=True, max_length=4)  # and truncation still set when the rule is first found
    tok2 = fixtures.char_tokenizer()
    tok2("hi there " * 50, truncation=True, max_length=4)
    assert cf.render(tok2, conv) == expected
    assert cf._segment_rule(tok2) is not None  # not refused for good because of a passing state
