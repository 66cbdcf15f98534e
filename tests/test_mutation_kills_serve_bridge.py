"""owngpt.serve.bridge (#25): what the server says about itself when it serves a classifier, a request that names no
model, a generation request to a classifier, and the end of a request awaited whole (a failed row is the request's
error; the watcher of the client's disconnect is stopped once the rows end). Oracles: the engine's own stats, the
row's own error, OpenAI's error fields."""

from __future__ import annotations

import asyncio

import pytest

import fixtures
from owngpt.serve import schemas as S
from owngpt.serve.bridge import APIError, Bridge
from owngpt.serve.engine import Row, RowSettings, load

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load(tiny_ckpt, max_queue=4)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = fixtures.save_tiny_checkpoint(tmp_path_factory.mktemp("cls") / "cls", task="classify", num_labels=3)
    return Bridge(load(path), "c")


def test_health_reports_the_engines_counts_and_zeros_for_a_classifier(loaded, classifier):
    bridge = Bridge(loaded, "m")
    st = loaded.engine.stats
    h = bridge.health()
    assert (h["status"], h["model"], h["task"], h["context"]) == ("ok", "m", "lm", 128)
    assert [h[k] for k in ("queued", "running", "batches", "rows_cancelled", "max_batch_seen", "rows_done")] == [
        st.queued,
        st.running,
        st.batches,
        st.rows_cancelled,
        st.max_batch_seen,
        st.rows_done,
    ]
    h = classifier.health()
    assert (h["status"], h["model"], h["task"], h["context"]) == ("ok", "c", "classify", None)
    for k in ("queued", "running", "batches", "rows_cancelled", "max_batch_seen", "rows_done"):
        assert h[k] == 0, k  # a classifier has no engine: nothing queued or decoded, ever


def test_a_request_without_a_model_is_served_and_a_classifier_refuses_generation(classifier):
    classifier.check_model(None)  # OpenAI's model field is optional for /v1/classify: any name but another model's
    classifier.check_model("c")
    body = asyncio.run(classifier.classify(S.ClassifyRequest(input=["hi", "there"])))
    assert [d["index"] for d in body["data"]] == [0, 1] and body["model"] == "c"
    with pytest.raises(APIError) as e:
        classifier.check_model("m")
    assert (e.value.status, e.value.code) == (404, "model_not_found")
    for make in (
        lambda: classifier.chat_job(S.ChatCompletionRequest(model="c", messages=[{"role": "user", "content": "hi"}])),
        lambda: classifier.completion_job(S.CompletionRequest(model="c", prompt="hi")),
    ):
        with pytest.raises(APIError) as e:
            make()
        assert (e.value.status, e.value.param, e.value.code) == (400, "model", "unsupported_model_task")
        assert "/v1/classify" in e.value.message


class _FinishingEngine:
    """Stands in for the engine's worker: every row submitted ends at once, with the reason given."""

    def __init__(self, reasons):
        self.reasons = reasons

    def submit(self, rows):
        for r, (reason, error) in zip(rows, self.reasons, strict=True):
            r.finish(reason, error)


def test_a_request_awaited_whole_fails_with_its_rows_error_and_stops_watching_the_client(loaded):
    bridge = Bridge(loaded, "m")
    watching = []

    async def disconnected() -> None:  # the app's watcher: returns when the client leaves (never, here)
        watching.append("started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            watching.append("stopped")
            raise

    async def run(reasons):
        rows = [Row([1, 2], RowSettings(max_tokens=3)) for _ in reasons]
        bridge.engine = _FinishingEngine(reasons)
        try:
            await bridge.run_to_end(rows, disconnected)
        finally:
            bridge.engine = loaded.engine
            await asyncio.sleep(0)  # a cancelled watcher runs its handler now
            seen.append(list(watching))  # before asyncio.run's own clean-up cancels what is left
        return rows

    seen: list = []
    rows = asyncio.run(run([("length", None), ("stop", None)]))
    assert [r.finish_reason for r in rows] == ["length", "stop"]
    assert seen == [["started", "stopped"]]

    watching.clear()
    with pytest.raises(APIError) as e:
        asyncio.run(run([("stop", None), ("error", "generation failed: boom")]))
    assert (e.value.status, e.value.type, e.value.message) == (500, "server_error", "generation failed: boom")
    assert seen[-1] == ["started", "stopped"]


def test_a_classification_counts_its_input_tokens_and_no_completion_tokens(classifier):
    texts = ["hello there", "bye", ""]
    body = asyncio.run(classifier.classify(S.ClassifyRequest(input=texts)))
    tok = fixtures.char_tokenizer()  # the checkpoint's tokenizer, built again here: one token a character
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert n == len("hello there") + len("bye")
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
