"""One conversation-to-prompt function (owngpt.conversation): truncation keeps the system prompt and latest turns."""

from __future__ import annotations

import fixtures
from owngpt.chat_format import prompt_ids, render
from owngpt.conversation import conversation_prompt, is_chat_model, plain_transcript

SYSTEM = {"role": "system", "content": "You are terse."}


def conv(n_turns: int) -> list[dict[str, str]]:
    out = [SYSTEM]
    for i in range(n_turns):
        out.append({"role": "user", "content": f"question {i} " + "x" * 20})
        out.append({"role": "assistant", "content": f"answer {i} " + "y" * 20})
    return out + [{"role": "user", "content": "last question?"}]


def test_long_chat_keeps_the_system_prompt_and_the_latest_turns():
    tok = fixtures.char_tokenizer()
    messages = conv(10)
    for budget in (60, 120, 200):
        p = conversation_prompt(tok, messages, chat=True, max_tokens=budget, eos_ids=[])
        assert len(p.ids) <= budget
        kept = [SYSTEM, *messages[len(messages) - (p.kept_messages - 1) :]]
        assert p.ids == prompt_ids(tok, kept)  # exactly the system message + a suffix of the turns
        assert kept[1]["role"] == "user"  # the kept history opens with the user
        # the rule training uses: render() with the same budget drops the same turns
        assert tok.decode(p.ids).startswith(tok.decode(render(tok, messages + [], max_tokens=budget)[0])[:20])


def test_more_budget_keeps_more_turns_and_everything_fits_when_it_can():
    tok = fixtures.char_tokenizer()
    messages = conv(6)
    kept = [
        conversation_prompt(tok, messages, chat=True, max_tokens=b, eos_ids=[]).kept_messages for b in (80, 160, 2000)
    ]
    assert kept[0] < kept[1] < kept[2] == len(messages)


def test_a_too_long_last_turn_loses_its_start_not_the_system_prompt():
    tok = fixtures.char_tokenizer()
    messages = [SYSTEM, {"role": "user", "content": "start " + "z" * 300 + " the end"}]
    for chat in (True, False):
        p = conversation_prompt(tok, messages, chat=chat, max_tokens=80, eos_ids=[0])
        text = tok.decode(p.ids, skip_special_tokens=False)
        assert len(p.ids) <= 80 and "You are terse." in text and "the end" in text and "start z" not in text


def test_plain_mode_transcript_and_stops():
    tok = fixtures.char_tokenizer()
    p = conversation_prompt(tok, conv(1), chat=False, max_tokens=1000, eos_ids=[7])
    assert tok.decode(p.ids) == plain_transcript(conv(1)) and plain_transcript(conv(1)).endswith("\nBot:")
    assert p.stop == ["\nUser:", "\n\n"] and p.stop_ids == [7]


def test_one_rule_for_chat_models():
    tok = fixtures.char_tokenizer()  # has a chat template, like every tokenizer owngpt builds
    assert not is_chat_model({"task": "lm"}, tok)
    assert is_chat_model({"task": "chat"}, tok)
    assert is_chat_model({}, tok)  # a Hugging Face dir that brings a template


def test_dropping_by_length_first_gives_exactly_the_token_rules_prompt():
    """The server cuts a long conversation by characters before tokenizing (max_chars); the prompt must be the one
    the token rule alone builds, for conversations of every length, both modes, a system prompt or none, and a
    latest turn longer than the context (Chinese: a character is several byte tokens)."""
    import itertools
    import random

    from owngpt.serve.limits import prompt_char_limit

    tok = fixtures.char_tokenizer()
    rng = random.Random(0)
    words = ["hello", "床前明月光", "x" * 40, "ROMEO:", "a b c", "疑是地上霜。" * 5, "?"]
    for trial in range(60):
        n = rng.randrange(0, 30)
        messages = [SYSTEM] if trial % 3 else []
        for i in range(n):
            role = "user" if i % 2 == 0 else "assistant"
            messages.append({"role": role, "content": " ".join(rng.choices(words, k=rng.randrange(0, 8)))})
        messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randrange(1, 40)))})
        budget = rng.choice([8, 24, 60, 200])
        # the server's bound, and the tightest one that holds here: this char tokenizer has no merges, so every
        # character is at least one token (the server's bound is 13x looser: its longest token is <|endoftext|>)
        for chat, max_chars in itertools.product((True, False), (prompt_char_limit(tok, budget), budget)):
            want = conversation_prompt(tok, messages, chat=chat, max_tokens=budget, eos_ids=[0])
            got = conversation_prompt(tok, messages, chat=chat, max_tokens=budget, eos_ids=[0], max_chars=max_chars)
            assert got == want, (trial, chat, budget, max_chars)
