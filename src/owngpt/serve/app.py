"""The HTTP side of `owngpt serve`: an OpenAI-compatible API (FastAPI) and the web chat page.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streaming as server-sent events
ending with `data: [DONE]`), `POST /v1/classify` (classification checkpoints), `GET /health` (no key needed),
`GET /openapi.json`, and the chat page at `/` (static files: they hold no data, so they need no key either; the page
asks for the key and sends it with each API call).

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx status (as OpenAI's), including FastAPI's
validation errors (400 naming the field instead of its default 422) and invalid JSON; an unexpected failure is a
500 in the same shape without a traceback. The API key is compared in constant time (`hmac.compare_digest`).

The routes are thin: what a request means (its prompt, sampling settings, rows on the engine, the answer and its
chunks) is `owngpt.serve.bridge`, whose `Bridge` the app holds in `app.state.bridge` (with the key in
`app.state.api_key`); routes get it as a dependency, as vLLM's api_server finds its serving_chat handler in
app.state. Generation itself is `owngpt.serve.engine`: requests become rows on a bounded queue, decoded by a worker
thread with continuous batching.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from owngpt.serve import schemas as S
from owngpt.serve.bridge import APIError, Bridge
from owngpt.serve.engine import Loaded, load
from owngpt.serve.limits import RequestLimits
from owngpt.version import __version__

log = logging.getLogger("owngpt.serve")
STATIC = Path(__file__).parent / "static"

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
    bridge = Bridge(loaded, model_name or model_id_for(loaded.path))
    app = FastAPI(
        title="owngpt",
        version=_version(),
        description="OpenAI-compatible API of an owngpt checkpoint. Send `Authorization: Bearer KEY`.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; the schema is at /openapi.json
        redoc_url=None,
        openapi_url=None,  # served below, behind the key
    )
    app.state.bridge = bridge
    app.state.api_key = api_key
    # body size (413) and prompt length (400) are refused before parsing or tokenizing: owngpt.serve.limits
    app.add_middleware(RequestLimits, max_prompt_chars=bridge.max_prompt_chars)
    # errors in OpenAI's shape
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine's worker thread runs while the app serves (an app used without its lifespan never decodes)."""
    engine = app.state.bridge.engine
    if engine is not None:
        engine.start()
    yield
    if engine is not None:
        engine.close()


# --- errors in OpenAI's shape ------------------------------------------------------------------------------------
def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(APIError(500, "internal server error (see the server log)", type="server_error"))


# --- auth and state ------------------------------------------------------------------------------------------------
bearer = HTTPBearer(auto_error=False, description="The server's --api-key")


def check_key(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    api_key = request.app.state.api_key
    if api_key is None:
        return
    given = creds.credentials if creds is not None else ""
    # constant time: the comparison must not reveal how many leading characters were right
    if not hmac.compare_digest(given.encode("utf-8"), api_key.encode("utf-8")):
        raise APIError(
            401,
            "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with the server's --api-key.",
            param=None,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def get_bridge(request: Request) -> Bridge:
    return request.app.state.bridge


auth = [Depends(check_key)]
BridgeDep = Annotated[Bridge, Depends(get_bridge)]
router = APIRouter()


# --- routes --------------------------------------------------------------------------------------------------------
@router.get("/health", response_model=S.Health, tags=["server"])
async def health(bridge: BridgeDep) -> dict[str, Any]:
    return bridge.health()


@router.get("/openapi.json", dependencies=auth, include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/v1/models", dependencies=auth, response_model=S.ModelList, responses=ERROR_RESPONSES, tags=["openai"])
async def list_models(bridge: BridgeDep) -> dict[str, Any]:
    return bridge.models()


@router.get(
    "/v1/models/{model:path}",
    dependencies=auth,
    response_model=S.ModelCard,
    responses=ERROR_RESPONSES,
    tags=["openai"],
)
async def get_model(model: str, bridge: BridgeDep) -> dict[str, Any]:
    bridge.check_model(model)
    return bridge.model_card()


@router.post(
    "/v1/chat/completions",
    dependencies=auth,
    responses={200: {"model": S.ChatCompletion, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
    tags=["openai"],
)
async def chat_completions(req: S.ChatCompletionRequest, request: Request, bridge: BridgeDep) -> Any:
    job = bridge.chat_job(req)
    if req.stream:
        return sse(bridge.stream_chat(job, await bridge.submit(job.rows)))
    await bridge.run_to_end(job.rows, lambda: wait_disconnect(request))
    return bridge.chat_response(job)


@router.post(
    "/v1/completions",
    dependencies=auth,
    responses={200: {"model": S.Completion, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
    tags=["openai"],
)
async def completions(req: S.CompletionRequest, request: Request, bridge: BridgeDep) -> Any:
    job = bridge.completion_job(req)
    if req.stream:
        return sse(bridge.stream_completion(job, await bridge.submit(job.rows)))
    await bridge.run_to_end(job.rows, lambda: wait_disconnect(request))
    return bridge.completion_response(job)


@router.post(
    "/v1/classify", dependencies=auth, response_model=S.ClassifyResponse, responses=ERROR_RESPONSES, tags=["owngpt"]
)
async def classify(req: S.ClassifyRequest, bridge: BridgeDep) -> dict[str, Any]:
    return await bridge.classify(req)


# --- the chat page ----------------------------------------------------------------------------------------------
@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def sse(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body was read already, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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

    return __version__
