"""One engine behind every front end: the REPL, `owngpt.load().chat`, the OpenAI API and the server's scheduler."""

from __future__ import annotations

import io
import threading

import pytest
import torch

import fixtures
from owngpt.chat_format import CHAT_TEMPLATE

SYSTEM = "Be brief."
USER_TURNS = ["Hello there, who are you?", "Speak, speak.", "And then what happened at the gate?"]
N = 12  # tokens per reply


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def checkpoint(path, task):
    """A tiny checkpoint with 128 positions trained (says owngpt.json) on 64: conversations overflow it. Its weights
    are drawn wider than GPT-2's init so that its greedy replies depend on the whole conversation, not only on the
    `Bot:` that ends every prompt (with small weights every reply is the same)."""
    from owngpt.checkpoint import save_checkpoint

    tok = fixtures.char_tokenizer()
    model = fixtures.tiny_gpt2(tok, n_positions=128, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    meta = {"task": task, "source": {"kind": "preset", "name": "test-tiny"}, "block_size": 64, "trained_context": 64}
    return save_checkpoint(path, model, tok, meta)


@pytest.mark.parametrize("task", ["lm", "chat"])
def test_repl_python_api_and_server_give_the_same_greedy_replies(tmp_path, task):
    from fastapi.testclient import TestClient

    import owngpt
    from owngpt.chat import ChatREPL, ChatSettings
    from owngpt.generation import SamplingParams, load_for_generation
    from owngpt.serve.app import create_app

    ck = checkpoint(tmp_path / task, task)
    lm = load_for_generation(str(ck))
    assert lm.context_length == 64  # the trained context, not the 128 positions of the table
    assert bool(lm.tokenizer.chat_template == CHAT_TEMPLATE)

    # the REPL, as `owngpt chat` runs it
    out = io.StringIO()
    repl = ChatREPL(lm, SamplingParams(max_new_tokens=N, temperature=0), ChatSettings(use_template=task == "chat"),
                    system=SYSTEM, out=out, err=out)  # fmt: skip
    repl.run(stdin=io.StringIO("".join(t + "\n" for t in USER_TURNS)))
    msgs = repl.messages
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert all(replies) and len(set(replies)) > 1
    convs = [msgs[: i + 1] for i, m in enumerate(msgs) if m["role"] == "user"]
    assert len(lm.tokenizer(str(convs[-1]))["input_ids"]) > 64  # the last conversation overflows the context

    # the Python API
    m = owngpt.load(str(ck))
    assert [m.chat(c, max_new_tokens=N, temperature=0) for c in convs] == replies
    assert ["".join(m.chat(c, stream=True, max_new_tokens=N, temperature=0)) for c in convs] == replies

    # the server (its worker thread, continuous batching), plain and streamed
    with TestClient(create_app(ck, api_key=None, model_name="m")) as client:
        got, streamed = [], []
        for c in convs:
            body = {"model": "m", "messages": c, "max_tokens": N, "temperature": 0}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["message"]["content"])
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                import json

                pieces = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
            streamed.append("".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"]))
        assert got == replies and streamed == replies
        assert client.get("/health").json()["mode"] == ("chat" if task == "chat" else "completion")


def test_a_reply_running_past_the_context_ends_with_length(tmp_path):
    import owngpt
    from owngpt.chat import reply

    ck = checkpoint(tmp_path / "lm", "lm")
    m = owngpt.load(str(ck))
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "x" * 500}]
    r = reply(m._lm, conv, m._params({"max_new_tokens": 200, "temperature": 0}, fit=False),
              __import__("owngpt.chat", fromlist=["ChatSettings"]).ChatSettings(use_template=False))  # fmt: skip
    assert r.finish_reason in ("length", "stop")
    ids = m.tokenizer(r.text, add_special_tokens=False)["input_ids"]
    assert len(ids) < 200  # it stopped at the context (or a stop), never slid past it


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_arriving_mid_decode_is_admitted_before_the_running_batch_ends(tmp_path, continuous):
    from owngpt.serve.engine import Row, RowSettings, load

    ck = fixtures.save_tiny_checkpoint(tmp_path / "ck", n_positions=256)
    loaded = load(ck, continuous=continuous, batch_wait_ms=0)
    engine, tok = loaded.engine, loaded.tokenizer
    done = threading.Event()
    at_short_end: list[int] = []
    long_row = Row(tok.encode("ROMEO:"), RowSettings(max_tokens=120, temperature=0))
    short_row = Row(tok.encode("KING"), RowSettings(max_tokens=5, temperature=0))

    def on_long(row, piece, fin):
        if len(row.token_ids) == 3 and not short_row.on_event:  # mid-decode: the short request arrives
            short_row.on_event = on_short
            engine.submit([short_row])
        if fin:
            done.set() if short_row.finished else None

    def on_short(row, piece, fin):
        if fin:
            at_short_end.append(len(long_row.token_ids))
            done.set() if long_row.finished else None

    long_row.on_event = on_long
    engine.start()
    try:
        engine.submit([long_row])
        assert done.wait(120)
    finally:
        engine.close()
    assert short_row.finish_reason == long_row.finish_reason == "length"
    if continuous:  # it joined at the next step: done long before the running row
        assert at_short_end[0] <= 3 + 5 + 1 and engine.stats.admitted_mid_decode == 1
    else:  # dynamic batching: it waited for the running batch to end
        assert at_short_end[0] == 120 and engine.stats.admitted_mid_decode == 0
