"""chat_format.render against the implementation it replaced (kept here, verbatim, as the oracle): ids and loss
masks must be identical on a corpus of conversations, for owngpt's own templates (ChatML, EOS-terminated, [SEP]) and
a foreign template, with and without max_tokens and train_on_prompt.

The oracle renders each conversation with k replies 2k+1 times and re-renders after dropping each turn: slow, and
obviously what the format means; the fast path must agree with it token for token."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

import fixtures
from owngpt import chat_format as cf

# ----------------------------------------------------------------------------------- the oracle (main 0b380db)


def _old_template_text(tokenizer, messages, add_generation_prompt=False):
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return cf.render_text(messages, add_generation_prompt)


def _old_assistant_spans(tokenizer, messages):
    full = _old_template_text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_old_template_text(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_old_template_text(tokenizer, messages[: i + 1]))
        spans.append((start, end))
    return full, spans


def _old_render_exact(tokenizer, messages, train_on_prompt):
    text, spans = _old_assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return ids, [1] * len(ids)
    mask = []
    for start, _end in enc["offset_mapping"]:
        mask.append(int(any(s <= start < e for s, e in spans)))
    return ids, mask


def old_render(tokenizer, messages: Sequence[dict], max_tokens=None, train_on_prompt=False):
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        ids, mask = _old_render_exact(tokenizer, system + turns, train_on_prompt)
        if max_tokens is None or len(ids) <= max_tokens:
            return ids, mask
        if len(turns) > 2:
            turns = turns[1:]
            while turns and turns[0]["role"] == "assistant":
                turns = turns[1:]
            if turns:
                continue
        return ids[-max_tokens:], mask[-max_tokens:]


# ----------------------------------------------------------------------------------- tokenizers and corpus

WORDS = [
    "hi",
    "ok",
    " there",
    "Hello!",
    "床前明月光",
    "疑是地上霜。",
    "  spaced ",
    "\n",
    "line\nbreak",
    "😀",
    "a<b",
    "?",
]
FOREIGN_TEMPLATE = (  # Qwen2's layout: a default system prompt, its own markers
    "{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def corpus(seed: int = 0, n: int = 24) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = [
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "床前明月光?"},
            {"role": "assistant", "content": "疑是地上霜。"},
        ]
    ]
    for _ in range(n):
        conv = [{"role": "system", "content": "be brief 简短"}] if rng.random() < 0.3 else []
        # after a system prompt some open with the assistant (without one the oracle cannot: transformers refuses to
        # render the empty conversation before that reply)
        role = "assistant" if conv and rng.random() < 0.3 else "user"
        for _ in range(rng.randint(1, 10)):
            content = "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6)))
            conv.append({"role": role, "content": content})
            role = "assistant" if role == "user" else ("user" if rng.random() < 0.85 else "assistant")
        convs.append(conv)
    return convs


def _bpe(with_chatml: bool):
    from owngpt.tokenizer import train_bpe

    text = [" ".join(WORDS) * 3, "You are terse. hi there Hello! be brief 简短"]
    tok = train_bpe(text, vocab_size=400)
    if not with_chatml:  # a pretrained-style vocabulary without <|im_start|>: owngpt gives it the EOS template
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {k: v for k, v in tok.get_vocab().items() if k not in (cf.IM_START, cf.IM_END, cf.PAD)}
        vocab = {k: i for i, k in enumerate(sorted(vocab, key=vocab.get))}
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.add_special_tokens([cf.EOS])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=cf.EOS)
        assert cf.adapt_pretrained_tokenizer(tok) == "eos"
    return tok


def _bert(tmp_path_factory):
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    chars = sorted(set("".join(WORDS) + "You are terse. hi there Hello! be brief 简短?") - {" ", "\n"})
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n", "utf-8")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    assert cf.adapt_pretrained_tokenizer(tok) == "sep"
    return tok


@pytest.fixture(scope="module", params=["char", "bpe", "eos", "sep", "none", "foreign"])
def tok(request, tmp_path_factory):
    if request.param == "char":
        return fixtures.char_tokenizer()
    if request.param == "bpe":
        return _bpe(with_chatml=True)
    if request.param == "eos":
        return _bpe(with_chatml=False)
    if request.param == "sep":
        return _bert(tmp_path_factory)
    t = fixtures.char_tokenizer()
    t.chat_template = None if request.param == "none" else FOREIGN_TEMPLATE
    return t


def test_ids_and_masks_equal_the_previous_implementation(tok):
    for conv in corpus():
        full, _ = old_render(tok, conv)
        for max_tokens in (None, len(full), len(full) - 1, len(full) // 2, 7, 1):
            for train_on_prompt in (False, True):
                expected = old_render(tok, conv, max_tokens=max_tokens, train_on_prompt=train_on_prompt)
                got = cf.render(tok, conv, max_tokens=max_tokens, train_on_prompt=train_on_prompt)
                assert got == expected, (conv, max_tokens, train_on_prompt)


def test_own_templates_take_the_linear_path(tok, monkeypatch):
    """owngpt's own templates never render prefixes nor fall back to dropping one turn at a time: at most three
    tokenizations per conversation whatever its length (the foreign template keeps the general path)."""
    if cf._own_template(tok) is None:
        pytest.skip("a foreign template takes the general path")
    calls = {"render": 0}
    render_exact = cf._render_exact

    def counting(*args, **kwargs):
        calls["render"] += 1
        return render_exact(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the general path was taken")

    monkeypatch.setattr(cf, "_render_exact", counting)
    monkeypatch.setattr(cf, "_render_dropping_turns", refuse)
    monkeypatch.setattr(cf, "_template_text", refuse)
    conv = [{"role": "system", "content": "be brief"}]
    for i in range(30):
        conv += [{"role": "user", "content": f"q{i} 床前"}, {"role": "assistant", "content": f"a{i} 明月光"}]
    full, _ = old_render(tok, conv)
    for max_tokens in (None, len(full) // 2, len(full) // 7, 3):
        calls["render"] = 0
        assert cf.render(tok, conv, max_tokens=max_tokens) == old_render(tok, conv, max_tokens=max_tokens)
        assert calls["render"] <= 3, (max_tokens, calls)
