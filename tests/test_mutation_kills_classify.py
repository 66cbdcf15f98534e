"""The classification task's contract, written against the classes of mutants that survived in tasks/classify (#25):
the settings it accepts and refuses (from both sides of each bound), predictions against the model run on each text
alone in eval mode, the evaluation metrics against scikit-learn, and when the EOS readout is added. Tiny random
models on small data dirs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fixtures
from owngpt.config import TrainConfig
from owngpt.data.datadir import open_data_dir
from owngpt.errors import ConfigError, DataError
from owngpt.tasks.classify import ClassifyTask, add_eos_readout, encode_texts

TRAIN = [("good fun", "pos"), ("bad day", "neg"), ("nice", "pos"), ("awful", "neg"), ("great", "pos")]
VAL = [
    ("so good", "pos"),
    ("bad", "neg"),
    ("a fine film", "pos"),
    ("poor", "neg"),
    ("", "pos"),
    ("really awful", "neg"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return open_data_dir(fixtures.write_classify_data_dir(tmp_path_factory.mktemp("cls") / "d", TRAIN, VAL))


def _task(data, tok=None, **cfg) -> ClassifyTask:
    return ClassifyTask(data, tok or data.load_tokenizer(), TrainConfig(task="classify", **cfg), block_size=32)


SETTINGS = [
    ({}, None),
    (dict(metric="accuracy"), None),
    (dict(metric="macro_f1"), None),
    (dict(metric="val_loss"), None),
    (dict(metric="f1"), "metric='f1': for --task classify use one of accuracy, macro_f1, val_loss"),
    (dict(class_weights="none"), None),
    (dict(class_weights="balanced"), None),
    (dict(class_weights="inverse"), "class_weights='inverse': expected balanced"),
    (dict(augment=0.0), None),
    (dict(augment=1.0), None),
    (dict(augment=-0.01), "augment=-0.01: the probability of augmenting an example must be in [0, 1]"),
    (dict(augment=1.01), "augment=1.01: the probability"),
]


@pytest.mark.parametrize("cfg,refused", SETTINGS, ids=[str(c) for c, _ in SETTINGS])
def test_each_setting_is_accepted_up_to_its_bound_and_refused_past_it(data, cfg, refused):
    if refused is not None:
        with pytest.raises(ConfigError) as e:
            _task(data, **cfg)
        assert str(e.value).startswith(refused), str(e.value)
        return
    task = _task(data, **cfg)
    assert task.metric == (cfg.get("metric") or "accuracy")
    assert task.greater_is_better is (task.metric != "val_loss")
    assert (task.augmenter is not None) is (cfg.get("augment", 0) > 0)
    if cfg.get("class_weights") == "balanced":  # 3 pos, 2 neg in train: n / (k * count)
        assert task.class_weights.tolist() == pytest.approx([5 / (2 * 2), 5 / (2 * 3)])
    else:
        assert task.class_weights is None


def test_a_classifier_needs_two_labels_and_a_pad_or_end_token(tmp_path, data):
    one = open_data_dir(fixtures.write_classify_data_dir(tmp_path / "one", [("a", "x"), ("b", "x")], []))
    one.meta["labels"] = ["x"]
    with pytest.raises(DataError, match=r"lists 1 label\(s\) \['x'\]: a classifier needs at least two"):
        _task(one)
    tok = data.load_tokenizer()
    tok.pad_token = None
    task = _task(data, tok)
    assert task.tokenizer.pad_token_id == task.tokenizer.eos_token_id is not None  # end-of-text pads
    tok = data.load_tokenizer()
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ConfigError, match="neither a pad nor an EOS token"):
        _task(data, tok)


# --- predictions ----------------------------------------------------------------------------------------------


def _alone(model, ids):
    with torch.no_grad():
        return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()


@pytest.mark.parametrize("training", [True, False])
def test_predictions_are_each_text_alone_in_eval_mode_and_the_mode_is_restored(data, training):
    # dropout on: a prediction made in training mode would be random; the model's own mode is given back after
    task = _task(data)
    model = fixtures.tiny_gpt2(task.tokenizer, task="classify")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.config.pad_token_id = task.tokenizer.pad_token_id
    model.train(training)
    probs, y = task.predict_split(model, "val", batch_size=4)  # batches of several lengths, sorted by length
    assert model.training is training
    model.eval()
    ids = encode_texts(task.tokenizer, [t for t, _ in VAL], 32)
    want = np.stack([_alone(model, x) for x in ids])
    np.testing.assert_allclose(probs, want, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert y.tolist() == [task.labels.index(lab) for _, lab in VAL]


def test_evaluation_metrics_equal_scikit_learn_on_the_predictions(data):
    from sklearn.metrics import accuracy_score, f1_score

    task = _task(data)
    model = fixtures.tiny_gpt2(task.tokenizer, task="classify", seed=3)
    model.config.pad_token_id = task.tokenizer.pad_token_id
    probs, y = task.predict_split(model, "val")
    got = task.evaluate(model, batch_size=4)
    pred = probs.argmax(-1)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=[0, 1], zero_division=0))
    assert got["val_loss"] == pytest.approx(float(np.mean([-np.log(probs[i, y[i]]) for i in range(len(y))])))
    assert set(got) == {"val_loss", "accuracy", "macro_f1"}


# --- the EOS readout and empty texts ------------------------------------------------------------------------------


def test_the_eos_readout_is_added_only_where_the_head_needs_it(data):
    tok = data.load_tokenizer()
    assert add_eos_readout(tok) is True
    assert tok("a b")["input_ids"] == tok("a b", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert add_eos_readout(tok) is False  # it adds a special token now: left alone
    same = data.load_tokenizer()
    same.pad_token = same.eos_token  # the head finds the last non-pad token: EOS cannot be the readout
    assert add_eos_readout(same) is False and same("a b")["input_ids"][-1] != same.eos_token_id
    none = data.load_tokenizer()
    none.eos_token = None
    assert add_eos_readout(none) is False


def test_an_empty_text_is_read_from_the_pad_token_when_there_is_no_end_of_text(data):
    tok = data.load_tokenizer()
    assert encode_texts(tok, ["", "ab"], 8)[0] == [tok.eos_token_id]
    tok.eos_token = None
    assert tok.eos_token_id is None and tok.pad_token_id is not None
    assert encode_texts(tok, ["", "ab"], 8) == [[tok.pad_token_id], tok("ab")["input_ids"]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_roberta_classifier_positions_its_rows_itself(side):
    # RoBERTa derives position ids from its pad token itself (offset by padding_idx): classifier_logits must call it
    # as it is, with no positions of its own, on either padding side. Oracle: the model called directly; with right
    # padding (its tokenizer's side) that is also each row alone.
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from owngpt.tasks.classify import classifier_logits, collate_ids

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, pad_token_id=1, num_labels=3)  # fmt: skip
    model = RobertaForSequenceClassification(cfg).eval()
    seqs = [[0, 5, 6, 7, 8, 9, 2], [0, 11, 2], [0, 12, 13, 2]]
    batch = collate_ids(seqs, pad_id=1, padding_side=side)
    with torch.no_grad():
        got = classifier_logits(model, batch["input_ids"], batch["attention_mask"])
        direct = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits for s in seqs])
    torch.testing.assert_close(got, direct)
    if side == "right":
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_texts_are_cut_to_max_length_tokens_specials_included(data):
    # a text longer than the block reads its first tokens, the EOS readout still last (the position the head reads)
    tok = data.load_tokenizer()
    add_eos_readout(tok)
    long = "good fun " * 20
    (ids,) = encode_texts(tok, [long], 8)
    assert len(ids) == 8 and ids[-1] == tok.eos_token_id
    assert ids[:-1] == tok(long, add_special_tokens=False)["input_ids"][:7]
