"""Classify texts with a trained classifier checkpoint, or average the probabilities of several (an ensemble).

    clf = load_classifier("run/checkpoints/best")
    probs = predict_proba(clf, ["a gripping film", "a dull mess"])      # (N, K), rows sum to 1
    labels, probs = ensemble_predict([clf, clf2], texts)               # label names and averaged probabilities

Inputs (`read_texts`): CSV with a text column, TSV, JSONL objects with a "text" field, or plain lines (one text per
line); outputs (`write_predictions`): JSONL (`{"text", "label", "probs": {label: p}}`) or CSV (`text,label,p_<label>`).
Labels are the *names* of `config.id2label`, the same strings the training data used.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from owngpt.checkpoint import Checkpoint, open_checkpoint
from owngpt.errors import CheckpointError, ConfigError, DataError
from owngpt.outdir import check_out_file
from owngpt.tasks.classify import classifier_logits, collate_ids, encode_texts

FORMATS = ("auto", "csv", "tsv", "jsonl", "lines")
DEFAULT_MAX_LENGTH = 256


@dataclass
class Classifier:
    """A loaded sequence classifier: the model (eval mode), its tokenizer, label names in id order."""

    model: Any
    tokenizer: Any
    labels: list[str]
    path: Path
    max_length: int


def load_classifier(ckpt: str | os.PathLike | Any, device: str = "cpu") -> Classifier:
    """Load a classifier checkpoint (safetensors only; a spec or an opened owngpt.checkpoint.Checkpoint) with its
    tokenizer and label names."""

    c = ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt)
    archs = getattr(c.config, "architectures", None) or []
    if c.task != "classify" or (archs and not any("SequenceClassification" in a for a in archs)):
        raise CheckpointError(
            f"{c.path} is a {c.meta.get('task') or ', '.join(archs) or c.task} checkpoint, not a classifier: "
            "train one with `owngpt train --task classify` and pass its checkpoint"
        )
    model = c.model("classify", device=device).eval()
    tok = c.tokenizer()  # with the pad token training used (owngpt.tasks.classify)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return Classifier(model, tok, c.labels, c.path, classifier_max_length(c))


def classifier_max_length(c: Any) -> int:
    """The input length of a classifier (a Checkpoint): the block it was trained on (a from-scratch model has
    untrained position embeddings past it); for a Hugging Face classifier its position table, at most 256."""
    config = c.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    max_length = int(c.meta.get("block_size") or min(context or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH))
    if config.model_type in ("roberta", "xlm-roberta", "camembert") and context:
        max_length = min(max_length, context - 2)  # RoBERTa's positions start after padding_idx
    return max_length


def predict_proba(clf: Classifier, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """(N, K) class probabilities, computed in batches of similar lengths (less padding), in input order."""
    import torch

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    ids = encode_texts(clf.tokenizer, texts, clf.max_length) if len(texts) else []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    probs = np.zeros((len(ids), len(clf.labels)), dtype=np.float64)
    device = next(clf.model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc=f"classify {clf.path.name}", unit="text", file=sys.stderr)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            b = collate_ids([ids[i] for i in chunk], clf.tokenizer.pad_token_id)
            logits = classifier_logits(clf.model, b["input_ids"].to(device), b["attention_mask"].to(device))
            probs[chunk] = torch.softmax(logits.float(), -1).cpu().numpy()
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return probs


def ensemble_predict(
    classifiers: Sequence[Classifier], texts: Sequence[str], batch_size: int = 32, progress: bool = False
) -> tuple[list[str], np.ndarray]:
    """(label names, averaged probabilities (N, K)) of one or more classifiers sharing one label set.

    The first model's label order is used; the others' columns are reordered by name, so models whose label maps
    list the same names in another order still combine correctly.
    """
    if not classifiers:
        raise ConfigError("no model to predict with: pass a checkpoint or --models A B ...")
    labels = classifiers[0].labels
    for c in classifiers[1:]:
        if sorted(c.labels) != sorted(labels):
            raise ConfigError(
                f"--models: {c.path} predicts labels {c.labels} but {classifiers[0].path} predicts "
                f"{labels}; an ensemble needs models trained on the same label set"
            )
    total = np.zeros((len(texts), len(labels)), dtype=np.float64)
    for c in classifiers:
        p = predict_proba(c, texts, batch_size=batch_size, progress=progress)
        total += p[:, [c.labels.index(name) for name in labels]]
    return labels, total / len(classifiers)


# --- input and output ---------------------------------------------------------------------------------------------
def _guess_format(name: str, head: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl"):
        return suffix[1:]
    if suffix == ".json" or head.lstrip().startswith("{"):
        return "jsonl"
    return "lines"


def read_texts(source: str, text_column: str = "text", fmt: str = "auto", stdin: IO[str] | None = None) -> list[str]:
    """The texts of a file (or `-` for standard input) in CSV, TSV, JSONL or plain-lines format.

    `auto` decides by the extension (.csv, .tsv, .jsonl/.json), else by content: JSON objects or plain lines.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--input-format {fmt}: expected one of {', '.join(FORMATS)}")
    name = "<stdin>" if source == "-" else source
    try:
        raw = (stdin or sys.stdin).read() if source == "-" else Path(source).read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise DataError(f"--input {source}: no such file") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start}); convert it to UTF-8 first") from e
    if fmt == "auto":
        fmt = _guess_format(name, raw[:1000])
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter="," if fmt == "csv" else "\t")
        columns = reader.fieldnames or []
        if text_column not in columns:
            raise DataError(f"{name}:1: no column '{text_column}' in the header {columns}; pass --text-column NAME")
        texts = []
        for row in reader:
            value = row.get(text_column)
            if value is None:
                raise DataError(f"{name}:{reader.line_num}: the row has fewer fields than the header")
            texts.append(value)
        return texts
    if fmt == "jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f'{name}:{n}: not valid JSON ({e.msg}); expected one {{"text": ...}} per line') from e
            if not isinstance(obj, dict) or not isinstance(obj.get(text_column), str):
                raise DataError(f"{name}:{n}: expected an object with a string field '{text_column}'")
            texts.append(obj[text_column])
        return texts
    return [line for line in raw.splitlines() if line.strip()]


def is_predictions_file(path: str | os.PathLike) -> bool:
    """Whether `path` holds predictions owngpt wrote: a first line {"text", "label", "probs"} (JSONL) or the CSV
    header text,label,p_... An empty file counts too (predictions for no texts)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(1 << 20).rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return False
    if not first:
        return True
    if first.startswith("{"):
        try:
            row = json.loads(first)
        except ValueError:
            return False
        return isinstance(row, dict) and set(row) == {"text", "label", "probs"}
    cols = first.split(",")
    return cols[:2] == ["text", "label"] and len(cols) > 2 and all(c.startswith("p_") for c in cols[2:])


def check_predictions_output(output: str | os.PathLike, inputs: Sequence[tuple[str, Any]] = ()) -> None:
    """Refuse an --output that would replace something that is not owngpt's predictions: a folder (os.replace
    failed with IsADirectoryError after the whole run), an input (`inputs`: the texts, the checkpoints) or a file of
    yours (it was silently replaced). The rules are owngpt.outdir's, for every output that is one file."""

    check_out_file(
        output,
        inputs,
        ours=is_predictions_file,
        what="a predictions file",
        example="predictions.jsonl",
        flag="--output",
    )


def write_predictions(
    out: IO[str], texts: Sequence[str], labels: Sequence[str], probs: np.ndarray, fmt: str = "jsonl", digits: int = 6
) -> None:
    """One row per text: the predicted label name and every class's probability."""
    pred = probs.argmax(-1) if len(texts) else []
    if fmt == "jsonl":
        for t, k, p in zip(texts, pred, probs):
            row = {
                "text": t,
                "label": labels[k],
                "probs": {name: round(float(x), digits) for name, x in zip(labels, p)},
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["text", "label"] + [f"p_{name}" for name in labels])
        for t, k, p in zip(texts, pred, probs):
            w.writerow([t, labels[k]] + [f"{float(x):.{digits}f}" for x in p])
    else:
        raise ConfigError(f"--format {fmt}: expected jsonl or csv")
