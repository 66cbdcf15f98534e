import pytest

import fixtures
from owngpt import chat_format as cf

MSGS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "床前明月光?"},
    {"role": "assistant", "content": "疑是地上霜。"},
]


@pytest.fixture(scope="module")
def tok():
    return fixtures.char_tokenizer()


def test_python_rendering_equals_the_jinja_template_in_transformers(tok):
    for gen in (False, True):
        assert tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=gen) == cf.render_text(MSGS, gen)


def test_ids_equal_tokenizing_the_rendered_text(tok):
    ids, mask = cf.render(tok, MSGS)
    assert ids == tok(tok.apply_chat_template(MSGS, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids)


def test_mask_covers_exactly_the_assistant_replies_and_their_end_of_turn(tok):
    ids, mask = cf.render(tok, MSGS)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Hello!" + cf.IM_END + "\n" + "疑是地上霜。" + cf.IM_END + "\n"
    ids, mask = cf.render(tok, MSGS, train_on_prompt=True)
    assert all(mask)


def test_long_dialogues_keep_the_latest_turns_and_the_system_prompt(tok):
    full, _ = cf.render(tok, MSGS)
    ids, mask = cf.render(tok, MSGS, max_tokens=len(full) - 5)
    text = tok.decode(ids)
    assert len(ids) <= len(full) - 5
    assert text.startswith(cf.IM_START + "system\nYou are terse.")
    assert "hi there" not in text and "疑是地上霜。" in text


def test_mmi_reversal_is_exact(tok):
    pairs = cf.mmi_pairs(MSGS)
    assert pairs == [("Hello!", ["hi there"]), ("疑是地上霜。", ["床前明月光?", "Hello!", "hi there"])]
    ids, mask = cf.render_mmi(tok, *pairs[1])
    eos = tok.convert_tokens_to_ids(cf.EOS)
    assert tok.decode(ids) == "疑是地上霜。" + cf.EOS + "床前明月光?" + cf.EOS + "Hello!" + cf.EOS + "hi there" + cf.EOS
    n_reply = len(tok.encode("疑是地上霜。", add_special_tokens=False)) + 1
    assert mask == [0] * n_reply + [1] * (len(ids) - n_reply)
    assert ids[n_reply - 1] == eos
