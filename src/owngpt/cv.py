"""K-fold cross-validation of a classifier: `owngpt train --task classify ... cv=K`.

The train split of the data dir is cut into K stratified folds (each class spread evenly over the folds, the order
fixed by `seed`). Fold k trains on the other K-1 folds and is evaluated on fold k, with the unchanged training loop
(`owngpt.train.train`): each fold is an ordinary run dir, and its data an ordinary data dir. The data dir's own val
split is left alone: it stays a held-out set for the model you train afterwards.

    RUN/config.yaml       the resolved config (with cv=K)
    RUN/folds/data_k/     fold k's data dir (train = the other folds, val = fold k; the original tokenizer)
    RUN/fold_k/           fold k's run dir (metrics.jsonl, checkpoints/...)
    RUN/cv.json, cv.md    each fold's accuracy and macro-F1 at its best evaluation, mean ± std, and the step at
                          which the validation metric, averaged over the folds, peaked: the number of steps to train
                          the final model for (the tutorials' "choose the iterations by cross-validation").

The folds are assigned by hand (a few lines) rather than with scikit-learn's StratifiedKFold because scikit-learn is
only a dev dependency; tests check disjointness, coverage, stratification and determinism.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from owngpt import atomic
from owngpt.config import TrainConfig, save_config
from owngpt.data.datadir import RaggedWriter, building, open_data_dir, write_json
from owngpt.errors import ConfigError, DataError
from owngpt.report import report_after_run
from owngpt.train import train

LOWER_IS_BETTER = ("val_loss",)


def stratified_folds(labels: Sequence[int] | np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """K disjoint sorted index arrays that together cover range(len(labels)).

    Each class's examples are shuffled with `seed` and dealt round-robin over the folds, continuing the round where
    the previous class stopped, so every fold gets floor or ceil of each class's share and the fold sizes differ
    by at most one. The same (labels, k, seed) always gives the same folds.
    """
    y = np.asarray(labels, dtype=np.int64)
    if k < 2:
        raise ConfigError(f"cv={k}: cross-validation needs at least 2 folds")
    if len(y) < k:
        raise DataError(f"cv={k}: the train split has only {len(y)} examples, fewer than the {k} folds")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[(start + j) % k].append(int(i))
        start = (start + len(idx)) % k
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


@dataclass
class FoldResult:
    fold: int
    run_dir: Path
    best_step: int | None
    metric: float | None  # the chosen metric at the best evaluation
    accuracy: float | None
    macro_f1: float | None
    train_examples: int
    val_examples: int


@dataclass
class CVResult:
    run_dir: Path
    k: int
    metric: str
    folds: list[FoldResult]
    mean: dict[str, float]
    std: dict[str, float]
    peak_step: int | None  # where the fold-averaged validation metric was best
    peak_value: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, metric averaged over folds)

    # what tune reads from a train() result
    @property
    def best_metric(self) -> float | None:
        return self.mean.get(self.metric)

    @property
    def steps(self) -> int | None:
        return self.peak_step

    best_checkpoint = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["run_dir"] = str(self.run_dir)
        for f in d["folds"]:
            f["run_dir"] = str(f["run_dir"])
        return d


def write_fold_data_dir(data: Any, train_idx: np.ndarray, val_idx: np.ndarray, out: Path, info: dict) -> Path:
    """A classify data dir whose train/val are the given rows of `data`'s train split (same tokenizer, same ids)."""

    records = list(data.records("train"))
    y = data.label_ids("train")
    ids, offsets, _ = data.ragged("train")
    with building(out, overwrite=True) as tmp:
        shutil.copytree(data.tokenizer_path, tmp / "tokenizer")
        splits = {}
        for split, rows in (("train", train_idx), ("val", val_idx)):
            w = RaggedWriter(tmp, split, data.dtype)
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for i in rows:
                    f.write(json.dumps(records[i], ensure_ascii=False) + "\n")
                    w.add(ids[offsets[i] : offsets[i + 1]])
            w.close()
            np.save(tmp / f"{split}.labels.npy", y[rows].astype(np.int64))
            splits[split] = {"examples": int(len(rows)), "tokens": int(sum(offsets[i + 1] - offsets[i] for i in rows))}
        meta = dict(data.meta, splits=splits, cv=info)
        write_json(tmp / "meta.json", meta)
        write_json(tmp / "report.json", {})
    return out


def _evaluations(run_dir: Path) -> list[dict[str, Any]]:
    f = run_dir / "metrics.jsonl"
    out = []
    for line in f.read_text(encoding="utf-8").splitlines() if f.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "accuracy" in rec or "val_loss" in rec:
            out.append(rec)
    return out


def _better(a: float, b: float | None, higher: bool) -> bool:
    return b is None or (a > b if higher else a < b)


def summarize(run_dir: Path, fold_dirs: Sequence[Path], metric: str, sizes: Sequence[tuple[int, int]]) -> CVResult:
    """CVResult from the folds' metrics.jsonl (also usable on a finished cv run)."""
    higher = metric not in LOWER_IS_BETTER
    folds: list[FoldResult] = []
    curves: list[dict[int, float]] = []
    for k, (d, (n_train, n_val)) in enumerate(zip(fold_dirs, sizes), start=1):
        evals = _evaluations(d)
        best: dict[str, Any] | None = None
        for rec in evals:
            if metric in rec and math.isfinite(rec[metric]) and _better(rec[metric], best and best[metric], higher):
                best = rec
        curves.append({int(r["step"]): float(r[metric]) for r in evals if metric in r})
        folds.append(
            FoldResult(
                fold=k,
                run_dir=d,
                best_step=best["step"] if best else None,
                metric=best[metric] if best else None,
                accuracy=best.get("accuracy") if best else None,
                macro_f1=best.get("macro_f1") if best else None,
                train_examples=n_train,
                val_examples=n_val,
            )
        )
    mean, std = {}, {}
    for key in dict.fromkeys(("accuracy", "macro_f1", metric, "best_step")):
        vals = [getattr(f, key if key != metric else "metric") for f in folds]
        vals = [float(v) for v in vals if v is not None]
        if vals:
            mean[key] = float(np.mean(vals))
            std[key] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0  # sample std over the folds
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    curve = [(s, float(np.mean([c[s] for c in curves]))) for s in common]
    peak = None
    for s, v in curve:
        if peak is None or _better(v, peak[1], higher):
            peak = (s, v)
    return CVResult(
        run_dir=run_dir,
        k=len(fold_dirs),
        metric=metric,
        folds=folds,
        mean=mean,
        std=std,
        peak_step=peak[0] if peak else None,
        peak_value=peak[1] if peak else None,
        curve=curve,
    )


def cross_validate(cfg: TrainConfig, callbacks: Sequence[Any] = (), train_fn: Any = None) -> CVResult:
    """Train cfg.cv folds of cfg (a classify config) and summarise them; see the module docstring.

    `callbacks` are not passed to the folds (a pruner fed K runs' steps would see each step K times); the result's
    `best_metric` (mean over folds) is what `owngpt tune` optimises when its base config sets cv=K.
    """

    train_fn = train_fn or train
    k = cfg.cv
    if k < 2:
        raise ConfigError(f"cv={k}: cross-validation needs cv=K with K >= 2")
    if cfg.task != "classify":
        raise ConfigError(f"cv={k}: cross-validation is for --task classify (this run is --task {cfg.task})")
    if not cfg.data or not cfg.out:
        raise ConfigError("cv: pass --data DATA_DIR and --out RUN_DIR")
    data = open_data_dir(cfg.data)
    if data.task != "classify":
        raise DataError(f"cv={k}: {data.path} holds '{data.task}' data; prepare it with --task classify")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--out {out} already holds a run: pass --resume, --overwrite, or choose another --out")
    if cfg.overwrite and not cfg.resume and out.exists():
        if not (out / "config.yaml").exists():
            raise ConfigError(f"--overwrite: {out} is not an owngpt run dir (no config.yaml); choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml", notes=[f"{k}-fold cross-validation of {data.path}'s train split"])

    y = data.label_ids("train")
    folds = stratified_folds(y, k, cfg.seed)
    metric = cfg.metric or "accuracy"
    fold_dirs, sizes = [], []
    for i, val_idx in enumerate(folds, start=1):
        train_idx = np.sort(np.concatenate([f for j, f in enumerate(folds, start=1) if j != i]))
        fold_data = out / "folds" / f"data_{i}"
        info = {"fold": i, "k": k, "seed": cfg.seed, "source": str(data.path.absolute())}
        if not (cfg.resume and (fold_data / "meta.json").exists()):
            write_fold_data_dir(data, train_idx, val_idx, fold_data, info)
        run_dir = out / f"fold_{i}"
        fold_cfg = dataclasses.replace(
            cfg,
            data=str(fold_data),
            out=str(run_dir),
            cv=0,
            report=False,
            overwrite=False,
            resume=cfg.resume and run_dir.exists(),
            extra={**cfg.extra, "cv": info},
        )
        print(f"cv: fold {i}/{k}: {len(train_idx)} train, {len(val_idx)} val examples -> {run_dir}", file=sys.stderr)
        train_fn(fold_cfg)
        fold_dirs.append(run_dir)
        sizes.append((len(train_idx), len(val_idx)))
    result = summarize(out, fold_dirs, metric, sizes)
    _write_summary(result)
    if cfg.report:  # RUN/report.html with the folds' table (never fails the run)
        report_after_run(out)
    return result


def format_cv(r: CVResult) -> str:
    """The table `owngpt train ... cv=K` prints and writes to cv.md."""

    def f(v: float | None, digits: int = 4) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    extra = r.metric not in ("accuracy", "macro_f1")  # e.g. val_loss: its own column
    lines = [
        f"# {r.k}-fold cross-validation ({r.run_dir})",
        "",
        "| fold | train | val | best step | accuracy | macro-F1 |" + (f" {r.metric} |" if extra else ""),
        "|---|---|---|---|---|---|" + ("---|" if extra else ""),
    ]
    for fr in r.folds:
        lines.append(
            f"| {fr.fold} | {fr.train_examples} | {fr.val_examples} | {fr.best_step} | {f(fr.accuracy)} | "
            f"{f(fr.macro_f1)} |" + (f" {f(fr.metric)} |" if extra else "")
        )

    def pm(key: str, digits: int = 4) -> str:
        return f"{f(r.mean.get(key), digits)} ± {f(r.std.get(key), digits)}" if key in r.mean else "—"

    lines += [
        f"| mean ± std | | | {pm('best_step', 0)} | {pm('accuracy')} | {pm('macro_f1')} |"
        + (f" {pm(r.metric)} |" if extra else ""),
        "",
        f"Validation {r.metric}, averaged over the folds, peaked at step {r.peak_step} ({f(r.peak_value)}): "
        "train the final model on all the data for about that many steps.",
        "std is the sample standard deviation over the folds.",
    ]
    return "\n".join(lines)


def _write_summary(r: CVResult) -> None:

    write_json(r.run_dir / "cv.json", r.to_dict())
    atomic.write_text(r.run_dir / "cv.md", format_cv(r) + "\n")
