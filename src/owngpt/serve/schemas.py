"""Request and response bodies of the OpenAI-compatible API, as pydantic models (they also make /openapi.json).

Field names, defaults and ranges follow OpenAI's API reference, so the official clients work unchanged. Fields that
OpenAI clients send but owngpt does not implement are accepted when they ask for nothing (logprobs false, penalties
0) and refused with a 400 naming the field otherwise, never silently ignored. `ignore_eos` is an extension (as in
vLLM) for benchmarks: generate exactly max_tokens tokens.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request; more is a batch job, not a request
MAX_STOP = 4  # as OpenAI
MAX_CLASSIFY_INPUTS = 256

StopField = Annotated[
    str | Annotated[list[str], Field(max_length=MAX_STOP)] | None,
    Field(description=f"Up to {MAX_STOP} strings; the text ends before the first one (not included)."),
]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do: clients add new optional fields all the time.
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Request):
    model: str = Field(description="A model id from GET /v1/models.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens to generate at most (default: what the context leaves for chat, 16 for completions).",
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling; default 1.")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate for each prompt.")
    stop: StopField = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Same seed and settings, same text.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    logprobs: Any = Field(None, description="Not supported: leave unset or false.")
    user: str | None = None
    ignore_eos: bool = Field(False, description="Extension: do not stop at end-of-text (benchmarks).")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens (wins if both).")
    tools: list[Any] | None = Field(None, description="Not supported.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'} is supported.")


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_N)] = Field(
        description="A text, or a list of texts (each gets n choices)."
    )
    echo: bool = Field(False, description="Return the prompt in front of the completion.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")


class ClassifyRequest(_Request):
    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CLASSIFY_INPUTS)]


# --- responses (documentation in /openapi.json; handlers build the same shapes) --------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "owngpt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Classification(BaseModel):
    index: int
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    task: str
    mode: str  # what the web page offers: "chat", "completion" (a plain language model) or "classify"
    context: int | None  # tokens the model reads at once (its trained context)
    queued: int
    running: int
    batches: int
    rows_cancelled: int
    max_batch_seen: int
    rows_done: int
