"""The one place the chat format lives: messages -> text, token ids and the loss mask; MMI reversal.

owngpt's template is ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`). It is stored in every chat checkpoint
(`chat_template.jinja`, `tokenizer_config.json`) so that transformers' `apply_chat_template` renders exactly the text
owngpt trained on. Checkpoints that bring their own template (a local Qwen, say) keep theirs: `render` works with
any template that renders a conversation's prefix as a prefix of the whole, which is how chat templates are built.

The loss mask is derived from character spans and the tokenizer's offsets, so the ids are *exactly* what the
tokenizer gives for the rendered text. The text is encoded in segments cut at special tokens (`_encode`), which the
`tokenizers` library itself splits the text on before anything else, and only where the tokenizer's added tokens
guarantee the cut changes nothing (`_segment_rule`); otherwise as one string.
"""

from __future__ import annotations

import bisect
import json
import re
import weakref
from collections.abc import Sequence
from typing import Any

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Reserved in every tokenizer owngpt builds, so any data dir can later be used for chat fine-tuning.
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

Message = dict[str, str]


def sep_chat_template(cls_token: str | None, sep_token: str) -> str:
    """GPT2-chitchat's layout for BERT-style vocabularies (UER gpt2-chinese): `[CLS]u1[SEP]a1[SEP]u2[SEP]...`.

    Such vocabularies have no ChatML tokens and no EOS; [SEP] ends every turn (so the model learns to stop on it)
    and turns alternate user/assistant, as those models were trained. Roles are not written.
    """
    cls = json.dumps(cls_token or "")
    sep = json.dumps(sep_token)
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first -%}{{ " + cls + " }}{%- endif -%}"
        "{{ message['content'] + " + sep + " }}"
        "{%- endfor -%}"
    )


def eos_chat_template(eos_token: str) -> str:
    """ChatML with the tokenizer's own EOS closing each turn, for pretrained vocabularies without `<|im_end|>`
    (the model can then stop on a single token it already knows)."""
    eos = json.dumps(eos_token)
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + " + eos + " + '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def adapt_pretrained_tokenizer(tokenizer) -> str:
    """Give a pretrained tokenizer that has no chat template one written with tokens it already has.

    Its vocabulary cannot grow (new ids would need embedding rows the pretrained weights do not have), so:
    ChatML tokens present -> owngpt's template; BERT-style (a SEP token, no EOS) -> `sep_chat_template`, with SEP
    made the EOS; any other EOS -> `eos_chat_template`. A tokenizer with its own template keeps it.
    Returns which one it got ("own", "chatml", "sep", "eos", or "none").
    """
    if getattr(tokenizer, "chat_template", None):
        return "own"
    vocab = tokenizer.get_vocab()
    if IM_START in vocab and IM_END in vocab:
        tokenizer.chat_template = CHAT_TEMPLATE
        return "chatml"
    sep = getattr(tokenizer, "sep_token", None)
    if tokenizer.eos_token is None and sep is not None:
        tokenizer.eos_token = sep
        tokenizer.chat_template = sep_chat_template(getattr(tokenizer, "cls_token", None), sep)
        return "sep"
    if tokenizer.eos_token is not None:
        tokenizer.chat_template = eos_chat_template(tokenizer.eos_token)
        return "eos"
    return "none"


def render_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """owngpt's template in plain Python (tests check it equals the Jinja template in transformers)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def validate_messages(messages: Any, where: str = "conversation") -> list[Message]:
    """Check the {"role", "content"} shape; raise ValueError naming the problem (callers add file:line)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _template_text(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return render_text(messages, add_generation_prompt)


def _own_template(tokenizer) -> tuple[str, str, str] | None:
    """(head, end-of-turn, generation prompt) when the tokenizer's template is one of owngpt's own (which render
    message by message, so text and spans can be built in one pass in Python), else None.

    head is what opens the conversation ([CLS] for the [SEP] layout); each message then renders as
    `<|im_start|>role\ncontent` + end-of-turn + `\n` (ChatML, EOS-terminated) or `content[SEP]` ([SEP] layout).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template or template == CHAT_TEMPLATE:
        return ("", IM_END, "chatml")
    eos = getattr(tokenizer, "eos_token", None)
    if eos is not None and template == eos_chat_template(eos):
        return ("", eos, "chatml")
    sep = getattr(tokenizer, "sep_token", None)
    if sep is not None and template == sep_chat_template(getattr(tokenizer, "cls_token", None), sep):
        return (getattr(tokenizer, "cls_token", None) or "", sep, "sep")
    return None


def _own_text_and_spans(own: tuple[str, str, str], messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """One pass: the rendered text and each assistant reply's character span, exactly as `_assistant_spans` finds
    them by rendering prefixes (a reply's span starts after the prefix rendered with the generation prompt and ends
    with its end-of-turn marker and newline)."""
    head, end, layout = own
    parts: list[str] = []
    spans = []
    pos = 0
    for i, m in enumerate(messages):
        if layout == "chatml":
            opening = f"{IM_START}{m['role']}\n"
            piece = f"{opening}{m['content']}{end}\n"
            start = pos + len(f"{IM_START}assistant\n")  # the prefix + the generation prompt
        else:  # [SEP] layout: no roles, no generation prompt; [CLS] opens a non-empty conversation
            piece = (head if i == 0 else "") + m["content"] + end
            start = pos
        if m["role"] == "assistant":
            spans.append((start, pos + len(piece)))
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


def _assistant_spans(tokenizer, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant reply (content plus end-of-turn marker).

    owngpt's own templates: one pass (`_own_text_and_spans`). Any other template: the reply's span is found by
    rendering the conversation up to it (with the generation prompt) and through it, which works for every template
    that renders a prefix of the conversation as a prefix of the text; that is 2k+1 renders for k replies.
    """
    own = _own_template(tokenizer)
    if own is not None:
        return _own_text_and_spans(own, messages)
    full = _template_text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_template_text(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_template_text(tokenizer, messages[: i + 1]))
        spans.append((start, end))
    return full, spans


def render(
    tokenizer,
    messages: Sequence[Message],
    max_tokens: int | None = None,
    train_on_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = trained on) of a conversation.

    The mask covers the assistant replies, including their end-of-turn token, so the model learns to stop;
    `train_on_prompt` trains on every token. When `max_tokens` is given and the conversation is longer, the oldest
    turns are dropped first (a system message is kept); if the latest exchange alone is too long its start is cut.

    Time is linear in the conversation's length for owngpt's own templates: one render, one tokenization, and for
    `max_tokens` the turns to drop are found from the token offsets of that one tokenization (then checked by
    rendering the kept turns once). Other templates take the slower general path (`_render_dropping_turns`).
    """
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    own = _own_template(tokenizer)
    ids, mask, offsets = _render_exact(tokenizer, system + turns, train_on_prompt, with_offsets=True)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, mask
    if own is None:
        return _render_dropping_turns(tokenizer, system, turns, max_tokens, train_on_prompt, (ids, mask))
    # The first turns each drop leaves, in the order the general path tries them.
    starts = []
    j = 0
    while len(turns) - j > 2:
        j += 1
        while j < len(turns) and turns[j]["role"] == "assistant":  # a conversation should open with the user
            j += 1
        if j == len(turns):
            break
        starts.append(j)
    if not starts:
        return ids[-max_tokens:], mask[-max_tokens:]
    # Token counts of "system + turns[j:]" from the one tokenization: the tokens of the system message, plus those
    # from turn j's first character on. Own templates open each message with a special token or follow a special
    # token, so tokenization restarts there; the guess is checked below, and a wrong guess takes the general path.
    token_starts = [a for a, _b in offsets]
    char_starts, pos = [], 0
    for i, m in enumerate(system + turns):
        char_starts.append(pos)
        pos += len(_own_text_and_spans(own, [m])[0]) - (len(own[0]) if own[2] == "sep" and i > 0 else 0)
    n_system = bisect.bisect_left(token_starts, char_starts[len(system)]) if system else 0
    head_tokens = 0
    if own[2] == "sep" and not system:  # [CLS] opens whatever conversation is left
        head_tokens = bisect.bisect_left(token_starts, len(own[0])) if own[0] else 0
    for k, j in enumerate(starts):
        guess = (
            n_system + head_tokens + len(token_starts) - bisect.bisect_left(token_starts, char_starts[len(system) + j])
        )
        if guess > max_tokens and k + 1 < len(starts):
            continue
        ids2, mask2 = _render_exact(tokenizer, system + turns[j:], train_on_prompt)
        fits = len(ids2) <= max_tokens
        if k > 0:  # the previous candidate must really not fit, as the general path would have found
            prev = _render_exact(tokenizer, system + turns[starts[k - 1] :], train_on_prompt)
            if len(prev[0]) <= max_tokens:
                break
        if fits:
            return ids2, mask2
        if k + 1 == len(starts):
            return ids2[-max_tokens:], mask2[-max_tokens:]
        break
    return _render_dropping_turns(tokenizer, system, turns, max_tokens, train_on_prompt, (ids, mask))


def _render_dropping_turns(tokenizer, system, turns, max_tokens, train_on_prompt, first):
    """The general path: drop the oldest turn (and any assistant turns that would then open), render again."""
    ids, mask = first
    while True:
        if len(ids) <= max_tokens:
            return ids, mask
        if len(turns) > 2:
            turns = turns[1:]
            while turns and turns[0]["role"] == "assistant":  # a conversation should open with the user
                turns = turns[1:]
            if turns:
                ids, mask = _render_exact(tokenizer, system + turns, train_on_prompt)
                continue
        return ids[-max_tokens:], mask[-max_tokens:]


def _render_exact(tokenizer, messages: Sequence[Message], train_on_prompt: bool, with_offsets: bool = False):
    """(ids, mask) of the whole conversation, and the tokens' character offsets with `with_offsets`."""
    text, spans = _assistant_spans(tokenizer, messages)
    ids, offsets = _encode(tokenizer, text)
    mask = [1] * len(ids) if train_on_prompt else _span_mask(offsets, spans)
    return (ids, mask, offsets) if with_offsets else (ids, mask)


# --- Encoding in segments --------------------------------------------------------------------------------------
# `tokenizers` takes time that grows faster than the text when one string is very long (a conversation of thousands
# of turns: ~19 µs per turn at 100 turns, ~160 at 5,000). It first splits the text on its added tokens (leftmost,
# longest match) and then normalizes, pre-tokenizes and encodes each piece on its own, so cutting the text at the
# special tokens the chat templates put between messages and encoding the pieces in one `encode_batch` gives the
# same ids, in time linear in the turns. That holds only when a cut cannot change what is matched or how a piece is
# processed; `_segment_rule` checks the conditions and, failing any, the text is encoded whole as before.

_RULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PIECE_CHARS = (
    2048  # chars before a cut: 512-8192 measured flat (~17-21 µs/turn, 1k-20k turns); cutting at every token ~30
)


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _segment_rule(tokenizer) -> tuple[re.Pattern, dict[str, int]] | None:
    """(a pattern that finds the cut tokens, their ids), or None when the text must be encoded whole.

    A token is cut at when it is an added token that `tokenizers` matches in the raw text (normalized=False) and that
    strips nothing around it (lstrip/rstrip), needs no word boundary (single_word) and has no word character at its
    ends (so a single_word token next to it sees the same boundary either way), encodes alone to its one id, and
    that no other added token overlaps or contains (else the library could match across the cut). The tokenizer
    must split on special tokens (not `split_special_tokens`/`encode_special_tokens`; truncation or padding left
    on the backend is checked in `_encode`, per call), and a probe checks that pieces are processed alike wherever they stand (a Metaspace pre-tokenizer
    with prepend_scheme="first", say, treats the first piece differently: such a tokenizer is refused).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return None
    stamp = backend.get_vocab_size(with_added_tokens=True)
    try:
        cached = _RULES.get(tokenizer)
    except TypeError:  # not weak-referenceable: compute each time
        cached = None
    if cached is not None and cached[0] == stamp:
        return cached[1]
    rule = _compute_segment_rule(backend)
    try:
        _RULES[tokenizer] = (stamp, rule)
    except TypeError:
        pass
    return rule


def _compute_segment_rule(backend) -> tuple[re.Pattern, dict[str, int]] | None:
    if getattr(backend, "encode_special_tokens", False):
        return None
    added = backend.get_added_tokens_decoder()
    contents = [t.content for t in added.values()]

    def overlaps(x: str, t: str) -> bool:
        if t == x:
            return False
        if x in t:
            return True
        return any(t.endswith(x[:k]) or t.startswith(x[-k:]) for k in range(1, len(x)))

    cuts: dict[str, int] = {}
    for tid, t in added.items():
        x = t.content
        if t.normalized or t.lstrip or t.rstrip or t.single_word or not x:
            continue
        if _is_word_char(x[0]) or _is_word_char(x[-1]) or any(overlaps(x, c) for c in contents):
            continue
        enc = backend.encode(x, add_special_tokens=False)
        if enc.ids != [tid]:
            continue
        cuts[x] = tid
    if not cuts:
        return None
    pattern = re.compile("|".join(re.escape(x) for x in sorted(cuts, key=len, reverse=True)))
    for x in cuts:  # the probe: whole and in pieces must agree
        probe = f"a b{x}  c\n d{x}\n e 床{x}{x}f "
        whole = backend.encode(probe, add_special_tokens=False)
        if (whole.ids, [tuple(o) for o in whole.offsets]) != _encode_pieces(backend, pattern, cuts, probe, min_chars=0):
            return None
    return pattern, cuts


def _encode_pieces(
    backend, pattern: re.Pattern, cuts: dict[str, int], text: str, min_chars: int | None = None
) -> tuple[list[int], list]:
    """ids and character offsets of `text`: the cut tokens directly, the text between in one encode_batch.

    Cuts are made only once a piece has `min_chars` characters (default `_PIECE_CHARS`; the cut tokens inside a
    piece are matched by the library as usual): short pieces cost more in per-piece overhead than they save."""
    min_chars = _PIECE_CHARS if min_chars is None else min_chars
    pieces: list[tuple[int, str]] = []  # (start, text) of the text between cut tokens
    marks: list[tuple[int, int, int]] = []  # (start, end, id) of the cut tokens
    pos = 0
    for m in pattern.finditer(text):
        if m.start() - pos < min_chars:
            continue
        if m.start() > pos:
            pieces.append((pos, text[pos : m.start()]))
        marks.append((m.start(), m.end(), cuts[m.group()]))
        pos = m.end()
    if pos < len(text):
        pieces.append((pos, text[pos:]))
    encs = backend.encode_batch([p for _s, p in pieces], add_special_tokens=False) if pieces else []
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    k = 0
    for (start, _p), enc in zip(pieces, encs, strict=True):
        while k < len(marks) and marks[k][0] < start:
            ids.append(marks[k][2])
            offsets.append((marks[k][0], marks[k][1]))
            k += 1
        ids.extend(enc.ids)
        offsets.extend((a + start, b + start) for a, b in enc.offsets)
    for a, b, tid in marks[k:]:
        ids.append(tid)
        offsets.append((a, b))
    return ids, offsets


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text` (no special tokens added), as `tokenizer(text)` gives them."""
    # truncation or padding left on the backend by an earlier call would apply to each piece (checked per call:
    # transformers sets them on the shared backend and only resets them on its next call)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rule = None if backend is None or backend.truncation or backend.padding else _segment_rule(tokenizer)
    if rule is not None:
        return _encode_pieces(backend, rule[0], rule[1], text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _span_mask(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character lies in a span. Token starts never decrease, and spans are sorted and
    disjoint (checked; otherwise every span is tested per token), so one pointer walks both: linear time."""
    ordered = all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    mask = []
    k = 0
    prev = -1
    for start, _end in offsets:
        if not ordered or start < prev:
            return [int(any(s <= a < e for s, e in spans)) for a, _b in offsets]
        prev = start
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(int(k < len(spans) and spans[k][0] <= start))
    return mask


def prompt_ids(tokenizer, messages: Sequence[Message], max_tokens: int | None = None) -> list[int]:
    """Ids that ask the model for the next assistant reply, dropping the oldest turns to fit `max_tokens`."""
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        text = _template_text(tokenizer, system + turns, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_tokens is None or len(ids) <= max_tokens or len(turns) <= 1:
            return ids[-max_tokens:] if max_tokens else ids
        turns = turns[1:]


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant reply: end-of-turn and end-of-text, where the tokenizer has them."""
    out = []
    for tok in (IM_END, EOS, getattr(tokenizer, "eos_token", None)):
        if tok is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) and tid not in out:
            out.append(tid)
    return out


# --- MMI (maximum mutual information) reranking --------------------------------------------------------------
# The backward model reads a reply and then the history that led to it, latest turn first, utterances separated
# by EOS (GPT2-chitchat's layout). Its loss on the history is -log P(history | reply): the reranking score.


def mmi_pairs(messages: Sequence[Message]) -> list[tuple[str, list[str]]]:
    """(reply, history latest-first) for every assistant reply that has history before it."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        history = [h["content"] for h in messages[:i] if h["role"] != "system"]
        if history:
            out.append((m["content"], history[::-1]))
    return out


def render_mmi(
    tokenizer, reply: str, history_latest_first: Sequence[str], max_tokens: int | None = None
) -> tuple[list[int], list[int]]:
    """Ids `reply EOS h_latest EOS h_prev EOS ...` and a mask over the history part (what MMI scores)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    if not isinstance(eos, int) or eos == getattr(tokenizer, "unk_token_id", None):
        eos = tokenizer.eos_token_id

    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    ids = enc(reply) + [eos]
    mask = [0] * len(ids)
    for h in history_latest_first:
        piece = enc(h) + [eos]
        if max_tokens is not None and len(ids) + len(piece) > max_tokens:
            break  # older turns matter least: drop them, never the reply or the latest turn
        ids += piece
        mask += [1] * len(piece)
    if max_tokens is not None and len(ids) > max_tokens:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask
