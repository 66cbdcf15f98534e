"""The one place a conversation becomes a prompt: what the REPL, `Model.chat`, the API and the web page all send.

Two modes, decided by one rule (`is_chat_model`):
- **chat**: a chat-tuned checkpoint (owngpt.json task `chat`, or a Hugging Face dir without owngpt.json whose
  tokenizer brings a chat template) gets its chat template (owngpt.chat_format) and its reply ends at the end-of-turn
  token;
- **text**: a plain language model (task `lm`) continues a transcript of `User: ...` / `Bot: ...` lines and its reply
  ends where it starts the user's next line or at a blank line. It is a text continuer: the front ends say so.

Either way the prompt fits a budget (the context minus room for the reply) by the rule training uses
(chat_format.render): the system message stays, the oldest turns go first, a kept history opens with the user; if
the latest user turn alone is still too long, the start of that turn goes (never the system message).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from owngpt import chat_format

PLAIN_USER = "User:"
PLAIN_BOT = "Bot:"
# A plain model's reply ends where it starts writing the user's next line, or at a blank line (a paragraph break in
# most training text, e.g. between speeches in Tiny Shakespeare).
PLAIN_STOPS = ("\n" + PLAIN_USER, "\n\n")


def is_chat_model(meta: dict[str, Any], tokenizer: Any) -> bool:
    """Chat template for chat-tuned checkpoints; plain text for owngpt's language models (every tokenizer owngpt
    builds carries the template, so for owngpt checkpoints only the task counts); a Hugging Face dir without
    owngpt.json is a chat model when its tokenizer brings a template."""
    if meta:
        return meta.get("task") == "chat"
    return bool(getattr(tokenizer, "chat_template", None))


def mode_name(chat: bool) -> str:
    return "chat" if chat else "completion"


def plain_transcript(messages: Sequence[chat_format.Message]) -> str:
    """The plain-text rendering a plain language model continues (ends with `Bot:`)."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(m["content"])
        else:
            lines.append(f"{PLAIN_USER if m['role'] == 'user' else PLAIN_BOT} {m['content']}")
    return "\n".join(lines + [PLAIN_BOT])


@dataclass
class Prompt:
    ids: list[int]
    stop_ids: list[int]  # end-of-turn / end-of-text ids
    stop: list[str] = field(default_factory=list)  # stop strings the mode adds (plain transcripts)
    kept_messages: int = 0  # messages that fit (system included)


def _drop_by_chars(turns: list[chat_format.Message], budget: int) -> list[chat_format.Message]:
    """The turns the token rule below would keep at least, found by characters alone.

    Every token covers at most `longest` characters, so turns with more than max_tokens x longest characters of
    content (the template only adds to it) cannot fit: the loop below would drop them, by the same steps (oldest
    first, then leading assistant turns), and would cut the latest turn to no more than `budget` characters.
    """
    total = sum(len(m["content"]) for m in turns)
    while total > budget and len(turns) > 1:
        total -= len(turns[0]["content"])
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] == "assistant":
            total -= len(turns[0]["content"])
            turns = turns[1:]
    if total > budget and turns:
        text = turns[-1]["content"]
        turns = [{**turns[-1], "content": text[len(text) - max(budget, 0) :]}]
    return turns


def reply_budget(context: int, max_new_tokens: int) -> int:
    """Tokens the prompt may use: the context minus room for the reply (at most half the context is reserved)."""
    return max(1, context - min(max_new_tokens, context // 2))


def conversation_prompt(
    tokenizer: Any,
    messages: Sequence[chat_format.Message],
    *,
    chat: bool,
    max_tokens: int,
    eos_ids: Sequence[int],
    max_chars: int | None = None,
) -> Prompt:
    """Ids asking for the next assistant reply to `messages`, within `max_tokens` (see the module docstring).

    `eos_ids`: the model's end-of-text ids (plain mode); the chat mode ends on the template's end-of-turn ids.
    `max_chars`: a bound no text of `max_tokens` tokens reaches (owngpt.serve.limits.prompt_char_limit); with it,
    turns that cannot fit are dropped by their length before anything is tokenized (the server's guard against a
    huge conversation holding the event loop), with exactly the result of the token rule alone.
    """
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    if max_chars is not None:
        turns = _drop_by_chars(turns, max_chars - sum(len(m["content"]) for m in system))

    def encode(msgs: list[chat_format.Message]) -> list[int]:
        if chat:
            return list(chat_format.prompt_ids(tokenizer, msgs))
        return list(tokenizer(plain_transcript(msgs), add_special_tokens=False)["input_ids"])

    ids = encode(system + turns)
    while len(ids) > max_tokens and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] == "assistant":  # a kept history opens with the user
            turns = turns[1:]
        ids = encode(system + turns)
    if len(ids) > max_tokens and turns:
        # the latest turn alone is too long: drop the start of its text (binary search on characters)
        last = turns[-1]
        lo, hi = 0, len(last["content"])
        while lo < hi:
            mid = (lo + hi) // 2
            if len(encode(system + [{**last, "content": last["content"][mid:]}])) <= max_tokens:
                hi = mid
            else:
                lo = mid + 1
        turns = [{**last, "content": last["content"][lo:]}]
        ids = encode(system + turns)
    ids = ids[-max_tokens:]  # only when the system message alone is too long
    if chat:
        return Prompt(ids, chat_format.stop_token_ids(tokenizer), [], len(system) + len(turns))
    return Prompt(ids, list(eos_ids), list(PLAIN_STOPS), len(system) + len(turns))
