"""`owngpt explain`: surprisal equals `owngpt eval`'s loss, attention weights are causal distributions, integrated
gradients are complete (they sum to the output minus the baseline's), tokens show as text (CJK in byte-level BPE)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fixtures
from owngpt.cli import main
from owngpt.evaluate import evaluate
from owngpt.explain import explain_classifier, explain_lm, token_pieces, write_explanation

TEXT = "ROMEO:\nBut, soft! what light 床前明月光"


def test_surprisal_is_the_loss_owngpt_eval_computes_for_the_same_text(tiny_ckpt, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    loss = evaluate(str(tiny_ckpt), str(f), progress=False)["loss"]
    r = explain_lm(str(tiny_ckpt), TEXT)
    assert r["surprisal"][0] is None and len(r["surprisal"]) == len(r["ids"])
    assert np.mean(r["surprisal"][1:]) == pytest.approx(loss, rel=1e-5)
    assert r["mean_surprisal"] == pytest.approx(loss, rel=1e-5)
    # each value is -ln p of that token given the ones before it (a separate forward pass per prefix)
    from owngpt.checkpoint import load_model

    model = load_model(tiny_ckpt).eval()
    for t in (1, 7, len(r["ids"]) - 1):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r["ids"][:t]])).logits[0, -1]
        assert r["surprisal"][t] == pytest.approx(float(-torch.log_softmax(logits, -1)[r["ids"][t]]), abs=1e-4)


def test_attention_weights_are_causal_distributions_for_every_layer_and_head(tiny_ckpt):
    r = explain_lm(str(tiny_ckpt), TEXT)
    a = r["attentions"]
    T = len(r["ids"])
    assert a.shape == (2, 2, T, T)  # the fixture's 2 layers x 2 heads
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    assert np.abs(np.triu(a, k=1)).max() == 0.0  # no token attends to a later one
    assert a[:, :, 0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("make", ["char", "gpt2"])
def test_token_pieces_join_up_to_the_text_and_keep_cjk_characters_whole(make):
    from owngpt.tokenizer import gpt2_tokenizer

    tok = fixtures.char_tokenizer("abc ") if make == "char" else gpt2_tokenizer()
    text = "Hello, 床前明月光 café 🙂!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    for ch in "床前明月光🙂":
        assert ch in pieces or any(ch in p for p in pieces)
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=40, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30))
def test_byte_level_pieces_round_trip_any_text(text):
    tok = _gpt2()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "".join(token_pieces(tok, ids)) == tok.decode(ids)


_TOK = []


def _gpt2():
    from owngpt.tokenizer import gpt2_tokenizer

    if not _TOK:
        _TOK.append(gpt2_tokenizer())
    return _TOK[0]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny random classifier whose head is scaled up, so that texts get clearly different probabilities."""
    from owngpt.checkpoint import load_model, read_meta, save_checkpoint

    d = tmp_path_factory.mktemp("clf")
    path = fixtures.save_tiny_checkpoint(d / "raw", task="classify", seed=1)
    model = load_model(path, task="classify")
    with torch.no_grad():
        model.score.weight.mul_(5.0)
    tok = fixtures.char_tokenizer()
    return save_checkpoint(d / "clf", model, tok, read_meta(path))


@pytest.mark.parametrize("text", ["what a good film", "bad acting, bad story 床前明月光"])
def test_attributions_are_complete(classifier, text):
    pytest.importorskip("captum")
    from owngpt.predict import load_classifier
    from owngpt.tasks.classify import encode_texts

    r = explain_classifier(str(classifier), text, n_steps=128)
    # the model's output on the text and on the baseline, computed here without Captum: the baseline replaces the
    # token embeddings only, so GPT-2's head still reads the last position (inputs_embeds: the last one)
    clf = load_classifier(classifier)
    ids = encode_texts(clf.tokenizer, [text], clf.max_length)[0]
    base = [i if i in clf.tokenizer.all_special_ids else clf.tokenizer.pad_token_id for i in ids]
    emb = clf.model.get_input_embeddings()
    with torch.no_grad():
        p = torch.softmax(clf.model(input_ids=torch.tensor([ids])).logits[0], -1)
        pb = torch.softmax(clf.model(inputs_embeds=emb(torch.tensor([base]))).logits[0], -1)
    k = clf.labels.index(r["target"])
    assert r["target"] == clf.labels[int(p.argmax())]
    assert r["prob"] == pytest.approx(float(p[k]), abs=1e-6)
    assert r["baseline_prob"] == pytest.approx(float(pb[k]), abs=1e-6)
    diff = float(p[k] - pb[k])
    assert abs(diff) > 0.01  # a test of completeness needs something to attribute
    assert sum(r["attributions"]) == pytest.approx(diff, abs=2e-3 + 0.01 * abs(diff))
    assert len(r["attributions"]) == len(r["pieces"]) == len(ids)
    assert max(abs(a) for a in r["attributions"]) > 1e-4


def test_explain_writes_a_self_contained_page_for_each_kind(tiny_ckpt, classifier, tmp_path, capsys):
    pytest.importorskip("captum")
    lm_page = tmp_path / "lm.html"
    assert main(["explain", str(tiny_ckpt), "--text", TEXT, "--out", str(lm_page), "--layer", "1", "--head", "1"]) == 0
    assert "mean surprisal" in capsys.readouterr().out
    html = lm_page.read_text()
    assert "床" in html and "Attention: layer 1, head 1" in html and "data:image/png;base64," in html
    cls_page = tmp_path / "cls.html"
    assert main(["explain", str(classifier), "--text", "so good", "--out", str(cls_page), "--steps", "16"]) == 0
    html = cls_page.read_text()
    assert 'id="attribution"' in html and "Completeness" in html
    zh_page = tmp_path / "zh.html"
    assert (
        main(["explain", str(classifier), "--text", "好", "--out", str(zh_page), "--steps", "8", "--lang", "zh"]) == 0
    )
    assert "完备性" in zh_page.read_text() and 'lang="zh-CN"' in zh_page.read_text()
    # refuses to replace a file without --overwrite, and bad head numbers, with a clear error
    assert main(["explain", str(tiny_ckpt), "--text", TEXT, "--out", str(lm_page)]) == 2
    assert main(["explain", str(tiny_ckpt), "--text", TEXT, "--out", str(tmp_path / "x.html"), "--head", "9"]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "2 heads" in err
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no chromium binary")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            for f in (lm_page, cls_page):
                page = browser.new_page()
                bad: list[str] = []
                page.on(
                    "request",
                    lambda r, f=f, bad=bad: (
                        None if r.url == f.as_uri() or r.url.startswith("data:") else bad.append(r.url)
                    ),
                )
                page.on("console", lambda m, bad=bad: bad.append(m.text) if m.type == "error" else None)
                page.goto(f.as_uri())
                assert not bad, bad
                page.close()
        finally:
            browser.close()


def test_write_explanation_refuses_an_empty_text(tiny_ckpt, tmp_path):
    from owngpt.errors import ConfigError

    with pytest.raises(ConfigError, match="empty"):
        write_explanation(str(tiny_ckpt), "", tmp_path / "x.html")
