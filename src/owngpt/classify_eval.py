"""Evaluation of a classifier: accuracy, macro-F1, per-class precision/recall/F1 and a confusion-matrix PNG.

`evaluate_checkpoint(ckpt, data_dir)` is what `owngpt eval` runs on a `--task classify` data dir;
the metrics themselves (`classification_metrics`, shared with training's evaluation) are owngpt.metrics'.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from owngpt import atomic
from owngpt.data.datadir import open_data_dir
from owngpt.errors import DataError
from owngpt.metrics import classification_metrics, confusion_matrix  # noqa: F401  (their home: owngpt.metrics)
from owngpt.predict import load_classifier, predict_proba


def plot_confusion_matrix(
    cm: np.ndarray | list, labels: Sequence[str], path: str | os.PathLike, title: str = "Confusion matrix"
) -> Path:
    """Save a confusion-matrix heat map with counts in each cell (matplotlib's Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = len(labels)
    size = max(4.0, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(labels), rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.aside(path) as tmp:  # never a half-written PNG
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path


def evaluate_checkpoint(
    ckpt: str | os.PathLike | Any,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    split: str = "val",
    batch_size: int = 32,
    progress: bool = False,
    device: Any = None,
) -> dict[str, Any]:
    """Classify a data dir's `split` with a checkpoint (a spec or an opened owngpt.checkpoint.Checkpoint; on
    `device`, None = cpu); return the metrics and save
    `confusion_{split}.png`.

    The PNG goes to `out_dir`, by default a directory `eval-<checkpoint name>` next to the checkpoint.
    Gold labels are matched to the model's labels by name, so a data dir prepared separately works as long as its
    labels are ones the model knows.
    """

    data = open_data_dir(data_dir)
    if data.task != "classify":
        raise DataError(
            f"{data.path} holds '{data.task}' data: classification metrics need a data dir prepared with "
            "`owngpt prepare ... --task classify`"
        )
    records = list(data.records(split))
    if not records:
        raise DataError(
            f"{data.path}: split '{split}' has no examples (splits: "
            f"{', '.join(s for s in data.meta.get('splits', {}) if data.has_split(s)) or 'none'})"
        )
    clf = load_classifier(ckpt, device=device or "cpu")
    index = {name: i for i, name in enumerate(clf.labels)}
    unknown = sorted({str(r["label"]) for r in records} - set(index))
    if unknown:
        raise DataError(
            f"{data.path}/{split}.jsonl has labels {unknown} that {clf.path} was not trained on (it knows {clf.labels})"
        )
    y = np.asarray([index[str(r["label"])] for r in records], dtype=np.int64)
    probs = predict_proba(clf, [str(r["text"]) for r in records], batch_size=batch_size, progress=progress)
    result = classification_metrics(y, probs.argmax(-1), clf.labels)
    result["loss"] = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    result.update({"task": "classify", "checkpoint": str(clf.path), "data": str(data.path), "split": split})
    out = Path(out_dir) if out_dir is not None else clf.path.parent / f"eval-{clf.path.name}"
    png = plot_confusion_matrix(
        result["confusion_matrix"],
        clf.labels,
        out / f"confusion_{split}.png",
        title=f"{clf.path.name} on {data.path.name}/{split} (accuracy {result['accuracy']:.3f})",
    )
    result["confusion_png"] = str(png)
    return result


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of `classification_metrics` / `evaluate_checkpoint` output, for the terminal."""
    lines = [
        f"examples  {result['num_examples']}",
        f"accuracy  {result['accuracy']:.4f}",
        f"macro-F1  {result['macro_f1']:.4f}",
    ]
    if "loss" in result:
        lines.append(f"loss      {result['loss']:.4f}")
    width = max([5] + [len(n) for n in result["per_class"]])
    lines.append("")
    lines.append(f"{'label':<{width}}  precision  recall     f1  support")
    for name, m in result["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:.4f}  {m['support']:7d}")
    if result.get("confusion_png"):
        lines += ["", f"confusion matrix: {result['confusion_png']}"]
    return "\n".join(lines)
