"""MMI reranking: scores are the backward model's mean loss on the history; the answer is the argmin."""

from __future__ import annotations

import io

import pytest
import torch

import fixtures
from owngpt.chat import ChatREPL, ChatSettings, reply
from owngpt.chat_format import render_mmi
from owngpt.generation import LoadedModel, SamplingParams, load_for_generation
from owngpt.mmi import history_latest_first, rerank, score_candidates

HISTORY = ["You are all resolved rather to die?", "Speak, speak.", "Before we proceed"]  # latest first
CANDIDATES = ["Resolved. resolved.", "", "Ay me!", "But, soft! what light through yonder window breaks?"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def backward():
    tok = fixtures.char_tokenizer()
    return tok, fixtures.tiny_gpt2(tok, seed=7)


def manual_score(model, tok, reply_text, history, max_tokens=None):
    """transformers' own loss with labels outside the history masked out (-100), one candidate at a time."""
    ids, mask = render_mmi(tok, reply_text, history, max_tokens=max_tokens)
    labels = torch.tensor([[i if m else -100 for i, m in zip(ids, mask, strict=True)]])
    with torch.no_grad():
        return float(model(torch.tensor([ids]), labels=labels).loss)


def test_scores_equal_a_manual_per_candidate_loss(backward):
    tok, model = backward
    scores = score_candidates(model, tok, CANDIDATES, HISTORY, batch_size=3)  # batches of unequal lengths
    for c, s in zip(CANDIDATES, scores, strict=True):
        assert s == pytest.approx(manual_score(model, tok, c, HISTORY), abs=1e-5)


def test_long_history_is_cut_like_training(backward):
    tok, model = backward
    scores = score_candidates(model, tok, CANDIDATES[:2], HISTORY, max_tokens=60)
    for c, s in zip(CANDIDATES[:2], scores, strict=True):
        assert s == pytest.approx(manual_score(model, tok, c, HISTORY, max_tokens=60), abs=1e-5)


def test_rerank_returns_the_argmin(backward):
    tok, model = backward
    r = rerank(model, tok, CANDIDATES, HISTORY, skip_empty=False)
    assert r.best == min(range(len(CANDIDATES)), key=lambda i: r.scores[i])
    r = rerank(model, tok, CANDIDATES, HISTORY)  # empty candidates are passed over
    nonempty = [i for i, c in enumerate(CANDIDATES) if c]
    assert r.best == min(nonempty, key=lambda i: r.scores[i]) and r.text == CANDIDATES[r.best]


def test_history_latest_first():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert history_latest_first(msgs) == ["c", "b", "a"]


def test_chat_with_mmi_answers_with_the_best_candidate(tiny_ckpt, backward):
    lm = load_for_generation(str(tiny_ckpt))
    tok, model = backward
    back = LoadedModel(model=model, tokenizer=tok, path=tiny_ckpt, meta={"task": "mmi"})
    msgs = [{"role": "user", "content": "Speak, speak."}]
    r = reply(
        lm, msgs, SamplingParams(max_new_tokens=10, seed=4), ChatSettings(use_template=True, mmi=back, candidates=4)
    )
    assert len(r.candidates) == 4 and len(r.scores) == 4
    assert r.scores == pytest.approx(score_candidates(model, tok, r.candidates, ["Speak, speak."]))
    pool = [i for i, c in enumerate(r.candidates) if c.strip()] or range(4)
    assert r.text == r.candidates[min(pool, key=lambda i: r.scores[i])]

    out, err = io.StringIO(), io.StringIO()
    repl = ChatREPL(
        lm,
        SamplingParams(max_new_tokens=10, seed=4),
        ChatSettings(True, mmi=back, candidates=3),
        debug=True,
        out=out,
        err=err,
    )
    repl.run(stdin=io.StringIO("Hello\n/exit\n"))
    lines = [x for x in err.getvalue().splitlines() if x.startswith("[mmi]")]
    assert len(lines) == 3 and sum(" * " in x for x in lines) >= 1
