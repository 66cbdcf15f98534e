"""Request limits checked before anything is parsed by the app or tokenized: body size (413), prompt length (400).

A plain ASGI middleware, so that it runs before FastAPI reads the body into a model and before the route
tokenizes: a 20 MB request used to take 27 s to refuse (pydantic parsing, then tokenizing on the event loop)
and stalled every other request, `/health` included. Here:

  - a `Content-Length` above `max_body_bytes` is answered 413 at once, before a byte of the body is read; a
    chunked body is counted while it arrives and cut off with 413 as soon as it passes the limit;
  - a JSON body within the limit is parsed once (milliseconds for 2 MB) and its prompt text measured: text longer
    than `max_prompt_chars` cannot fit the model's context whatever it tokenizes to, so it gets 400 before the
    tokenizer sees it (a completion prompt, a classification input, a chat's system message; a chat's turns are
    cut to the latest that fit instead, by length before tokenizing: owngpt.conversation). The bound is exact, not a guess: no token covers more characters than the vocabulary's
    longest token (`prompt_char_limit`), so a text of more than context x longest characters has more tokens
    than the context holds. (For owngpt's tokenizers, which do not normalize text; a Hub tokenizer whose normalizer
    deletes characters could fit a longer prompt made mostly of deleted characters, which is refused here.)

Errors have OpenAI's shape, like the app's own. Not here: authentication, rate limits (the app and its engine).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 2 << 20  # 2 MiB: far above any prompt a context of a few thousand tokens can hold
# Where the prompt text of each route lives in the request body (OpenAI's fields).
PROMPT_ROUTES = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/classify": "input"}


def prompt_char_limit(tokenizer: Any, context_tokens: int | None) -> int | None:
    """The most characters a prompt can have and still fit `context_tokens` tokens (None: no bound known).

    Every token of a byte-level or char vocabulary stands for at most `len(token)` characters of text (a
    byte-level token's string has one character per byte, and a character is at least one byte), so a text of
    more than context x longest characters needs more tokens than the context holds.
    """
    if not context_tokens or tokenizer is None:
        return None
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    except (AttributeError, TypeError):
        return None
    return context_tokens * max(longest, 1) if longest else None


def _error(status: int, message: str, code: str, param: str | None = None) -> bytes:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return json.dumps(body).encode("utf-8")


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _prompt_chars(payload: Any, field: str) -> int:
    """Characters of prompt text in a request body that must fit whole: the system messages' contents (a chat's
    other turns are cut to the context by owngpt.conversation, by their length first, so a long conversation is
    answered from its latest turns, not refused), the prompt(s), or the input(s)."""
    value = payload.get(field) if isinstance(payload, dict) else None
    if field == "messages" and isinstance(value, list):
        total = 0
        for m in value:
            kept = isinstance(m, dict) and m.get("role") in ("system", "developer")
            content = m.get("content") if kept else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(
                    len(p.get("text", "")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
        return total
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):  # several prompts: each is its own row, the longest decides
        return max((len(v) for v in value if isinstance(v, str)), default=0)
    return 0


class RequestLimits:
    """ASGI middleware: 413 above `max_body_bytes`, 400 for prompt text above `max_prompt_chars`."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_chars: int | None = None):
        self.app, self.max_body_bytes, self.max_prompt_chars = app, max_body_bytes, max_prompt_chars

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_big = _error(
            413,
            f"the request body is larger than this server accepts ({limit:,} bytes); send a shorter prompt",
            "request_too_large",
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _respond(send, 400, _error(400, "invalid Content-Length header", "invalid_request"))
                return
            if declared > limit:  # refused before reading a byte of it
                await _respond(send, 413, too_big)
                return
        chunks, size = [], 0
        while True:  # read the (bounded) body here, counting: a chunked body has no Content-Length to trust
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _respond(send, 413, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        payload = None
        if body[:1] in (b"{", b"[") or body.lstrip()[:1] in (b"{", b"["):
            try:
                payload = json.loads(body)
            except RecursionError:  # json recurses per level; 2 MB of '[' would reach the app as a 500
                await _respond(send, 400, _error(400, "the JSON body is nested too deeply", "invalid_json"))
                return
            except ValueError:
                payload = None  # malformed JSON: the app answers it in its usual way
        field = PROMPT_ROUTES.get(scope.get("path", ""))
        if field is not None and self.max_prompt_chars is not None:
            n = _prompt_chars(payload, field)
            if n > self.max_prompt_chars:
                msg = (
                    f"the {field} has {n:,} characters, more than this model's context can hold whatever they "
                    f"tokenize to (at most {self.max_prompt_chars:,}); shorten it"
                )
                await _respond(send, 400, _error(400, msg, "context_length_exceeded", field))
                return
        sent = False

        async def replay() -> Message:  # the app reads the body we already hold, then waits as usual
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
