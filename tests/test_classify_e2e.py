"""prepare -> train (the shared loop) -> predict on a trivially separable rule; frozen body and LoRA through the loop."""

from __future__ import annotations

import json
import random

import pytest
import torch

import fixtures
from owngpt.checkpoint import load_model
from owngpt.cli import main
from owngpt.config import TrainConfig
from owngpt.data.prepare import PrepareConfig, prepare
from owngpt.errors import DataError
from owngpt.train import train

WORDS = ["the", "film", "story", "actors", "music", "was", "really", "quite", "and", "plot", "ending", "it"]


def sentence(rng: random.Random, label: str) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    words.insert(rng.randint(0, len(words)), "good" if label == "pos" else "bad")
    return " ".join(words)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An owngpt LM checkpoint (the body to start from) and a classify data dir tokenized with its tokenizer."""
    d = tmp_path_factory.mktemp("e2e")
    lm = fixtures.save_tiny_checkpoint(d / "lm", n_layer=2, n_embd=32)
    rng = random.Random(0)
    rows = [(sentence(rng, lab), lab) for lab in ["pos", "neg"] * 40]
    csv_file = d / "train.csv"
    csv_file.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows), encoding="utf-8")
    cfg = PrepareConfig(
        sources=[str(csv_file)],
        out=str(d / "data"),
        task="classify",
        labels=["neg", "pos"],
        tokenizer=str(lm),
        val_fraction=0.25,
        progress=False,
        quiet=True,
    )
    prepare(cfg)
    return d, lm


def run_cfg(d, lm, name, **kw) -> TrainConfig:
    base = dict(
        task="classify",
        data=str(d / "data"),
        out=str(d / name),
        model=str(lm),
        batch_size=8,
        block_size=32,
        lr=3e-3,
        warmup_steps=5,
        eval_every=10,
        eval_batches=0,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


def test_unknown_label_names_file_and_line(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("text,label\ngood one,pos\nmeh,neutral\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: unknown label 'neutral'"):
        prepare(
            PrepareConfig(
                sources=[str(f)],
                out=str(tmp_path / "o"),
                task="classify",
                labels=["neg", "pos"],
                tokenizer="char",
                progress=False,
                quiet=True,
            )
        )


def test_train_then_predict_learns_a_separable_rule(setup, capsys):
    d, lm = setup
    res = train(run_cfg(d, lm, "full", max_steps=40, metric="macro_f1", class_weights="balanced", augment=0.2))
    assert res.best_metric >= 0.9  # validation macro-F1
    best = res.best_checkpoint
    meta = json.loads((best / "owngpt.json").read_text())
    assert meta["task"] == "classify" and meta["labels"] == ["neg", "pos"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(best)  # plain transformers appends the EOS the head was trained to read
    assert tok("good film")["input_ids"][-1] == tok.eos_token_id
    rng = random.Random(123)
    test = [(sentence(rng, lab), lab) for lab in ["pos", "neg"] * 10]
    inp = d / "test.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in test), encoding="utf-8")
    capsys.readouterr()
    assert main(["predict", str(best), "--input", str(inp)]) == 0
    pred = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert sum(p == g for p, (_, g) in zip(pred, test)) / len(test) >= 0.8  # chance is 0.5

    from owngpt.classify_eval import evaluate_checkpoint

    ev = evaluate_checkpoint(best, d / "data", out_dir=d / "ev")
    assert ev["macro_f1"] == pytest.approx(res.best_metric, abs=1e-6)  # eval agrees with training's evaluation


def test_frozen_body_through_the_loop(setup):
    d, lm = setup
    res = train(run_cfg(d, lm, "frozen", max_steps=6, freeze_body=True))
    clf, base = load_model(res.last_checkpoint, task="classify"), load_model(lm)
    body = dict(base.transformer.named_parameters())
    for n, p in clf.transformer.named_parameters():
        assert torch.equal(p, body[n]), n
    head = load_model(d / "frozen" / "checkpoints" / "best", task="classify").score.weight
    assert clf.config.id2label == {0: "neg", 1: "pos"} and head.shape == (2, 32)


def test_lora_run_saves_a_loadable_classifier_with_its_head(setup, capsys):
    d, lm = setup
    res = train(run_cfg(d, lm, "lora", max_steps=6, lora=True, lr=1e-2))
    from owngpt.predict import load_classifier, predict_proba

    clf = load_classifier(res.last_checkpoint)
    assert clf.labels == ["neg", "pos"] and type(clf.model).__name__ == "GPT2ForSequenceClassification"
    # the head is trained in full (modules_to_save) and saved: it differs from a fresh seed-0 head's init
    probs = predict_proba(clf, ["good film", "bad film"])
    assert probs.shape == (2, 2) and torch.allclose(torch.tensor(probs.sum(1)), torch.ones(2, dtype=torch.float64))
