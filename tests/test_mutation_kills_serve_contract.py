"""The serving engine's contract, written against the classes of mutants that survived in serve/engine (#25): every
counter of its stats, its defaults (those `owngpt serve` documents), continuous batching against each row decoded
alone, a failing model, the classifier against its model's own logits, and what `load` makes of each checkpoint.
Tiny random models; no timed assertion (the 60 s bounds only stop a broken engine from hanging the suite)."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
import torch

import fixtures
from owngpt.engine import Decoder, Row, RowSettings, run_to_end
from owngpt.serve.engine import Classifier, Engine, Stats, load


@pytest.fixture(scope="module")
def tok():
    return fixtures.char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return fixtures.tiny_gpt2(tok, n_positions=64)


def _cli_default(flag: str):
    import argparse

    from owngpt.commands import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.get_default(flag)


def _row(tok, prompt="KING", n=5, done=None, on_piece=None):
    def on_event(row, piece, finished):
        if on_piece is not None and piece:
            on_piece(row)
        if finished and done is not None:
            done.release()

    return Row(tok.encode(prompt), RowSettings(max_tokens=n, temperature=0), on_event)


def test_a_new_engine_reports_zero_for_every_counter(model, tok):
    counters = [f.name for f in dataclasses.fields(Stats) if f.name != "started"]
    assert len(counters) == 8
    for st in (Stats(), Engine(model, tok).stats):
        assert {name: getattr(st, name) for name in counters} == dict.fromkeys(counters, 0)


def test_an_engine_defaults_to_what_owngpt_serve_documents(model, tok):
    e = Engine(model, tok)
    assert e.max_batch_size == _cli_default("max_batch_size")
    assert e.max_queue == _cli_default("max_queue")
    assert e.batch_wait == _cli_default("batch_wait_ms") / 1000
    assert e.continuous is (_cli_default("scheduler") == "continuous") is True
    # the context: the model's position table unless given
    assert e.context_length == model.config.n_positions == 64
    assert Engine(model, tok, context=20).context_length == 20


def test_load_builds_the_engine_with_the_defaults_owngpt_serve_documents(tiny_ckpt):
    loaded = load(tiny_ckpt)
    e = loaded.engine
    assert (e.max_batch_size, e.max_queue, e.continuous) == (
        _cli_default("max_batch_size"),
        _cli_default("max_queue"),
        _cli_default("scheduler") == "continuous",
    )
    assert loaded.task == "lm" and loaded.mode == "completion" and loaded.classifier is None
    assert load(tiny_ckpt, continuous=False, max_batch_size=3).engine.continuous is False


def test_continuous_batching_admits_rows_mid_decode_and_each_row_is_its_greedy_text_alone(model, tok):
    # Row A starts alone; at its third step B, C and D are queued and join the running batch; D asks to be cancelled
    # when asked the third time. A row's cancel flag (a callable) is asked once per step, from the worker: it serves as the
    # step hook. Oracle: each row decoded alone by a fresh decoder. Every counter is what happened.
    engine = Engine(model, tok, max_batch_size=8)
    done = threading.Semaphore(0)
    steps = {"a": 0, "d": 0}

    def a_flag():
        steps["a"] += 1
        if steps["a"] == 3:
            engine.submit([b, c, d])
        return False

    def d_flag():
        steps["d"] += 1
        return steps["d"] >= 3

    def row(prompt, n, flag=None):
        return Row(
            tok.encode(prompt), RowSettings(max_tokens=n, temperature=0), lambda r, p, f: f and done.release(), flag
        )

    a, b, c, d = row("KING", 10, a_flag), row("QUEEN", 4), row("Romeo", 3), row("JULIET", 20, d_flag)
    engine.submit([a])
    engine.start()
    try:
        for _ in range(4):
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    for r, prompt, n in ((a, "KING", 10), (b, "QUEEN", 4), (c, "Romeo", 3)):
        alone = row(prompt, n)
        run_to_end(Decoder(model, tok, 64), [alone])
        assert (r.token_ids, r.finish_reason) == (alone.token_ids, "length"), prompt
    # D's flag is asked when it is admitted, then at each step: one step ran, the next ended it
    assert d.finish_reason == "cancelled" and len(d.token_ids) == 1
    st = engine.stats
    assert (st.rows_done, st.rows_cancelled, st.admitted_mid_decode, st.queued) == (4, 1, 3, 0)
    assert st.tokens_generated == 10 + 4 + 3 + 1
    assert st.max_batch_seen == 4 and st.running == 0
    assert st.batches == 10  # continuous batching counts decode steps: A's ten, the others within them


def test_start_makes_one_daemon_worker(model, tok):
    # a second start() does not start a second worker; the worker never keeps the process alive at exit
    before = {t for t in threading.enumerate() if t.name == "owngpt-generate"}
    engine = Engine(model, tok)
    engine.start()
    engine.start()
    try:
        mine = [t for t in threading.enumerate() if t.name == "owngpt-generate" and t not in before]
        assert len(mine) == 1 and mine[0].daemon
    finally:
        engine.close()
    assert not mine[0].is_alive()


def test_a_failing_model_ends_its_rows_with_the_error_and_logs_the_traceback(tok, monkeypatch, caplog):
    broken = fixtures.tiny_gpt2(tok, n_positions=64)

    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(broken, "forward", boom)
    caplog.set_level(logging.ERROR, logger="owngpt.serve")
    engine = Engine(broken, tok)
    done = threading.Semaphore(0)
    rows = [_row(tok, "KING", 5, done), _row(tok, "QUEEN", 5, done)]
    engine.submit(rows)
    engine.start()
    try:
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        # the worker survives the failure: the next row runs (and fails the same way)
        later = _row(tok, "Romeo", 2, done)
        engine.submit([later])
        assert done.acquire(timeout=60)
    finally:
        engine.close()
    for r in [*rows, later]:
        assert r.finish_reason == "error" and r.error == "generation failed: RuntimeError: boom"
    failures = [rec for rec in caplog.records if rec.getMessage() == "generation failed"]
    assert failures and all(rec.exc_info and rec.exc_info[0] is RuntimeError for rec in failures)
    # run_batch (tests, benchmarks) reports the same way
    caplog.clear()
    batch = [_row(tok, "KING", 3)]
    Engine(broken, tok).run_batch(batch)
    assert batch[0].finish_reason == "error" and "RuntimeError: boom" in batch[0].error
    assert any(rec.getMessage() == "generation failed" and rec.exc_info for rec in caplog.records)


# --- the classifier -------------------------------------------------------------------------------------------


def test_the_classifier_gives_each_text_the_softmax_of_its_own_logits(tok):
    model = fixtures.tiny_gpt2(tok, task="classify", n_positions=32, num_labels=3)
    model.config.pad_token_id = tok.pad_token_id
    model.config.id2label = {0: "neg", 1: "mid", 2: "pos"}
    clf = Classifier(model, tok, 32)
    assert clf.labels == ["neg", "mid", "pos"]
    texts = ["KING", "QUEEN OF ALL", "a", "Romeo, Romeo, wherefore"]
    got = clf.classify(texts)
    for text, g in zip(texts, got):
        with torch.no_grad():
            logits = model(torch.tensor([tok.encode(text)])).logits[0].double()
        want = torch.softmax(logits, dim=0).tolist()  # over the labels, for this text alone
        assert list(g["probabilities"]) == ["neg", "mid", "pos"]
        assert list(g["probabilities"].values()) == pytest.approx(want, abs=1e-5)
        assert g["label"] == clf.labels[max(range(3), key=want.__getitem__)]


def test_load_of_a_classifier_without_a_pad_token_classifies_a_batch_as_each_text_alone(tmp_path):
    # GPT-2 classifiers pool at the last non-pad token: load gives a config without one the tokenizer's pad token
    from owngpt.checkpoint import save_checkpoint

    tok = fixtures.char_tokenizer()
    model = fixtures.tiny_gpt2(tok, task="classify", n_positions=32)
    model.config.pad_token_id = None
    ck = save_checkpoint(tmp_path / "cls", model, tok, {"task": "classify", "step": 0})
    loaded = load(ck)
    assert loaded.engine is None and loaded.mode == "classify" and loaded.task == "classify"
    clf = loaded.classifier
    assert clf.model.config.pad_token_id == loaded.tokenizer.pad_token_id is not None
    assert clf.max_length == 32
    # on the device asked for (the meta device stands for any device other than the CPU)
    assert next(load(ck, device=torch.device("meta")).classifier.model.parameters()).device.type == "meta"
    assert next(clf.model.parameters()).device.type == "cpu"
    texts = ["KING", "QUEEN OF ALL THE LAND"]
    together = clf.classify(texts)
    for text, t in zip(texts, together):
        (alone,) = clf.classify([text])
        assert t["label"] == alone["label"]
        assert list(t["probabilities"].values()) == pytest.approx(list(alone["probabilities"].values()), abs=1e-5)


def test_a_chat_checkpoint_is_served_as_chat(tmp_path):
    ck = fixtures.save_tiny_checkpoint(tmp_path / "chat", task="chat")
    loaded = load(ck)
    assert loaded.task == "chat" and loaded.chat_template and loaded.mode == "chat"


def test_after_an_idle_spell_a_lone_request_runs_without_waiting_for_the_last_batchs_clients(model, tok, monkeypatch):
    # Dynamic batching waits for as many rows as the last batch had, unless the queue has been empty for IDLE_RESET:
    # then the last batch's clients are gone and one row is enough. IDLE_RESET is set to 0 (any idle spell counts),
    # the wait to ten minutes: a correct engine runs the lone row at once. Not a timed assertion: the 60 s bound only
    # stops a broken engine (one that waits the ten minutes for a second row) from hanging the suite.
    import time

    monkeypatch.setattr("owngpt.serve.engine.IDLE_RESET", 0.0)
    engine = Engine(model, tok, continuous=False, batch_wait_ms=600_000)
    done = threading.Semaphore(0)
    engine.submit([_row(tok, "KING", 3, done), _row(tok, "QUEEN", 3, done)])  # queued together: no wait
    engine.start()
    try:
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        time.sleep(0.05)  # the worker is idle, waiting for rows
        engine.submit([_row(tok, "Romeo", 3, done)])
        assert done.acquire(timeout=60)
    finally:
        engine.close()
    assert engine.stats.batches == 2 and engine.stats.rows_done == 3


def test_closing_the_engine_ends_the_rows_it_is_decoding_cancelled(model, tok):
    # a row still decoding when the server shuts down ends "cancelled" (its client is told), like the queued ones
    engine = Engine(model, tok, context=64)
    started = threading.Event()
    done = threading.Semaphore(0)

    def flag():  # asked when the row is admitted, then at every step
        started.set()
        return False

    long = Row(tok.encode("KING"), RowSettings(max_tokens=10_000, temperature=0), lambda r, p, f: f and done.release(),
               flag)  # fmt: skip
    engine.submit([long])
    engine.start()
    assert started.wait(timeout=60)
    engine.close()
    assert done.acquire(timeout=60)
    assert long.finish_reason == "cancelled" and len(long.token_ids) < 10_000
