"""Classification metrics: pure functions of gold and predicted label ids, shared by training's evaluation
(owngpt.tasks.classify) and `owngpt eval` (owngpt.classify_eval).

They are computed from the confusion matrix with numpy (a few lines) so that training and `owngpt eval` do not
need scikit-learn, which is only a dev dependency; the tests check every number against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> np.ndarray:
    """(K, K) counts: row = gold label, column = predicted label."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision, recall, F1 and support.

    Conventions follow scikit-learn's `zero_division=0`: a class never predicted has precision 0, a class absent
    from the gold labels has recall 0, and macro-F1 averages over *all* classes of the label map.
    """
    k = len(labels)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    n = int(cm.sum())
    return {
        "num_examples": n,  # not "examples": owngpt eval uses that key for generated samples
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1.mean()) if k else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
    }
