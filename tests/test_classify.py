"""Classification task: pooling with left/right padding, frozen body, class weights, metrics, encoders, LM bodies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fixtures
from owngpt.config import TrainConfig
from owngpt.data.datadir import open_data_dir
from owngpt.errors import ConfigError
from owngpt.tasks.classify import (
    ClassifyTask,
    balanced_class_weights,
    classifier_logits,
    collate_ids,
    encode_texts,
    freeze_body,
    head_module_names,
)

POS = ["what a good film", "good acting, good story", "so good", "a good time", "good good good", "really good"]
NEG = ["what a bad film", "bad acting, bad story", "so bad", "a bad time", "bad bad bad", "really bad"]


def rows(n_repeat: int = 2):
    return [(t, "pos") for t in POS * n_repeat] + [(t, "neg") for t in NEG * n_repeat]


@pytest.fixture()
def data_dir(tmp_path):
    return open_data_dir(fixtures.write_classify_data_dir(tmp_path / "cls", rows(2), rows(1)))


def make_task(data, tok=None, **cfg) -> ClassifyTask:
    tok = tok or data.load_tokenizer()
    return ClassifyTask(data, tok, TrainConfig(task="classify", **cfg), block_size=64)


def tiny_classifier(tok, num_labels=2, seed=0):
    return fixtures.tiny_gpt2(tok, task="classify", num_labels=num_labels, seed=seed)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_takes_the_last_real_token(side):
    tok = fixtures.char_tokenizer()
    model = tiny_classifier(tok)
    texts = ["a", "speak, speak.", "Before we proceed any further"]
    ids = encode_texts(tok, texts, 64)
    with torch.no_grad():
        single = torch.cat([model(input_ids=torch.tensor([s])).logits for s in ids])  # unpadded, one at a time
        batch = collate_ids(ids, tok.pad_token_id, side)
        assert (batch["input_ids"] == tok.pad_token_id).any()  # the batch really is padded
        padded = classifier_logits(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)
    if side == "left":  # and the position ids are what makes left padding right: without them GPT-2 is off
        with torch.no_grad():
            naive = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert not torch.allclose(naive[0], single[0], atol=1e-4)


def test_task_batches_labels_and_config(data_dir):
    task = make_task(data_dir)
    assert task.labels == ["neg", "pos"] and task.num_train_examples() == 24
    b = task.collate(task.global_rows(0, 8))
    assert b["input_ids"].shape[0] == 8 and b["labels"].tolist() == [
        ["neg", "pos"].index(r["label"])
        for r in [list(data_dir.records("train"))[i] for i, _ in task.global_rows(0, 8)]
    ]
    assert task.batch_units(b) == 8
    over = task.model_config_overrides()
    assert over["id2label"] == {0: "neg", 1: "pos"} and over["num_labels"] == 2
    assert task.checkpoint_meta()["labels"] == ["neg", "pos"] and task.generation_eos_ids() is None
    # the tokenizer now ends every text with EOS, the position the head reads (a BERT tokenizer is left alone)
    assert all(ids[-1] == task.tokenizer.eos_token_id for ids in task._ids("train"))
    assert task.tokenizer("so good")["input_ids"][-1] == task.tokenizer.eos_token_id
    # every example of an epoch is seen once before any repeats
    assert sorted(i for i, _ in task.global_rows(0, 24)) == list(range(24))


def test_metric_choice(data_dir):
    assert make_task(data_dir).metric == "accuracy" and make_task(data_dir).greater_is_better
    t = make_task(data_dir, metric="macro_f1")
    assert t.metric == "macro_f1" and t.greater_is_better
    with pytest.raises(ConfigError, match="metric"):
        make_task(data_dir, metric="bleu")
    with pytest.raises(ConfigError, match="class_weights"):
        make_task(data_dir, class_weights="inverse")


def test_frozen_body_does_not_change_but_the_head_does(data_dir):
    task = make_task(data_dir)
    model = tiny_classifier(task.tokenizer).train()
    trainable = freeze_body(model)
    assert head_module_names(model) == ["score"] and trainable == ["score.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        batch = task.collate(task.global_rows(step, 8))
        loss = task.loss(model, batch) / task.batch_units(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n.startswith("score."):
            assert not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n  # bitwise equal


def test_balanced_class_weights_match_sklearn_and_weight_the_loss(tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0, 0, 0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(
        balanced_class_weights(y, 3), compute_class_weight("balanced", classes=np.arange(3), y=y)
    )
    assert balanced_class_weights(np.array([0, 0, 1]), 3)[2] == 1.0  # an absent class does not divide by zero

    imbalanced = [(t, "pos") for t in POS * 3] + [(NEG[0], "neg")]
    data = open_data_dir(fixtures.write_classify_data_dir(tmp_path / "imb", imbalanced, imbalanced[:4]))
    task = make_task(data, class_weights="balanced")
    np.testing.assert_allclose(task.class_weights, [19 / 2, 19 / 36])
    model = tiny_classifier(task.tokenizer)
    batch = task.collate(list(range(len(imbalanced))))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        expected = (ce * torch.tensor(task.class_weights, dtype=torch.float32)[batch["labels"]]).sum()
        torch.testing.assert_close(task.loss(model, batch), expected)


def test_augmented_batches_are_deterministic_and_differ(data_dir):
    plain = make_task(data_dir)
    aug = make_task(data_dir, augment=1.0)
    rows_ = aug.global_rows(3, 8)
    a, b = aug.collate(rows_), aug.collate(rows_)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    p = plain.collate(plain.global_rows(3, 8))
    assert torch.equal(a["labels"], p["labels"])
    assert a["input_ids"].shape != p["input_ids"].shape or not torch.equal(a["input_ids"], p["input_ids"])
    # validation batches are never augmented
    assert torch.equal(aug.collate([0, 1, 2], "val")["input_ids"], plain.collate([0, 1, 2], "val")["input_ids"])
    with pytest.raises(ConfigError, match="augment"):
        make_task(data_dir, augment=1.5)


def test_evaluate_reports_accuracy_and_macro_f1(data_dir):
    task = make_task(data_dir, metric="macro_f1")
    model = tiny_classifier(task.tokenizer)
    m = task.evaluate(model.eval(), batch_size=5)
    probs, y = task.predict_split(model, "val", batch_size=5)
    assert probs.shape == (12, 2) and np.allclose(probs.sum(1), 1)
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    assert set(m) >= {"val_loss", "accuracy", "macro_f1"}


def _tiny_bert_dir(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w.strip(",") for t in POS + NEG for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ","] + words
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(cfg).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def test_a_local_bert_encoder_trains_through_the_task(tmp_path, data_dir):
    from owngpt.checkpoint import load_model
    from owngpt.tokenizer import load_tokenizer

    bert_dir = _tiny_bert_dir(tmp_path)
    tok = load_tokenizer(bert_dir)
    task = make_task(data_dir, tok=tok)
    model = load_model(bert_dir, task="classify", ignore_mismatched_sizes=True, **task.model_config_overrides())
    assert model.config.id2label == {0: "neg", 1: "pos"}
    batch = task.collate(task.global_rows(0, 6))
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()  # the encoder's own [CLS] ... [SEP]
    assert tok.eos_token_id is None or tok.eos_token_id not in batch["input_ids"]
    assert head_module_names(model) == ["classifier"]
    trainable = freeze_body(model)
    assert all(n.startswith("classifier.") for n in trainable)
    loss = task.loss(model.train(), batch)
    loss.backward()
    assert torch.isfinite(loss) and model.classifier.weight.grad is not None
    assert model.bert.embeddings.word_embeddings.weight.grad is None


def test_an_owngpt_language_model_is_the_body_of_a_classifier(tmp_path, data_dir):
    from owngpt.checkpoint import load_model

    lm_dir = fixtures.save_tiny_checkpoint(tmp_path / "lm")
    lm = load_model(lm_dir)
    task = make_task(data_dir)
    clf = load_model(lm_dir, task="classify", ignore_mismatched_sizes=True, **task.model_config_overrides())
    assert type(clf).__name__ == "GPT2ForSequenceClassification" and clf.config.num_labels == 2
    body = dict(lm.transformer.named_parameters())
    for n, p in clf.transformer.named_parameters():
        assert torch.equal(p, body[n]), n  # every body weight transferred
    batch = task.collate([0, 1])
    assert torch.isfinite(task.loss(clf, batch))
