"""`owngpt predict` and `owngpt.predict`: inputs, outputs, ensembles, loading without owngpt, evaluation metrics."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fixtures
from owngpt.checkpoint import save_checkpoint
from owngpt.cli import main
from owngpt.errors import CheckpointError, ConfigError, DataError
from owngpt.predict import ensemble_predict, load_classifier, predict_proba, read_texts, write_predictions
from owngpt.tasks.classify import collate_ids, encode_texts

TEXTS = ["what a good film", "bad, bad story", "so-so", "Speak, speak.", "床前明月光", ""]


def save_classifier(path, labels=("neg", "pos"), seed=0):
    tok = fixtures.char_tokenizer()
    model = fixtures.tiny_gpt2(tok, task="classify", num_labels=len(labels), seed=seed)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    meta = {"task": "classify", "labels": list(labels), "block_size": 64, "step": 0}
    return save_checkpoint(path, model, tok, meta)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("clf")
    return {
        "a": save_classifier(d / "a", seed=0),
        "b": save_classifier(d / "b", seed=1),
        "rev": save_classifier(d / "rev", labels=("pos", "neg"), seed=2),
        "three": save_classifier(d / "three", labels=("neg", "neutral", "pos"), seed=3),
    }


def test_predict_proba_matches_the_model_one_text_at_a_time(ckpts):
    clf = load_classifier(ckpts["a"])
    assert clf.labels == ["neg", "pos"] and clf.max_length == 64
    probs = predict_proba(clf, TEXTS, batch_size=4)
    with torch.no_grad():
        for t, p in zip(TEXTS, probs):
            ids = encode_texts(clf.tokenizer, [t], 64)[0]
            expected = torch.softmax(clf.model(input_ids=torch.tensor([ids])).logits, -1)[0].numpy()
            np.testing.assert_allclose(p, expected, atol=1e-5)


def test_an_ensemble_of_one_equals_its_model_and_of_two_is_the_mean(ckpts):
    a, b, rev = (load_classifier(ckpts[k]) for k in ("a", "b", "rev"))
    labels, one = ensemble_predict([a], TEXTS)
    assert labels == ["neg", "pos"]
    np.testing.assert_array_equal(one, predict_proba(a, TEXTS))
    _, two = ensemble_predict([a, b], TEXTS)
    np.testing.assert_allclose(two, (predict_proba(a, TEXTS) + predict_proba(b, TEXTS)) / 2)
    # a model listing the same labels in another order is aligned by name
    _, mixed = ensemble_predict([a, rev], TEXTS)
    np.testing.assert_allclose(mixed, (predict_proba(a, TEXTS) + predict_proba(rev, TEXTS)[:, ::-1]) / 2)


def test_an_ensemble_needs_one_label_set(ckpts):
    with pytest.raises(ConfigError, match="same label set"):
        ensemble_predict([load_classifier(ckpts["a"]), load_classifier(ckpts["three"])], TEXTS)


def test_a_language_model_is_refused(tiny_ckpt):
    with pytest.raises(CheckpointError, match="not a classifier"):
        load_classifier(tiny_ckpt)


def test_read_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hi, there",1\nbye,0\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nhi there\t1\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n\n{"text": "好"}\n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "a.csv")) == ["hi, there", "bye"]
    assert read_texts(str(tmp_path / "a.tsv"), text_column="sentence") == ["hi there"]
    assert read_texts(str(tmp_path / "a.jsonl")) == ["hi", "好"]
    assert read_texts(str(tmp_path / "a.txt")) == ["one", "two"]
    assert read_texts("-", stdin=io.StringIO('{"text": "x"}\n')) == ["x"]
    assert read_texts("-", stdin=io.StringIO("plain\nlines\n")) == ["plain", "lines"]
    with pytest.raises(DataError, match=r"a\.tsv:1: no column 'text'"):
        read_texts(str(tmp_path / "a.tsv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        read_texts(str(tmp_path / "missing.csv"))


def test_write_predictions_jsonl_and_csv():
    probs = np.array([[0.25, 0.75], [0.9, 0.1]])
    out = io.StringIO()
    write_predictions(out, ["a, b", "c"], ["neg", "pos"], probs, "jsonl")
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[0] == {"text": "a, b", "label": "pos", "probs": {"neg": 0.25, "pos": 0.75}}
    out = io.StringIO()
    write_predictions(out, ["a, b", "c"], ["neg", "pos"], probs, "csv")
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[1] == {"text": "c", "label": "neg", "p_neg": "0.900000", "p_pos": "0.100000"}


def test_cli_predict_writes_jsonl_csv_and_ensembles(ckpts, tmp_path, capsys):
    inp = tmp_path / "in.csv"
    inp.write_text("text,label\n" + "".join(f'"{t}",x\n' for t in TEXTS), encoding="utf-8")
    assert main(["predict", str(ckpts["a"]), "--input", str(inp)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = predict_proba(load_classifier(ckpts["a"]), TEXTS)
    assert [r["text"] for r in rows] == TEXTS
    assert [r["label"] for r in rows] == [["neg", "pos"][k] for k in expected.argmax(1)]
    np.testing.assert_allclose([[r["probs"]["neg"], r["probs"]["pos"]] for r in rows], expected, atol=1e-6)

    out = tmp_path / "sub" / "pred.csv"
    args = ["predict", "--models", str(ckpts["a"]), str(ckpts["b"]), "-i", str(inp), "--format", "csv", "-o", str(out)]
    assert main(args) == 0
    got = list(csv.DictReader(open(out, encoding="utf-8")))
    _, mean = ensemble_predict([load_classifier(ckpts["a"]), load_classifier(ckpts["b"])], TEXTS)
    np.testing.assert_allclose([float(r["p_pos"]) for r in got], mean[:, 1], atol=1e-6)
    assert not list(out.parent.glob(".*tmp"))  # written aside and renamed

    assert main(["predict", "--input", str(inp)]) == 2  # no checkpoint: a one-line error, no traceback
    assert "error: pass a checkpoint" in capsys.readouterr().err


def test_checkpoint_loads_with_transformers_alone(ckpts):
    """A subprocess that cannot import owngpt loads the classifier and gets the same probabilities."""
    code = f"""
import sys, json
sys.modules["owngpt"] = None  # any import of owngpt now fails
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path = {str(ckpts["a"])!r}
model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
tok = AutoTokenizer.from_pretrained(path)
texts = {TEXTS[:4]!r}
batch = tok(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    probs = torch.softmax(model(**batch).logits, -1).tolist()
print(json.dumps({{"id2label": model.config.id2label, "probs": probs, "pad": model.config.pad_token_id}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["id2label"] == {"0": "neg", "1": "pos"}
    np.testing.assert_allclose(got["probs"], predict_proba(load_classifier(ckpts["a"]), TEXTS[:4]), atol=1e-5)


def test_evaluate_checkpoint_metrics_match_sklearn_and_save_a_png(ckpts, tmp_path):
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    from owngpt.classify_eval import evaluate_checkpoint, format_report

    train = [(t, lab) for t, lab in zip(TEXTS[:5], ["pos", "neg", "neg", "pos", "pos"])]
    val = [(t, lab) for t in TEXTS for lab in ("neg", "pos")]
    data = fixtures.write_classify_data_dir(tmp_path / "data", train, val)
    r = evaluate_checkpoint(ckpts["a"], data, out_dir=tmp_path / "ev")
    gold = [["neg", "pos"].index(lab) for _, lab in val]
    pred = predict_proba(load_classifier(ckpts["a"]), [t for t, _ in val]).argmax(1)
    assert r["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert r["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    for k, name in enumerate(["neg", "pos"]):
        assert r["per_class"][name]["precision"] == pytest.approx(
            precision_score(gold, pred, labels=[k], average=None, zero_division=0)[0]
        )
        assert r["per_class"][name]["recall"] == pytest.approx(
            recall_score(gold, pred, labels=[k], average=None, zero_division=0)[0]
        )
    assert (tmp_path / "ev" / "confusion_val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macro-F1" in format_report(r) and "precision" in format_report(r)


def test_metrics_match_sklearn_with_an_unpredicted_and_an_absent_class():
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from owngpt.classify_eval import classification_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)  # class 3 never appears in gold
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    p[p == 2] = 1  # class 2 never predicted
    m = classification_metrics(y, p, ["a", "b", "c", "d"])
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=range(4), zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, labels=range(4), average="macro", zero_division=0))
    np.testing.assert_allclose([m["per_class"][c]["precision"] for c in "abcd"], prec)
    np.testing.assert_allclose([m["per_class"][c]["recall"] for c in "abcd"], rec)
    assert [m["per_class"][c]["support"] for c in "abcd"] == sup.tolist()
    assert m["confusion_matrix"] == confusion_matrix(y, p, labels=range(4)).tolist()


def test_collate_pads_to_the_longest():
    b = collate_ids([[5, 6, 7], [8]], pad_id=1, padding_side="left")
    assert b["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
