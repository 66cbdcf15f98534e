"""`owngpt serve`: the engine against transformers, then the real server in a subprocess driven by the official
`openai` client (sync, async, streaming), a schema fuzz run (schemathesis) and the chat page in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import fixtures

KEY = "test-key"
CTX = 512  # long enough for a stream to still be running when its client hangs up


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return fixtures.save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", n_positions=CTX)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """`python -m owngpt serve` on a free port; yields the base URL (http://127.0.0.1:PORT)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "OWNGPT_API_KEY": ""}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "owngpt",
                "serve",
                str(ckpt),
                "--port",
                str(port),
                "--api-key",
                KEY,
                "--threads",
                "1",
                "--log-level",
                "warning",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy in 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def _health(server) -> dict:
    return httpx.get(f"{server}/health", timeout=5).json()


# --- the engine, in process, against transformers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(ckpt):
    import torch

    from owngpt.serve.engine import load

    # one thread: a tiny model gains nothing from two, and the test machine is shared (the server runs --threads 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load(ckpt, max_queue=2)
    torch.set_num_threads(threads)


def _hf_greedy(loaded, prompt: str, n: int) -> str:
    import torch

    ids = torch.tensor([loaded.tokenizer.encode(prompt)])
    out = loaded.engine.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_engine_batched_greedy_equals_transformers_alone(loaded):
    """Rows of different lengths, left-padded into one batch, give what transformers gives each prompt alone."""
    from owngpt.serve.engine import Row, RowSettings

    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed", "A"]
    tok = loaded.tokenizer
    rows = [Row(tok.encode(p), RowSettings(max_tokens=24, temperature=0)) for p in prompts]
    loaded.engine.run_batch(rows)
    for p, r in zip(prompts, rows):
        assert r.text == _hf_greedy(loaded, p, 24)
        assert r.finish_reason == "length" and len(r.token_ids) == 24


def test_engine_seed_stop_and_cancel_are_per_row(loaded):
    from owngpt.serve.engine import Row, RowSettings

    tok = loaded.tokenizer
    seeded = RowSettings(max_tokens=20, temperature=1.0, top_p=0.9, seed=123)
    alone = Row(tok.encode("ROMEO:"), seeded)
    loaded.engine.run_batch([alone])
    # the same seed gives the same sample whatever shares the batch (each row has its own generator)
    crowd = [
        Row(tok.encode("ROMEO:"), seeded),
        Row(tok.encode("JULIET: Ay me"), RowSettings(max_tokens=5)),
        Row(tok.encode("x"), RowSettings(max_tokens=30, temperature=0)),
    ]
    loaded.engine.run_batch(crowd)
    assert crowd[0].text == alone.text and crowd[0].token_ids == alone.token_ids
    assert len(crowd[1].token_ids) == 5 and crowd[1].finish_reason == "length"
    # a stop string ends its row only, cut before the stop string
    full = crowd[2].text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stopped = Row(tok.encode("x"), RowSettings(max_tokens=30, temperature=0, stop=(stop,)))
    other = Row(tok.encode("x"), RowSettings(max_tokens=30, temperature=0))
    loaded.engine.run_batch([stopped, other])
    assert stopped.text == full[: full.find(stop)] and stopped.finish_reason == "stop"
    assert other.text == full
    # a cancelled row stops at the next token
    events = []
    cancelled = Row(
        tok.encode("x"),
        RowSettings(max_tokens=30, temperature=0),
        on_event=lambda row, piece, fin: (events.append(piece), len(events) == 3 and row.cancel()),
    )
    loaded.engine.run_batch([cancelled])
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 30


def test_queue_full_is_429_and_classifier_routes(loaded, tmp_path):
    """In process: a request bigger than the queue gets 429 in OpenAI's error shape; a classification checkpoint
    answers /v1/classify and refuses completions with a clear 400."""
    from fastapi.testclient import TestClient

    from owngpt.serve.app import create_app
    from owngpt.serve.engine import load

    auth = {"Authorization": f"Bearer {KEY}"}
    lm = TestClient(create_app(loaded=loaded, api_key=KEY, model_name="m"))  # no lifespan: the worker never runs
    r = lm.post("/v1/completions", json={"model": "m", "prompt": "hi", "n": 3}, headers=auth)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    r = lm.post("/v1/classify", json={"input": "hi"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"

    cls_path = fixtures.save_tiny_checkpoint(tmp_path / "cls", task="classify", num_labels=3)
    cls = load(cls_path)
    with TestClient(create_app(loaded=cls, api_key=KEY, model_name="c")) as c:
        r = c.post("/v1/classify", json={"input": ["hello there", "bye"]}, headers=auth)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["index"] for d in data] == [0, 1]
        for d in data:
            assert set(d["probabilities"]) == {"LABEL_0", "LABEL_1", "LABEL_2"}
            assert abs(sum(d["probabilities"].values()) - 1) < 1e-5
            assert d["label"] == max(d["probabilities"], key=d["probabilities"].get)
        # oracle: the probabilities transformers gives the same text alone
        import torch

        enc = cls.tokenizer(["bye"], return_tensors="pt")
        with torch.no_grad():
            ref = torch.softmax(cls.classifier.model(**enc).logits, -1)[0].tolist()
        assert list(data[1]["probabilities"].values()) == pytest.approx(ref, abs=1e-5)
        r = c.post("/v1/classify", json={"input": ["", "x"]}, headers=auth)  # an empty text is still classified
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        r = c.post("/v1/classify", json={"input": []}, headers=auth)
        assert r.status_code == 400 and "at least 1" in r.json()["error"]["message"]
        r = c.post(
            "/v1/chat/completions", json={"model": "c", "messages": [{"role": "user", "content": "x"}]}, headers=auth
        )
        assert r.status_code == 400 and "classif" in r.json()["error"]["message"]


def test_non_loopback_host_needs_a_key(ckpt, capsys):
    from owngpt.cli import main

    assert main(["serve", str(ckpt), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


# --- the real server, through the official client -----------------------------------------------------------------
def test_models_chat_and_completions(client, model_id, server):
    assert [m.id for m in client.models.list().data] == [model_id]
    r = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = client.completions.create(model=model_id, prompt="ROMEO:", max_tokens=10, temperature=0, echo=True)
    assert c.choices[0].text.startswith("ROMEO:")
    # max_completion_tokens is the newer name of max_tokens
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=3,
        temperature=0.7,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_greedy_server_equals_transformers(client, model_id, loaded):
    r = client.completions.create(
        model=model_id, prompt="First Citizen:", max_tokens=25, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == _hf_greedy(loaded, "First Citizen:", 25)
    assert r.usage.completion_tokens == 25


def test_stream_ends_with_done_and_matches_non_streamed(client, model_id, server):
    kw = dict(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
    # the raw wire format: SSE data lines ending with [DONE]
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": model_id, "prompt": "a", "max_tokens": 5, "stream": True},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    last = json.loads(lines[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] in ("stop", "length")


def test_n_seed_and_stop(client, model_id):
    kw = dict(
        model=model_id,
        messages=[{"role": "user", "content": "Tell me"}],
        max_tokens=15,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    a = client.chat.completions.create(**kw, seed=7, n=2)
    b = client.chat.completions.create(**kw, seed=7, n=2)
    c = client.chat.completions.create(**kw, seed=8)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1] and texts[0] != texts[1]
    assert texts == [ch.message.content for ch in b.choices]
    assert c.choices[0].message.content != texts[0]
    assert a.usage.completion_tokens == 2 * 15
    full = (
        client.completions.create(
            model=model_id, prompt="x", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = next(full[i : i + 2] for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    cut = client.completions.create(
        model=model_id,
        prompt="x",
        max_tokens=30,
        temperature=0,
        stop=[stop, "\x00\x01"],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_bad_requests_get_openai_error_shape(client, model_id, server):
    import openai

    def shape(e):
        err = e.response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=-5)
    assert shape(e.value)["param"] == "max_tokens"
    # a prompt longer than the context is no error: the model reads its last tokens
    long = client.completions.create(model=model_id, prompt="a" * (CTX + 10), max_tokens=3, temperature=0)
    assert long.usage.prompt_tokens == CTX + 10 and long.usage.completion_tokens <= 3
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], n=1000)
    assert shape(e.value)["param"] == "n"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert shape(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": 5}])
    assert shape(e.value)["param"].startswith("messages[0].content")
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server}/v1/chat/completions", content=b"[1, 2]", headers=auth)
    assert r.status_code == 400 and "error" in r.json()


def test_api_key_is_required_except_for_health(server, model_id):
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.response.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/models", "/openapi.json"):
        assert httpx.get(f"{server}{path}").status_code == 401
    assert httpx.post(f"{server}/v1/completions", json={"model": model_id, "prompt": "a"}).status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200


def test_concurrent_async_streams_all_finish_and_share_batches(server, model_id):
    import openai

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i):
            stream = await aclient.chat.completions.create(
                model=model_id,
                messages=[{"role": "user", "content": f"Tell me {i}"}],
                max_tokens=30,
                temperature=0.8,
                # Seeded: this checkpoint has no chat template, so its replies end at the plain transcript's stop
                # strings ("\n\n", "\nUser:"), which the random model writes by chance (2 of 800 unseeded replies
                # did): unseeded, about one run in 50 ended a stream "stop" and failed the assertion below.
                seed=i,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            parts, reasons = [], []
            async for ch in stream:
                if ch.choices:
                    parts.append(ch.choices[0].delta.content or "")
                    reasons.append(ch.choices[0].finish_reason)
            return "".join(parts), [r for r in reasons if r]

        results = await asyncio.gather(*(one(i) for i in range(8)))
        await aclient.close()
        return results

    before = _health(server)
    results = asyncio.run(main())
    assert all(reasons == ["length"] and text for text, reasons in results)
    after = _health(server)
    rows, batches = after["rows_done"] - before["rows_done"], after["batches"] - before["batches"]
    # requests arriving together were generated together: fewer decode steps than tokens, batches of several rows
    assert rows == 8 and batches < 8 * 30 and after["max_batch_seen"] >= 2


def test_disconnecting_client_frees_its_slot(server, model_id, client):
    before = _health(server)["rows_cancelled"]
    body = {"model": model_id, "prompt": "a", "max_tokens": CTX - 8, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        for line in resp.iter_lines():
            if '"text"' in line:
                break  # hang up mid-stream
    deadline = time.monotonic() + 30
    while not (_health(server)["rows_cancelled"] > before and _health(server)["running"] == 0):
        assert time.monotonic() < deadline, f"the abandoned row kept running: {_health(server)}"
        time.sleep(0.1)
    r = client.completions.create(model=model_id, prompt="b", max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5


def test_schema_fuzz_has_no_server_errors(server):
    """schemathesis generates valid and invalid requests from /openapi.json; none may get a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    auth = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", headers=auth)
    failures = []
    ops = [res.ok() for res in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=15, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                resp = case.call(base_url=server, headers=auth, timeout=60)
                if resp.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {resp.status_code} {resp.text}")

            try:
                run()
            except Unsatisfiable:  # nothing to break in a parameterless GET: no negative cases exist
                assert mode == GenerationMode.NEGATIVE, op.path
    assert not failures, "\n".join(failures[:5])


def test_chat_page_in_headless_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no chromium binary (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.fill("#api-key", KEY)
            # a plain language model (task lm): the page opens in completion mode and says so
            page.wait_for_function("() => document.body.dataset.mode === 'completion'", timeout=30000)
            assert page.input_value("#mode") == "completion"
            assert page.inner_text("#mode-note").startswith("Completion mode")
            page.fill("#max-tokens", "24")
            page.fill("#input", "ROMEO:")
            page.click("#send")
            page.wait_for_function(
                "() => { const m = document.querySelector('.msg.completion');"
                " return m && !m.classList.contains('streaming')"
                " && m.querySelector('.continuation').textContent.length > 0; }",
                timeout=60000,
            )
            assert page.inner_text(".msg.completion .prompt") == "ROMEO:"
            # a reply cut by the token limit says so under it; one the model ended does not
            finish = page.get_attribute(".msg.completion", "data-finish")
            assert finish in ("length", "stop")
            assert page.locator(".msg.note.cut").count() == (finish == "length")
            # the same with the server's answer fixed (a sampled reply may end either way): finish_reason length
            canned = "".join(
                "data: " + json.dumps({"choices": [{"index": 0, "text": t, "finish_reason": f}]}) + "\n\n"
                for t, f in ((" and so", None), ("", "length"))
            )
            page.route(
                "**/v1/completions",
                lambda route: route.fulfill(
                    status=200, headers={"content-type": "text/event-stream"}, body=canned + "data: [DONE]\n\n"
                ),
            )
            page.fill("#input", "JULIET:")
            page.click("#send")
            page.wait_for_function("() => document.querySelectorAll('.msg.completion').length == 2")
            page.wait_for_function("() => !document.querySelector('.streaming')")
            last = page.locator(".msg.completion").nth(1)
            assert last.get_attribute("data-finish") == "length"
            assert "Max tokens limit, 24" in page.locator(".msg.note.cut").last.inner_text()
            page.unroute("**/v1/completions")
            assert page.locator(".msg.user").count() == 0
            # switched to chat mode: the page says the model is not chat-tuned, and chats
            page.select_option("#mode", "chat")
            note = page.inner_text("#mode-note")
            assert note.startswith("Chat mode") and "plain language model" in note
            assert page.locator(".msg").count() == 0
            page.fill("#max-tokens", "24")
            page.fill("#system", "You are a poet.")
            page.fill("#input", "Hello there")
            page.click("#send")
            page.wait_for_selector(".msg.user")
            page.wait_for_function(
                "() => { const m = document.querySelector('.msg.assistant');"
                " return m && !m.classList.contains('streaming') && m.textContent.length > 0; }",
                timeout=60000,
            )
            assert page.inner_text(".msg.user") == "Hello there"
            assert page.inner_text("#status") == "ready"
            assert page.inner_text("#model") != "…"
            # second turn: the page sends the whole conversation
            page.fill("#input", "And again")
            page.press("#input", "Enter")
            page.wait_for_function(
                "() => document.querySelectorAll('.msg.assistant').length == 2"
                " && !document.querySelector('.streaming')",
                timeout=60000,
            )
            assert page.evaluate("localStorage.getItem('owngpt.api-key')") == KEY
            # a chat reply that ended because the context was full (3 tokens, the limit is 24) says so, not "raise
            # the limit": the page asks for the usage chunk and reads completion_tokens from it
            notes = page.locator(".msg.note.cut").count()  # the sampled replies above may have ended either way
            canned = "".join(
                "data: " + json.dumps(c) + "\n\n"
                for c in (
                    {"choices": [{"index": 0, "delta": {"content": "so"}, "finish_reason": None}]},
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
                    {"choices": [], "usage": {"prompt_tokens": 61, "completion_tokens": 3, "total_tokens": 64}},
                )
            )
            sent = []
            page.route(
                "**/v1/chat/completions",
                lambda route: (
                    sent.append(route.request.post_data_json),
                    route.fulfill(
                        status=200, headers={"content-type": "text/event-stream"}, body=canned + "data: [DONE]\n\n"
                    ),
                ),
            )
            page.fill("#input", "Go on")
            page.press("#input", "Enter")
            page.wait_for_function(
                "() => document.querySelectorAll('.msg.assistant').length == 3 && !document.querySelector('.streaming')"
            )
            page.unroute("**/v1/chat/completions")
            assert sent[0]["stream_options"] == {"include_usage": True}
            assert page.locator(".msg.note.cut").count() == notes + 1
            assert "context is full" in page.locator(".msg.note.cut").last.inner_text()
            # Enter that confirms an input method's candidate (typing Chinese) does not send the half-typed text;
            # sending is synchronous up to the new message, so the count right after the event tells
            ime = page.evaluate(
                """() => { const el = document.getElementById('input'); el.value = 'ni hao';
                  el.dispatchEvent(new KeyboardEvent('keydown',
                    {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true, cancelable: true}));
                  return [document.querySelectorAll('.msg.user').length, el.value]; }"""
            )
            assert ime == [3, "ni hao"]
            page.click("#reset")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
