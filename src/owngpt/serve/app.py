"""The HTTP side of `owngpt serve`: an OpenAI-compatible API (FastAPI) and the web chat page.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streaming as server-sent events
ending with `data: [DONE]`), `POST /v1/classify` (classification checkpoints), `GET /health` (no key needed),
`GET /openapi.json`, and the chat page at `/` (static files: they hold no data, so they need no key either; the page
asks for the key and sends it with each API call).

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx status (as OpenAI's), including FastAPI's
validation errors (400 naming the field instead of its default 422) and invalid JSON; an unexpected failure is a
500 in the same shape without a traceback. The API key is compared in constant time (`hmac.compare_digest`).

Generation itself is `owngpt.serve.engine`: requests become rows on a bounded queue, decoded by a worker thread with
continuous batching. A conversation becomes a prompt in `owngpt.conversation` (the same function as `owngpt chat` and
`Model.chat`): a long one keeps its system message and latest turns, and a reply ends with finish_reason "length" at
the model's trained context. /v1/completions continues text of any length (the window slides past the context).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from owngpt import conversation
from owngpt.serve import schemas as S
from owngpt.serve.engine import Loaded, QueueFull, Row, RowSettings, load
from owngpt.serve.limits import RequestLimits, prompt_char_limit

log = logging.getLogger("owngpt.serve")
STATIC = Path(__file__).parent / "static"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error answered in OpenAI's shape."""

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

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": S.ErrorResponse, "description": desc}
    for code, desc in (
        (400, "Bad request"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (429, "Queue full: retry later"),
    )
}


def model_id_for(path: Path) -> str:
    """A readable model id: the checkpoint dir's name, with its run's name when the dir is checkpoints/last etc."""
    path = path.resolve()
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def create_app(
    ckpt: str | Path | None = None,
    api_key: str | None = None,
    *,
    max_batch_size: int = 16,
    max_queue: int = 256,
    batch_wait_ms: float = 20.0,
    model_name: str | None = None,
    loaded: Loaded | None = None,
    continuous: bool = True,
    device: Any = None,
) -> FastAPI:
    """The FastAPI app serving checkpoint `ckpt` (or an already `loaded` one). `api_key=None` disables the check."""
    if loaded is None:
        if ckpt is None:
            raise ValueError("create_app needs a checkpoint path or a loaded model")
        loaded = load(
            ckpt,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            batch_wait_ms=batch_wait_ms,
            continuous=continuous,
            device=device,
        )
    model_id = model_name or model_id_for(loaded.path)
    created = int(time.time())
    tok = loaded.tokenizer
    engine = loaded.engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.start()
        yield
        if engine is not None:
            engine.close()

    app = FastAPI(
        title="owngpt",
        version=_version(),
        description="OpenAI-compatible API of an owngpt checkpoint. Send `Authorization: Bearer KEY`.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; the schema is at /openapi.json
        redoc_url=None,
        openapi_url=None,  # served below, behind the key
    )
    # body size (413) and prompt length (400) are refused before parsing or tokenizing: owngpt.serve.limits
    ctx = engine.context_length if engine is not None else None
    max_prompt_chars = prompt_char_limit(tok, ctx)
    app.add_middleware(RequestLimits, max_prompt_chars=max_prompt_chars)

    # --- errors in OpenAI's shape ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, "internal server error (see the server log)", type="server_error").response()

    # --- auth ------------------------------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="The server's --api-key")

    def check_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        given = creds.credentials if creds is not None else ""
        # constant time: the comparison must not reveal how many leading characters were right
        if not hmac.compare_digest(given.encode("utf-8"), api_key.encode("utf-8")):
            raise APIError(
                401,
                "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with "
                "the server's --api-key.",
                param=None,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    auth = [Depends(check_key)]

    # --- routes ---------------------------------------------------------------------------------------------
    @app.get("/health", response_model=S.Health, tags=["server"])
    async def health() -> dict[str, Any]:
        st = engine.stats if engine is not None else None
        return {
            "status": "ok",
            "model": model_id,
            "task": loaded.task,
            "mode": loaded.mode,
            "context": engine.context_length if engine is not None else None,
            "queued": st.queued if st else 0,
            "running": st.running if st else 0,
            "batches": st.batches if st else 0,
            "rows_cancelled": st.rows_cancelled if st else 0,
            "max_batch_seen": st.max_batch_seen if st else 0,
            "rows_done": st.rows_done if st else 0,
        }

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/v1/models", dependencies=auth, response_model=S.ModelList, responses=ERROR_RESPONSES, tags=["openai"])
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "owngpt"}],
        }

    @app.get(
        "/v1/models/{model:path}",
        dependencies=auth,
        response_model=S.ModelCard,
        responses=ERROR_RESPONSES,
        tags=["openai"],
    )
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "owngpt"}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(
                404,
                f"The model '{name}' does not exist: this server serves '{model_id}' (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def need_engine() -> None:
        if engine is None:
            raise APIError(
                400,
                f"'{model_id}' is a classification checkpoint (owngpt.json task 'classify'): it "
                'labels text and cannot generate. Use POST /v1/classify with {"input": ...}.',
                param="model",
                code="unsupported_model_task",
            )

    @app.post(
        "/v1/chat/completions",
        dependencies=auth,
        responses={200: {"model": S.ChatCompletion, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
        tags=["openai"],
    )
    async def chat_completions(req: S.ChatCompletionRequest, request: Request) -> Any:
        need_engine()
        check_model(req.model)
        check_unsupported(req)
        if req.tools:
            raise APIError(400, "tools are not supported by owngpt serve", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        max_tokens = req.max_completion_tokens or req.max_tokens
        ctx = engine.context_length
        # One conversation-to-prompt function for every front end; the reply never slides past the context.
        prompt = conversation.conversation_prompt(
            tok,
            messages,
            chat=loaded.chat_template,
            max_tokens=conversation.reply_budget(ctx, max_tokens or ctx),
            eos_ids=eos_ids(),
            max_chars=max_prompt_chars,  # a long conversation is cut by length before the tokenizer sees it
        )
        ids = prompt.ids
        settings = row_settings(req, max_tokens, None, prompt.stop_ids, prompt.stop, slide=False)
        rows = [Row(ids, s) for s in per_choice(settings, req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        usage_prompt = len(ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(stream_chat(rid, rows, await submit(rows), usage_prompt, include_usage))
        await run_to_end(rows, request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": finish(r),
                "logprobs": None,
            }
            for i, r in enumerate(rows)
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": choices,
            "usage": usage(usage_prompt, rows),
            "system_fingerprint": None,
        }

    @app.post(
        "/v1/completions",
        dependencies=auth,
        responses={200: {"model": S.Completion, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
        tags=["openai"],
    )
    async def completions(req: S.CompletionRequest, request: Request) -> Any:
        need_engine()
        check_model(req.model)
        check_unsupported(req)
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by owngpt serve", param="suffix")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        rows: list[Row] = []
        prompt_tokens = 0
        for p in prompts:
            ids = encode(p) or [tok.eos_token_id]  # an empty prompt samples from the start of a document
            prompt_tokens += len(ids)
            settings = row_settings(req, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, eos_ids(), (), slide=True)
            rows += [Row(ids, s) for s in per_choice(settings, req.n)]
        echoes = [prompts[i // req.n] if req.echo else "" for i in range(len(rows))]
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(stream_completion(rid, rows, await submit(rows), echoes, prompt_tokens, include_usage))
        await run_to_end(rows, request)
        choices = [
            {"index": i, "text": echoes[i] + r.text, "finish_reason": finish(r), "logprobs": None}
            for i, r in enumerate(rows)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": choices,
            "usage": usage(prompt_tokens, rows),
        }

    @app.post(
        "/v1/classify", dependencies=auth, response_model=S.ClassifyResponse, responses=ERROR_RESPONSES, tags=["owngpt"]
    )
    async def classify(req: S.ClassifyRequest) -> dict[str, Any]:
        check_model(req.model)
        if loaded.classifier is None:
            raise APIError(
                400,
                f"'{model_id}' is a {loaded.task} checkpoint, not a classifier: use "
                "/v1/completions or /v1/chat/completions",
                param="model",
                code="unsupported_model_task",
            )
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        results = await asyncio.to_thread(loaded.classifier.classify, texts)
        n_tokens = sum(len(encode(t)) for t in texts)
        return {
            "object": "list",
            "model": model_id,
            "data": [{"index": i, **r} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": n_tokens, "completion_tokens": 0, "total_tokens": n_tokens},
        }

    # --- the chat page ------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --- helpers (closures over the loaded model) ---------------------------------------------------------------
    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def eos_ids() -> list[int]:
        from owngpt.generation import default_eos_ids

        return default_eos_ids(engine.model, tok)

    def row_settings(
        req: S._Sampling,
        max_tokens: int | None,
        default_max: int | None,
        stop_ids: Sequence[int],
        extra_stop: Sequence[str],
        slide: bool,
    ) -> RowSettings:
        # Any length: a completion's window slides past the context; a chat reply ends at the context ("length").
        ctx = engine.context_length
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

    def per_choice(settings: RowSettings, n: int) -> list[RowSettings]:
        # choice i of a seeded request uses seed + i: n different samples, all reproducible
        if settings.seed is None:
            return [settings] * n
        return [dataclasses.replace(settings, seed=(settings.seed + i) % 2**63) for i in range(n)]

    async def submit(rows: list[Row]) -> asyncio.Queue:
        """Queue `rows`; return an asyncio queue receiving (row index, text piece, finished) from the worker."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(rows):
            r.on_event = lambda row, piece, fin, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, piece, fin))
        try:
            engine.submit(rows)
        except QueueFull as e:
            raise APIError(
                429,
                f"The server is busy: {e}. Retry in a moment.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from e
        return events

    async def run_to_end(rows: list[Row], request: Request) -> None:
        """Wait until every row ends; a client that disconnects meanwhile cancels its rows."""
        events = await submit(rows)
        gone = asyncio.create_task(wait_disconnect(request))
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

    async def stream_chat(
        rid: str, rows: list[Row], events: asyncio.Queue, n_prompt: int, include_usage: bool
    ) -> AsyncIterator[str]:
        created_at = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created_at,
                "model": model_id,
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
        if include_usage:
            yield chunk([], usage=usage(n_prompt, rows))
        yield "data: [DONE]\n\n"

    async def stream_completion(
        rid: str, rows: list[Row], events: asyncio.Queue, echoes: list[str], n_prompt: int, include_usage: bool
    ) -> AsyncIterator[str]:
        created_at = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            obj = {
                "id": rid,
                "object": "text_completion",
                "created": created_at,
                "model": model_id,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        for i, echo in enumerate(echoes):
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
        if include_usage:
            yield chunk([], usage=usage(n_prompt, rows))
        yield "data: [DONE]\n\n"

    def sse(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app


async def wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body was read already, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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


def validation_error(errors: Sequence[Any]) -> APIError:
    """FastAPI's validation errors as one OpenAI-style 400 naming the first bad field."""
    if not errors:
        return APIError(400, "invalid request")
    e = errors[0]
    # A union field (str | list[str]) reports one error per branch; a broken constraint ("List should have at
    # least 1 item") says more than "Input should be a valid string", so prefer it for the same field.
    same_field = [x for x in errors if x.get("loc", ())[:2] == e.get("loc", ())[:2]]
    e = next((x for x in same_field if not str(x.get("type", "")).endswith("_type")), e)
    if e.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON ({e.get('msg', '')}).", code="invalid_json")
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if not loc and e.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return APIError(
            400,
            "The request body must be a JSON object sent with 'Content-Type: application/json'.",
            code="invalid_body",
        )
    # drop pydantic's union-branch names ("str", "list[str]"), keep field names and list indices
    parts: list[str] = []
    for x in loc:
        if x.isdigit():
            parts.append(f"[{x}]")
        elif "[" in x or x in ("str", "int", "float", "bool", "function-after", "constrained-str"):
            continue
        else:
            parts.append(("." if parts else "") + x)
    param = "".join(parts) or None
    msg = e.get("msg", "invalid value")
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"Invalid value for {where}: {msg}.", param=param, code="invalid_value")


def _version() -> str:
    from owngpt import __version__

    return __version__
