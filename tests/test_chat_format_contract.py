"""chat_format's contract, written out by hand: validation, truncation rules, prompts, masks, MMI separators and
template adaptation. Added to kill the mutants tools/mutate.py found surviving test_chat_format.py."""

from __future__ import annotations

import pytest

import fixtures
from owngpt import chat_format as cf

CONV = [
    {"role": "system", "content": "be terse"},
    {"role": "user", "content": "one"},
    {"role": "assistant", "content": "uno"},
    {"role": "user", "content": "two"},
    {"role": "assistant", "content": "dos"},
    {"role": "user", "content": "three"},
    {"role": "assistant", "content": "tres"},
]


@pytest.fixture(scope="module")
def tok():
    return fixtures.char_tokenizer()


def word_tokenizer(words: list[str], eos: str | None = None, specials: tuple[str, ...] = (), bos_post: str = ""):
    """A whitespace word-level tokenizer with chosen special tokens (and optionally one that adds a BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *specials, *words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_post:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos_post} $A", special_tokens=[(bos_post, vocab[bos_post])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token=eos)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_render_text_is_chatml_written_out():
    msgs = CONV[1:3]
    assert cf.render_text(msgs) == "<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\nuno<|im_end|>\n"
    assert cf.render_text(msgs, add_generation_prompt=True).endswith("uno<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "user"}], "message 0 must be an object"),
        ([{"content": "x"}], "message 0 must be an object"),
        (["hi"], "message 0 must be an object"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "message 1 has role 'robot'"),
        ([{"role": "user", "content": 3}], "message 0 content must be a string"),
    ],
)
def test_validate_messages_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        cf.validate_messages(bad, "f.jsonl:3")


def test_validate_messages_keeps_only_role_and_content():
    assert cf.validate_messages([{"role": "user", "content": "a", "name": "x"}]) == [{"role": "user", "content": "a"}]


def test_train_on_prompt_masks_every_token_with_one(tok):
    ids, mask = cf.render(tok, CONV, train_on_prompt=True)
    assert mask == [1] * len(ids) and ids == ids_of(tok, cf.render_text(CONV))


def test_truncation_drops_whole_exchanges_and_never_opens_with_the_assistant(tok):
    full, _ = cf.render(tok, CONV)
    assert cf.render(tok, CONV, max_tokens=len(full)) == cf.render(tok, CONV)  # exactly fits: nothing dropped
    # one token short: "one" goes, and then "uno", which would open the conversation
    want = cf.render(tok, CONV[:1] + CONV[3:])
    assert cf.render(tok, CONV, max_tokens=len(full) - 1) == want
    assert cf.render(tok, CONV, max_tokens=len(want[0])) == want
    # only the latest exchange left and still too long: its start is cut, the end (what is trained) kept
    last = cf.render(tok, CONV[:1] + CONV[5:])
    ids, mask = cf.render(tok, CONV, max_tokens=len(last[0]) - 3)
    assert ids == last[0][3:] and mask == last[1][3:]


def test_prompt_ids_ask_for_the_next_reply_and_drop_the_oldest_turns_one_at_a_time(tok):
    asked = CONV[:6]  # ends with the user's "three"
    whole = ids_of(tok, cf.render_text(asked, add_generation_prompt=True))
    assert cf.prompt_ids(tok, asked) == whole
    assert tok.decode(whole).endswith("three<|im_end|>\n<|im_start|>assistant\n")
    assert cf.prompt_ids(tok, asked, max_tokens=len(whole)) == whole
    without_one = ids_of(tok, cf.render_text(asked[:1] + asked[2:], add_generation_prompt=True))
    assert cf.prompt_ids(tok, asked, max_tokens=len(whole) - 1) == without_one  # "one" only, "uno" stays
    latest = ids_of(tok, cf.render_text(asked[:1] + asked[5:], add_generation_prompt=True))
    assert cf.prompt_ids(tok, asked, max_tokens=len(latest) - 2) == latest[2:]  # the latest turn is cut, not dropped


def test_ids_never_include_a_tokenizers_own_added_specials():
    tok = word_tokenizer(["hi", "yo"], eos="<|im_end|>", specials=("<s>", "<|im_start|>", "<|im_end|>"), bos_post="<s>")
    tok.chat_template = cf.CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok("hi")["input_ids"][0] == tok.convert_tokens_to_ids("<s>")  # this tokenizer adds <s> by default
    bos = tok.convert_tokens_to_ids("<s>")
    assert bos not in cf.render(tok, msgs)[0] and bos not in cf.prompt_ids(tok, msgs[:1])


def test_adapt_pretrained_tokenizer_needs_both_chatml_tokens():
    both = word_tokenizer(["hi"], eos="</s>", specials=("</s>", "<|im_start|>", "<|im_end|>"))
    assert cf.adapt_pretrained_tokenizer(both) == "chatml" and both.chat_template == cf.CHAT_TEMPLATE
    start_only = word_tokenizer(["hi"], eos="</s>", specials=("</s>", "<|im_start|>"))
    assert cf.adapt_pretrained_tokenizer(start_only) == "eos"
    assert cf.adapt_pretrained_tokenizer(start_only) == "own"  # it has a template now: kept
    assert cf.adapt_pretrained_tokenizer(word_tokenizer(["hi"])) == "none"


def test_render_mmi_separates_with_the_tokenizers_eos_when_it_has_no_endoftext():
    tok = word_tokenizer(["a", "b", "c"], eos="</s>", specials=("</s>",))
    assert tok.convert_tokens_to_ids(cf.EOS) == tok.unk_token_id  # no <|endoftext|> in this vocabulary
    ids, mask = cf.render_mmi(tok, "a", ["b", "c"])
    s = tok.convert_tokens_to_ids("</s>")
    a, b, c = (tok.convert_tokens_to_ids(w) for w in "abc")
    assert ids == [a, s, b, s, c, s] and mask == [0, 0, 1, 1, 1, 1]
    assert cf.render_mmi(tok, "a", ["b", "c"], max_tokens=4) == ([a, s, b, s], [0, 0, 1, 1])  # whole turns only
