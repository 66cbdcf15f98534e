"""Oracles for three pieces of arithmetic that earlier tests let through: which documents `prepare` holds out (the
seed must matter), int8 scales (one per output row), and balanced class weights when a class is absent.

Each test names the one-line bug it was seen to catch (planted, run, reverted; see docs/testing.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from owngpt.data.prepare import PrepareConfig, prepare
from owngpt.quantize import quantize_weight
from owngpt.tasks.classify import balanced_class_weights


def _docs_by_split(out) -> dict[str, set[str]]:
    """Documents of an lm data dir, read from the raw .bin files and split at end-of-text."""
    from owngpt.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    meta = json.loads((out / "meta.json").read_text())
    docs = {}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.dtype(meta["dtype"])).tolist()
        cuts = [-1] + [i for i, t in enumerate(ids) if t == tok.eos_token_id]
        docs[split] = {tok.decode(ids[a + 1 : b]) for a, b in zip(cuts, cuts[1:])}
    return docs


def test_the_validation_documents_depend_on_the_seed_and_only_on_it(tmp_path):
    # catches: the split drawn with a fixed seed instead of --seed (meta.json differs anyway: it records the seed)
    names = ["ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen", "ibis", "jay"]
    docs = [f"the {a} met the {b}" for a in names for b in names[:3]]  # 30 distinct documents
    src = tmp_path / "docs.txt"
    src.write_text("\n%\n".join(docs) + "\n", encoding="utf-8")

    def split(seed: int, out: str) -> dict[str, set[str]]:
        cfg = PrepareConfig(
            sources=[str(src)], out=str(tmp_path / out), tokenizer="char", doc_sep="%", val_fraction=0.2, seed=seed,
            progress=False, quiet=True,
        )  # fmt: skip
        prepare(cfg)
        return _docs_by_split(tmp_path / out)

    a, again, b = split(1, "a"), split(1, "again"), split(2, "b")
    for s in (a, b):
        assert s["train"] | s["val"] == set(docs) and not s["train"] & s["val"]
        assert len(s["val"]) == 6  # 20% of 30, by document
    assert a == again
    assert a["val"] != b["val"]  # (the chance that two seeds pick the same 6 of 30 is 1 in 593,775)


def test_int8_scales_are_one_per_output_row():
    # catches: one scale for the whole matrix (rows of small weights then round to zero), or a scale per column
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-3, 2, 6)  # rows 1e-3 .. 1e2: a shared scale would wipe out the small rows
    w = torch.randn(6, 40, generator=g) * magnitudes[:, None]
    q, s = quantize_weight(w)
    torch.testing.assert_close(s, w.abs().amax(dim=1) / 127.0)  # the largest |w| of each row maps to +-127
    assert (q.abs().amax(dim=1) == 127).all()
    err = (q.float() * s[:, None] - w).abs().amax(dim=1)
    assert (err <= w.abs().amax(dim=1) / 254 * (1 + 1e-5)).all()  # half a step of the row's own scale
    assert (err / w.abs().amax(dim=1) < 0.005).all()
    zero = quantize_weight(torch.zeros(2, 3))
    assert (zero[0] == 0).all() and torch.isfinite(zero[1]).all()  # an all-zero row does not divide by zero


def test_balanced_weights_with_an_absent_class_match_sklearn_on_the_classes_present():
    # catches: weights scaled by the number of labels instead of the number present
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0, 0, 0, 0, 1, 1, 3, 0, 1, 3, 3, 3, 3, 3])
    present = np.array([0, 1, 3])
    w = balanced_class_weights(y, 5)  # labels 2 and 4 never occur in training
    np.testing.assert_allclose(w[present], compute_class_weight("balanced", classes=present, y=y))
    np.testing.assert_allclose(w[present], [len(y) / (3 * 5), len(y) / (3 * 3), len(y) / (3 * 6)])
    assert w[2] == w[4] == 1.0
    # balanced weights average to 1 over the training rows: the weighted loss keeps the unweighted scale
    assert np.mean(w[y]) == pytest.approx(1.0)
