"""From an OpenAI request to engine rows and back: the part of `owngpt serve` that knows no HTTP.

`owngpt.serve.app` holds the routes (FastAPI, auth, the error shape, the web page) and keeps them thin; this module
does what a request means, with plain functions and one object, `Bridge`, that the app holds in `app.state.bridge`:

- **prompts**: a chat's messages become one prompt through `owngpt.conversation` (the function `owngpt chat` and
  `Model.chat` use: a long conversation keeps its system message and latest turns, a reply ends with finish_reason
  "length" at the trained context); a completion's prompt is its text, any length (the window slides);
- **sampling settings**: OpenAI's fields as `RowSettings` (top_p 0 is greedy, stop strings with the chat mode's own,
  `ignore_eos`, choice i of a seeded request seeded seed + i);
- **the rows' way through the engine**: queued all or none (a full queue is 429), awaited to the end or streamed as
  server-sent event chunks; a client that leaves cancels its rows;
- **answers**: OpenAI's response bodies and chunks, with usage counts (prompt tokens once per prompt, completion
  tokens of every choice).

The split follows vLLM's OpenAI server: `api_server.py` holds the routes and finds its handlers in `app.state`;
`serving_chat.py` / `serving_completion.py` turn a request into engine calls and the results into response objects.
Errors are raised as `APIError` (OpenAI's fields and a status); the app answers them in OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from owngpt import conversation
from owngpt.generation import default_eos_ids
from owngpt.serve import schemas as S
from owngpt.serve.engine import Loaded, QueueFull, Row, RowSettings
from owngpt.serve.limits import prompt_char_limit

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type,
            param,
            code,
            headers,
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's rows on their way through the engine, and what its answer needs besides them."""

    rid: str  # the response id: chatcmpl-... or cmpl-...
    rows: list[Row]  # n choices per prompt, prompt by prompt
    prompt_tokens: int  # usage: each prompt counted once, whatever its n
    include_usage: bool = False  # streaming: a last chunk with the usage counts (stream_options.include_usage)
    echoes: list[str] = field(default_factory=list)  # completions: text in front of each choice (echo); chat: none


class Bridge:
    """The served checkpoint as the OpenAI API sees it: its model id, its engine (or classifier), its limits."""

    def __init__(self, loaded: Loaded, model_id: str) -> None:
        self.loaded = loaded
        self.model_id = model_id
        self.created = int(time.time())
        self.tok = loaded.tokenizer
        self.engine = loaded.engine
        # a prompt text longer than this cannot fit the context (owngpt.serve.limits): the app's middleware refuses
        # it before parsing; a chat's turns are cut by it before the tokenizer sees them
        self.max_prompt_chars = prompt_char_limit(self.tok, self.context_length)

    @property
    def context_length(self) -> int | None:
        return self.engine.context_length if self.engine is not None else None

    # --- facts about the server ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        engine = self.engine
        st = engine.stats if engine is not None else None
        return {
            "status": "ok",
            "model": self.model_id,
            "task": self.loaded.task,
            "mode": self.loaded.mode,
            "context": self.context_length,
            "queued": st.queued if st else 0,
            "running": st.running if st else 0,
            "batches": st.batches if st else 0,
            "rows_cancelled": st.rows_cancelled if st else 0,
            "max_batch_seen": st.max_batch_seen if st else 0,
            "rows_done": st.rows_done if st else 0,
        }

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "owngpt"}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    # --- checks ---------------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(
                404,
                f"The model '{name}' does not exist: this server serves '{self.model_id}' (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def need_engine(self) -> None:
        if self.engine is None:
            raise APIError(
                400,
                f"'{self.model_id}' is a classification checkpoint (owngpt.json task 'classify'): it "
                'labels text and cannot generate. Use POST /v1/classify with {"input": ...}.',
                param="model",
                code="unsupported_model_task",
            )

    # --- requests to rows -------------------------------------------------------------------------------------------
    def chat_job(self, req: S.ChatCompletionRequest) -> Job:
        """The rows answering a chat: one prompt from the conversation, `n` choices."""
        self.need_engine()
        self.check_model(req.model)
        check_unsupported(req)
        if req.tools:
            raise APIError(400, "tools are not supported by owngpt serve", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        max_tokens = req.max_completion_tokens or req.max_tokens
        ctx = self.engine.context_length
        # One conversation-to-prompt function for every front end; the reply never slides past the context.
        prompt = conversation.conversation_prompt(
            self.tok,
            messages,
            chat=self.loaded.chat_template,
            max_tokens=conversation.reply_budget(ctx, max_tokens or ctx),
            eos_ids=self.eos_ids(),
            max_chars=self.max_prompt_chars,  # a long conversation is cut by length before the tokenizer sees it
        )
        ids = prompt.ids
        settings = self.row_settings(req, max_tokens, None, prompt.stop_ids, prompt.stop, slide=False)
        rows = [Row(ids, s) for s in per_choice(settings, req.n)]
        return Job(f"chatcmpl-{uuid.uuid4().hex[:24]}", rows, len(ids), include_usage(req))

    def completion_job(self, req: S.CompletionRequest) -> Job:
        """The rows continuing each prompt, `n` choices each."""
        self.need_engine()
        self.check_model(req.model)
        check_unsupported(req)
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by owngpt serve", param="suffix")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        rows: list[Row] = []
        prompt_tokens = 0
        for p in prompts:
            ids = self.encode(p) or [self.tok.eos_token_id]  # an empty prompt samples from the start of a document
            prompt_tokens += len(ids)
            settings = self.row_settings(req, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, self.eos_ids(), (), True)
            rows += [Row(ids, s) for s in per_choice(settings, req.n)]
        echoes = [prompts[i // req.n] if req.echo else "" for i in range(len(rows))]
        return Job(f"cmpl-{uuid.uuid4().hex[:24]}", rows, prompt_tokens, include_usage(req), echoes)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def eos_ids(self) -> list[int]:

        return default_eos_ids(self.engine.model, self.tok)

    def row_settings(
        self,
        req: S._Sampling,
        max_tokens: int | None,
        default_max: int | None,
        stop_ids: Sequence[int],
        extra_stop: Sequence[str],
        slide: bool,
    ) -> RowSettings:
        # Any length: a completion's window slides past the context; a chat reply ends at the context ("length").
        ctx = self.engine.context_length
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0:  # the smallest set reaching p=0 is the single most likely token: greedy
            temperature = 0.0
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stops = tuple(s for s in [*stops, *extra_stop] if s)
        return RowSettings(
            max_tokens=max_tokens or default_max or ctx,
            temperature=temperature,
            top_p=top_p if top_p > 0 else 1.0,
            stop=stops,
            stop_ids=frozenset() if req.ignore_eos else frozenset(stop_ids),
            seed=None if req.seed is None else req.seed % 2**63,
            slide=slide,
            lstrip=not slide,  # a chat reply (after `Bot:` or a template) starts with its first word
        )

    # --- the rows through the engine ----------------------------------------------------------------------------
    async def submit(self, rows: list[Row]) -> asyncio.Queue:
        """Queue `rows`; return an asyncio queue receiving (row index, text piece, finished) from the worker."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(rows):
            r.on_event = lambda row, piece, fin, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, piece, fin))
        try:
            self.engine.submit(rows)
        except QueueFull as e:
            raise APIError(
                429,
                f"The server is busy: {e}. Retry in a moment.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from e
        return events

    async def run_to_end(self, rows: list[Row], disconnected: Callable[[], Awaitable[None]]) -> None:
        """Wait until every row ends; a client that disconnects meanwhile (`disconnected()` returns) cancels its
        rows."""
        events = await self.submit(rows)
        gone = asyncio.ensure_future(disconnected())
        try:
            left = len(rows)
            while left:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return  # the client left; `finally` cancels its rows
                left -= get.result()[2]
            raise_row_error(rows)
        finally:
            gone.cancel()
            for r in rows:
                r.cancel()  # no-op for finished rows

    # --- answers ----------------------------------------------------------------------------------------------------
    def chat_response(self, job: Job) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": finish(r),
                "logprobs": None,
            }
            for i, r in enumerate(job.rows)
        ]
        return {
            "id": job.rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": choices,
            "usage": usage(job.prompt_tokens, job.rows),
            "system_fingerprint": None,
        }

    def completion_response(self, job: Job) -> dict[str, Any]:
        choices = [
            {"index": i, "text": job.echoes[i] + r.text, "finish_reason": finish(r), "logprobs": None}
            for i, r in enumerate(job.rows)
        ]
        return {
            "id": job.rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": choices,
            "usage": usage(job.prompt_tokens, job.rows),
        }

    async def stream_chat(self, job: Job, events: asyncio.Queue) -> AsyncIterator[str]:
        """Server-sent events of a chat: a role chunk per choice, text deltas, a finish chunk per choice, the usage
        chunk if asked for, `data: [DONE]`. A failed row ends the stream with an error event."""
        rows = job.rows
        created_at = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            obj = {
                "id": job.rid,
                "object": "chat.completion.chunk",
                "created": created_at,
                "model": self.model_id,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        for i in range(len(rows)):
            yield chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        async for i, piece, fin in stream_events(rows, events):
            if piece:
                yield chunk([{"index": i, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])
            if fin:
                if rows[i].finish_reason == "error":
                    yield error_event(rows[i])
                    return
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish(rows[i])}])
        if job.include_usage:
            yield chunk([], usage=usage(job.prompt_tokens, rows))
        yield "data: [DONE]\n\n"

    async def stream_completion(self, job: Job, events: asyncio.Queue) -> AsyncIterator[str]:
        """Server-sent events of a completion: each echo, text pieces, a finish chunk per choice, the usage chunk if
        asked for, `data: [DONE]`. A failed row ends the stream with an error event."""
        rows = job.rows
        created_at = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            obj = {
                "id": job.rid,
                "object": "text_completion",
                "created": created_at,
                "model": self.model_id,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        for i, echo in enumerate(job.echoes):
            if echo:
                yield chunk([{"index": i, "text": echo, "logprobs": None, "finish_reason": None}])
        async for i, piece, fin in stream_events(rows, events):
            if piece:
                yield chunk([{"index": i, "text": piece, "logprobs": None, "finish_reason": None}])
            if fin:
                if rows[i].finish_reason == "error":
                    yield error_event(rows[i])
                    return
                yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": finish(rows[i])}])
        if job.include_usage:
            yield chunk([], usage=usage(job.prompt_tokens, rows))
        yield "data: [DONE]\n\n"

    # --- classification -------------------------------------------------------------------------------------------
    async def classify(self, req: S.ClassifyRequest) -> dict[str, Any]:
        self.check_model(req.model)
        classifier = self.loaded.classifier
        if classifier is None:
            raise APIError(
                400,
                f"'{self.model_id}' is a {self.loaded.task} checkpoint, not a classifier: use "
                "/v1/completions or /v1/chat/completions",
                param="model",
                code="unsupported_model_task",
            )
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        results = await asyncio.to_thread(classifier.classify, texts)
        n_tokens = sum(len(self.encode(t)) for t in texts)
        return {
            "object": "list",
            "model": self.model_id,
            "data": [{"index": i, **r} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": n_tokens, "completion_tokens": 0, "total_tokens": n_tokens},
        }


def include_usage(req: S._Sampling) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def per_choice(settings: RowSettings, n: int) -> list[RowSettings]:
    # choice i of a seeded request uses seed + i: n different samples, all reproducible
    if settings.seed is None:
        return [settings] * n
    return [dataclasses.replace(settings, seed=(settings.seed + i) % 2**63) for i in range(n)]


async def stream_events(rows: list[Row], events: asyncio.Queue) -> AsyncIterator[tuple[int, str, bool]]:
    try:
        left = len(rows)
        while left:
            i, piece, fin = await events.get()
            left -= fin
            yield i, piece, fin
    finally:  # also when the client disconnects: Starlette cancels this generator
        for r in rows:
            r.cancel()


def finish(row: Row) -> str:
    return row.finish_reason if row.finish_reason in ("stop", "length") else "stop"


def usage(n_prompt: int, rows: Sequence[Row]) -> dict[str, int]:
    completion = sum(len(r.token_ids) for r in rows)
    return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}


def raise_row_error(rows: Sequence[Row]) -> None:
    for r in rows:
        if r.finish_reason == "error":
            raise APIError(500, r.error or "generation failed", type="server_error")


def error_event(row: Row) -> str:
    body = {"error": {"message": row.error or "generation failed", "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n"


def check_unsupported(req: S._Sampling) -> None:
    """Refuse, naming the field, what owngpt does not implement (instead of silently ignoring it)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by owngpt serve (only 0)", param=name)
    if req.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported by owngpt serve", param="logprobs")
