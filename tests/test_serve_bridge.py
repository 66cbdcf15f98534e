"""`owngpt.serve.bridge` without HTTP: an OpenAI request to engine rows (prompt, a long chat trimmed to the context,
sampling settings, stop strings, seeds), rows to answers (usage counts, echo, finish reasons) and to server-sent
event chunks, and a client that leaves. The HTTP side (routes, auth, error shape) is tested in test_serve.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from owngpt.conversation import PLAIN_STOPS
from owngpt.serve import schemas as S
from owngpt.serve.bridge import APIError, Bridge, Job
from owngpt.serve.engine import Row, RowSettings, load

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load(tiny_ckpt, max_queue=4)  # a plain LM (task lm): a chat is a User:/Bot: transcript


@pytest.fixture
def bridge(loaded):
    return Bridge(loaded, "m")


def chat(**kw) -> S.ChatCompletionRequest:
    return S.ChatCompletionRequest(**{"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def completion(**kw) -> S.CompletionRequest:
    return S.CompletionRequest(**{"model": "m", "prompt": "ROMEO:", **kw})


def test_a_long_chat_keeps_its_system_message_and_the_latest_turns_that_fit(bridge):
    ctx = bridge.context_length
    assert ctx == 128  # the tiny checkpoint's position table; its char tokenizer: one token per ASCII character
    turns = []
    for i in range(30):  # far more than the context holds
        turns += [{"role": "user", "content": f"question {i:02d}"}, {"role": "assistant", "content": f"answer {i:02d}"}]
    messages = [{"role": "developer", "content": "Be brief."}, *turns, {"role": "user", "content": "last one?"}]
    # max_completion_tokens is the newer name of max_tokens and wins over it
    job = bridge.chat_job(chat(messages=messages, max_completion_tokens=8, max_tokens=1, temperature=0))

    ids = job.rows[0].prompt_ids
    text = bridge.tok.decode(ids)
    # the developer message is the system message: kept first; the kept history opens with the user
    assert text.startswith("Be brief.\nUser: question ")
    assert text.endswith("\nUser: last one?\nBot:")
    assert "question 00" not in text
    # the prompt leaves room for the 8 tokens of the reply, and fills the rest: one more turn pair would not fit
    pair = len("User: question 00\nBot: answer 00\n")
    assert ctx - 8 - pair < len(ids) <= ctx - 8
    assert job.prompt_tokens == len(ids)
    s = job.rows[0].settings
    assert s.max_tokens == 8
    assert not s.slide and s.lstrip  # a chat reply ends at the context and starts with its first word
    assert s.stop == PLAIN_STOPS  # a plain model's reply ends where it writes the user's next line


def test_openai_sampling_fields_become_row_settings(bridge):
    eos = frozenset(bridge.eos_ids())
    assert eos
    # stop strings: a string or a list, empty ones dropped, the chat mode's own after them; n choices of a seeded
    # request are seeded seed + i (modulo 2**63, so a negative seed or one near the top still works)
    job = bridge.chat_job(chat(stop="x", seed=-1, n=3))
    assert [r.settings.seed for r in job.rows] == [2**63 - 1, 0, 1]
    assert [r.settings.stop for r in job.rows] == [("x", *PLAIN_STOPS)] * 3
    assert all(r.settings.stop_ids == eos for r in job.rows)
    assert all(r.prompt_ids == job.rows[0].prompt_ids for r in job.rows)
    assert job.rid.startswith("chatcmpl-") and len(job.rid) == len("chatcmpl-") + 24

    s = bridge.completion_job(completion(stop=["ab", ""], top_p=0, temperature=1.5)).rows[0].settings
    assert s.stop == ("ab",)  # a completion has no stop strings of its own
    assert (s.temperature, s.top_p) == (0.0, 1.0)  # top_p 0: only the most likely token, greedy
    assert s.max_tokens == 16 and s.slide and not s.lstrip  # OpenAI's default length; the window slides
    assert s.seed is None and s.stop_ids == eos

    s = bridge.completion_job(completion(ignore_eos=True, max_tokens=40, top_p=0.5)).rows[0].settings
    assert s.stop_ids == frozenset() and s.max_tokens == 40 and (s.temperature, s.top_p) == (1.0, 0.5)
    # without a seed, n choices share one settings object (each row still samples on its own generator)
    job = bridge.completion_job(completion(n=2))
    assert [r.settings.seed for r in job.rows] == [None, None]
    # a chat without max_tokens may run to the end of the context
    assert bridge.chat_job(chat()).rows[0].settings.max_tokens == bridge.context_length


def test_usage_counts_each_prompt_once_and_every_choices_tokens(bridge, loaded):
    job = bridge.completion_job(
        completion(prompt=["ROMEO:", "ab"], n=2, max_tokens=3, ignore_eos=True, temperature=0, echo=True)
    )
    assert len(job.rows) == 4 and job.prompt_tokens == len("ROMEO:") + len("ab")
    loaded.engine.run_batch(job.rows)  # decoded in this thread: the worker is not running
    body = bridge.completion_response(job)
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 4
    # echo: each choice starts with its own prompt; greedy: both choices of a prompt are the same text
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] == "ROMEO:" + job.rows[0].text and texts[2] == texts[3] == "ab" + job.rows[2].text
    assert (body["object"], body["model"], body["id"]) == ("text_completion", "m", job.rid)

    job = bridge.chat_job(chat(n=2, max_tokens=2, ignore_eos=True, temperature=0))
    loaded.engine.run_batch(job.rows)
    body = bridge.chat_response(job)
    n_prompt = len(job.rows[0].prompt_ids)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 4, "total_tokens": n_prompt + 4}
    assert [c["message"]["role"] for c in body["choices"]] == ["assistant"] * 2


def finished_row(text: str, n_tokens: int, reason: str, error: str | None = None) -> Row:
    row = Row([1, 2], RowSettings(max_tokens=9))
    row.text, row.token_ids, row.finish_reason, row.error = text, list(range(n_tokens)), reason, error
    return row


def collect(stream) -> list[str]:
    async def go():
        return [c async for c in stream]

    return asyncio.run(go())


def events_of(*items) -> asyncio.Queue:
    q: asyncio.Queue = asyncio.Queue()
    for it in items:
        q.put_nowait(it)
    return q


def parse(chunks: list[str]) -> list:
    assert all(c.startswith("data: ") and c.endswith("\n\n") for c in chunks)
    return [c[6:-2] if c == "data: [DONE]\n\n" else json.loads(c[6:-2]) for c in chunks]


def test_chat_stream_chunks_in_openai_order_with_usage_last(bridge):
    rows = [finished_row("Hi there", 3, "length"), finished_row("Yo", 1, "cancelled")]
    job = Job("chatcmpl-abc", rows, prompt_tokens=5, include_usage=True)
    # the worker's events: (row index, text piece, finished), the rows interleaved as they decode
    events = events_of((0, "Hi", False), (1, "Yo", False), (0, " there", False), (1, "", True), (0, "", True))
    got = parse(collect(bridge.stream_chat(job, events)))
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert {(c["id"], c["object"], c["model"]) for c in chunks} == {("chatcmpl-abc", "chat.completion.chunk", "m")}
    assert len({c["created"] for c in chunks}) == 1 and all(c["system_fingerprint"] is None for c in chunks)
    choices = [c["choices"] for c in chunks]
    role = {"role": "assistant", "content": ""}
    assert choices == [
        [{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}],
        [{"index": 1, "delta": role, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}],
        [{"index": 1, "delta": {"content": "Yo"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " there"}, "logprobs": None, "finish_reason": None}],
        # a row cancelled (its client asked for less) reports "stop": OpenAI knows stop and length only
        [{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        [],
    ]
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert all("usage" not in c for c in chunks[:-1])

    # without stream_options.include_usage: no usage chunk
    rows = [finished_row("Hi", 1, "stop")]
    job = Job("chatcmpl-abc", rows, prompt_tokens=5)
    got = parse(collect(bridge.stream_chat(job, events_of((0, "Hi", False), (0, "", True)))))
    assert got[-1] == "[DONE]" and all("usage" not in c and c["choices"] for c in got[:-1])


def test_completion_stream_sends_echoes_first_and_a_failed_row_ends_it_with_an_error_event(bridge):
    rows = [finished_row("x", 1, "stop"), finished_row("", 0, "stop")]
    job = Job("cmpl-abc", rows, prompt_tokens=2, echoes=["ab", ""])
    got = parse(collect(bridge.stream_completion(job, events_of((0, "x", False), (0, "", True), (1, "", True)))))
    assert got[-1] == "[DONE]"
    assert [c["choices"] for c in got[:-1]] == [
        [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": None}],  # the echo, before any token
        [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}],
        [{"index": 1, "text": "", "logprobs": None, "finish_reason": "stop"}],
    ]
    assert {c["object"] for c in got[:-1]} == {"text_completion"}

    rows = [finished_row("", 0, "error", error="generation failed: boom"), finished_row("y", 1, "stop")]
    job = Job("cmpl-abc", rows, prompt_tokens=2, echoes=["", ""])
    got = parse(collect(bridge.stream_completion(job, events_of((1, "y", False), (0, "", True), (1, "", True)))))
    assert got[-1] == {
        "error": {"message": "generation failed: boom", "type": "server_error", "param": None, "code": None}
    }  # and no [DONE]: the stream failed
    assert all(r.cancelled for r in rows)  # the other row stops too


def test_a_client_that_leaves_cancels_its_rows(bridge, tiny_ckpt):
    # streaming: the server stops reading the generator (Starlette closes it when the client disconnects)
    rows = [finished_row("", 0, None), finished_row("", 0, None)]
    job = Job("chatcmpl-abc", rows, prompt_tokens=1)

    async def leave_after_first_piece():
        stream = bridge.stream_chat(job, events_of((0, "a", False)))
        got = [await anext(stream) for _ in range(3)]  # two role chunks, then the piece
        await stream.aclose()
        return got

    assert '"content": "a"' in asyncio.run(leave_after_first_piece())[-1]
    assert all(r.cancelled for r in rows)

    # not streaming: rows queued on an engine whose worker is not running; the client is gone at once
    waiting = Bridge(load(tiny_ckpt, max_queue=2), "m")
    job = waiting.completion_job(completion(max_tokens=2))

    async def gone() -> None:
        return None

    asyncio.run(waiting.run_to_end(job.rows, gone))
    assert all(r.cancelled for r in job.rows)
    # more rows than the queue holds: 429, all or none
    with pytest.raises(APIError) as e:
        asyncio.run(waiting.submit(waiting.completion_job(completion(n=3)).rows))
    assert (e.value.status, e.value.code, e.value.headers) == (429, "queue_full", {"Retry-After": "1"})


def test_wrong_model_unsupported_fields_and_a_classifier_are_refused_naming_the_field(bridge):
    cases = [
        (lambda: bridge.chat_job(chat(model="other")), 404, "model", "model_not_found"),
        (lambda: bridge.chat_job(chat(tools=[{}])), 400, "tools", None),
        (lambda: bridge.chat_job(chat(response_format={"type": "json_object"})), 400, "response_format", None),
        (lambda: bridge.chat_job(chat(presence_penalty=0.5)), 400, "presence_penalty", None),
        (lambda: bridge.completion_job(completion(frequency_penalty=-1)), 400, "frequency_penalty", None),
        (lambda: bridge.completion_job(completion(logprobs=1)), 400, "logprobs", None),
        (lambda: bridge.completion_job(completion(suffix="x")), 400, "suffix", None),
    ]
    for make, status, param, code in cases:
        with pytest.raises(APIError) as e:
            make()
        assert (e.value.status, e.value.param, e.value.code) == (status, param, code)
        assert e.value.body()["error"]["param"] == param
    bridge.completion_job(completion(logprobs=False, presence_penalty=0))  # asking for nothing is accepted
    bridge.chat_job(chat(response_format={"type": "text"}))
    with pytest.raises(APIError) as e:
        asyncio.run(bridge.classify(S.ClassifyRequest(input="x")))
    assert (e.value.status, e.value.code) == (400, "unsupported_model_task")
