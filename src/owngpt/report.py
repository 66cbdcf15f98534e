"""The report card of a run: one self-contained HTML page (and a Markdown twin) saying what was trained and how well.

    owngpt report RUN                 -> RUN/report.html + RUN/report.md (+ RUN/report_files/*.png for the Markdown)
    owngpt report RUN_A RUN_B         -> the same sections with a column per run, curves overlaid
    owngpt.report.write_report([RUN]) -> the same from Python; `train()` calls it at the end of every run

Sections: the environment (versions, device, threads), the data (sources, what cleaning dropped and why, split sizes,
tokenizer: the data dir's meta.json and report.json), the resolved config, loss and metric curves, final and best
metrics, speed (tokens/s, wall time, model FLOP/s and utilisation), checkpoint sizes, and what the model does:
samples for a language model, a few dialogue turns for chat (and with an MMI reranker when one is given), the
confusion matrix, per-class scores and the most confident mistakes for a classifier. nanochat's report card is the
model; this one is per run rather than per pipeline.

The page makes no network request: images are PNG data URIs, the style is inline, there is no script, and a
Content-Security-Policy forbids anything else. Every number shown in a key/value table also stands in its cell's
`data-key`/`data-value` attributes at full precision, so tests (and scripts) can read the page back.

Generation goes through the public API (`owngpt.load(ckpt).generate / .chat`); classification through
`owngpt.predict`. The report never trains or changes anything in the run dir besides its own output files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt import atomic
from owngpt.api import load
from owngpt.classify_eval import plot_confusion_matrix
from owngpt.data.datadir import open_data_dir
from owngpt.errors import ConfigError
from owngpt.metrics import classification_metrics
from owngpt.predict import load_classifier, predict_proba
from owngpt.version import __version__

LANGS = ("en", "zh")

# Every label the page shows, in both languages (keys double as the `data-key` prefixes' readable names).
LABELS: dict[str, dict[str, str]] = {
    "title": {"en": "Run report", "zh": "训练报告"},
    "compare": {"en": "Run comparison", "zh": "训练对比"},
    "environment": {"en": "Environment", "zh": "环境"},
    "data": {"en": "Data", "zh": "数据"},
    "config": {"en": "Resolved config", "zh": "最终配置"},
    "curves": {"en": "Curves", "zh": "曲线"},
    "metrics": {"en": "Metrics", "zh": "指标"},
    "speed": {"en": "Speed", "zh": "速度"},
    "checkpoints": {"en": "Checkpoints", "zh": "检查点"},
    "model_does": {"en": "What the model does", "zh": "模型的表现"},
    "run": {"en": "run", "zh": "运行"},
    "task": {"en": "task", "zh": "任务"},
    "made": {"en": "written", "zh": "生成时间"},
    "owngpt": {"en": "owngpt", "zh": "owngpt"},
    "torch": {"en": "torch", "zh": "torch"},
    "transformers": {"en": "transformers", "zh": "transformers"},
    "python": {"en": "Python", "zh": "Python"},
    "platform": {"en": "platform", "zh": "平台"},
    "device": {"en": "device", "zh": "设备"},
    "threads": {"en": "torch threads / CPU cores", "zh": "torch 线程 / CPU 核"},
    "env_note": {
        "en": "The environment where this report was written (for the report at the end of training: the training's).",
        "zh": "生成本报告时的环境（训练结束时自动生成的报告即训练时的环境）。",
    },
    "data_dir": {"en": "data dir", "zh": "数据目录"},
    "data_missing": {"en": "data dir not found", "zh": "找不到数据目录"},
    "sources": {"en": "sources", "zh": "来源文件"},
    "records_in": {"en": "records in", "zh": "输入记录"},
    "records_out": {"en": "records kept", "zh": "保留记录"},
    "split_train": {"en": "train split", "zh": "训练集"},
    "split_val": {"en": "validation split", "zh": "验证集"},
    "tokenizer": {"en": "tokenizer", "zh": "分词器"},
    "vocab": {"en": "vocabulary", "zh": "词表大小"},
    "cleaning": {"en": "Cleaning: what each rule dropped or changed", "zh": "清洗：各规则删除或修改了什么"},
    "rule": {"en": "rule", "zh": "规则"},
    "kind": {"en": "kind", "zh": "类型"},
    "count": {"en": "count", "zh": "数量"},
    "example": {"en": "example", "zh": "示例"},
    "no_rules": {"en": "no cleaning rule fired", "zh": "没有触发任何清洗规则"},
    "loss_curve": {"en": "loss (train: line, validation: dots)", "zh": "损失（训练：线，验证：点）"},
    "metric_curve": {"en": "validation metrics", "zh": "验证指标"},
    "lr_curve": {"en": "learning rate", "zh": "学习率"},
    "final": {"en": "final", "zh": "最终"},
    "best": {"en": "best", "zh": "最佳"},
    "best_step": {"en": "best step", "zh": "最佳步数"},
    "best_by": {"en": "best by", "zh": "最佳依据"},
    "steps": {"en": "steps", "zh": "步数"},
    "tokens_per_s": {"en": "training tokens/s (median of log windows)", "zh": "训练速度 tokens/s（日志窗口中位数）"},
    "wall": {"en": "wall time (config written → last log line)", "zh": "墙钟时间（写入配置 → 最后一条日志）"},
    "params": {"en": "parameters", "zh": "参数量"},
    "flops_token": {"en": "training FLOPs per token (6N + 12·L·d·T)", "zh": "每 token 训练 FLOPs（6N + 12·L·d·T）"},
    "achieved": {"en": "achieved GFLOP/s", "zh": "实际 GFLOP/s"},
    "peak": {"en": "peak GFLOP/s", "zh": "峰值 GFLOP/s"},
    "mfu": {"en": "MFU", "zh": "MFU（模型 FLOPs 利用率）"},
    "peak_note": {
        "en": "MFU = achieved / peak FLOP/s, for GPUs with a known data-sheet bf16 peak; none on a CPU.",
        "zh": "MFU = 实际 / 峰值 FLOP/s，仅对已知官方 bf16 峰值的 GPU 给出；CPU 不给出。",
    },
    "size": {"en": "size", "zh": "大小"},
    "ckpt_step": {"en": "step", "zh": "步数"},
    "samples": {"en": "Samples", "zh": "生成样例"},
    "prompt": {"en": "prompt", "zh": "提示"},
    "unconditional": {"en": "(no prompt)", "zh": "（无提示）"},
    "sampling": {"en": "sampling", "zh": "采样设置"},
    "dialogue": {"en": "Dialogue", "zh": "对话"},
    "user": {"en": "user", "zh": "用户"},
    "assistant": {"en": "model", "zh": "模型"},
    "with_mmi": {"en": "model, reranked by MMI", "zh": "模型（MMI 重排序）"},
    "confusion": {"en": "Confusion matrix (validation)", "zh": "混淆矩阵（验证集）"},
    "per_class": {"en": "Per-class scores (validation)", "zh": "各类别得分（验证集）"},
    "label": {"en": "label", "zh": "标签"},
    "precision": {"en": "precision", "zh": "精确率"},
    "recall": {"en": "recall", "zh": "召回率"},
    "f1": {"en": "F1", "zh": "F1"},
    "support": {"en": "support", "zh": "样本数"},
    "mistakes": {"en": "Most confident mistakes (validation)", "zh": "最自信的错误（验证集）"},
    "text": {"en": "text", "zh": "文本"},
    "gold": {"en": "gold", "zh": "真实"},
    "predicted": {"en": "predicted", "zh": "预测"},
    "probability": {"en": "probability", "zh": "概率"},
    "no_mistakes": {"en": "no mistakes on the validation split", "zh": "验证集上没有错误"},
    "no_checkpoint": {"en": "no checkpoint to show", "zh": "没有可用的检查点"},
    "skipped": {"en": "skipped", "zh": "已跳过"},
    "failed": {"en": "could not be produced", "zh": "无法生成"},
    "accuracy": {"en": "accuracy", "zh": "准确率"},
    "macro_f1": {"en": "macro-F1", "zh": "宏平均 F1"},
    "val_loss": {"en": "validation loss", "zh": "验证损失"},
    "val_ppl": {"en": "validation perplexity", "zh": "验证困惑度"},
    "train_loss": {"en": "train loss", "zh": "训练损失"},
    "setting": {"en": "setting", "zh": "设置"},
    "cv": {"en": "Cross-validation", "zh": "交叉验证"},
    "fold": {"en": "fold", "zh": "折"},
    "mean_std": {"en": "mean ± std", "zh": "平均 ± 标准差"},
    "cv_peak": {
        "en": "step where the validation metric, averaged over the folds, was best",
        "zh": "各折平均验证指标最佳的步数",
    },
    "unit_documents": {"en": "documents", "zh": "篇文档"},
    "unit_examples": {"en": "examples", "zh": "条样本"},
    "unit_tokens": {"en": "tokens", "zh": "个 token"},
}


def label(key: str, lang: str) -> str:
    entry = LABELS.get(key)
    return entry[lang] if entry else key


# --- collecting what a run left ---------------------------------------------------------------------------------
@dataclass
class RunFacts:
    """Everything the report shows about one run, collected once and rendered in any language."""

    path: Path
    name: str
    task: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    environment: dict[str, Any]
    data: dict[str, Any]
    metrics: dict[str, Any]
    speed: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    model: dict[str, Any] = field(default_factory=dict)  # samples / dialogue / classification
    notes: list[str] = field(default_factory=list)
    cv: dict[str, Any] | None = None  # cv.json of a cross-validation run dir (owngpt.cv)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_history(run: Path) -> list[dict[str, Any]]:
    f = run / "metrics.jsonl"
    out = []
    if f.exists():
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
    return out


def environment() -> dict[str, Any]:
    import torch
    import transformers

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        device = f"cpu: {_cpu_name() or platform.processor() or platform.machine()}"
    return {
        "owngpt": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "threads": f"{torch.get_num_threads()} / {os.cpu_count()}",
    }


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def data_facts(config: dict[str, Any], ckpt_meta: dict[str, Any]) -> dict[str, Any]:
    """The data dir's meta.json and report.json, found through the config (or the checkpoint's record of it)."""
    candidates = [config.get("data"), (ckpt_meta.get("data") or {}).get("path")]
    for c in candidates:
        if c and (Path(c) / "meta.json").exists():
            d = Path(c)
            return {
                "found": True,
                "path": str(d),
                "meta": _read_json(d / "meta.json") or {},
                "report": _read_json(d / "report.json") or {},
            }
    return {"found": False, "path": str(candidates[0] or candidates[1] or "?"), "meta": {}, "report": {}}


def metric_facts(history: list[dict[str, Any]], config: dict[str, Any], task: str) -> dict[str, Any]:
    evals = [r for r in history if any(k in r for k in ("val_loss", "accuracy"))]
    metric = config.get("metric") or ("accuracy" if task == "classify" else "val_loss")
    higher = metric != "val_loss" and not metric.endswith("loss")
    best = None
    for r in evals:
        v = r.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            if best is None or (v > best[metric] if higher else v < best[metric]):  # strict, as the loop's "best"
                best = r
    trains = [r for r in history if "train_loss" in r]
    final = dict(evals[-1]) if evals else {}
    if trains:
        final["train_loss"] = trains[-1]["train_loss"]

    def numbers(rec: dict[str, Any]) -> dict[str, float]:  # the metrics, not the bookkeeping (step, val_tokens)
        return {k: v for k, v in rec.items() if k != "step" and "tokens" not in k and isinstance(v, (int, float))}

    return {
        "metric": metric,
        "final": numbers(final),
        "final_step": evals[-1]["step"] if evals else None,
        "best": numbers(best or {}),
        "best_step": best["step"] if best else None,
    }


# data-sheet dense bf16 peaks (TFLOP/s) of GPUs owngpt has been run on; others: no MFU
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


def speed_facts(run: Path, history: list[dict[str, Any]], config: dict[str, Any], ckpt: Path | None) -> dict[str, Any]:
    rates = [r["tokens_per_s"] for r in history if isinstance(r.get("tokens_per_s"), (int, float))]
    steps = max((r["step"] for r in history), default=0)
    out: dict[str, Any] = {"steps": steps}
    if rates:
        out["tokens_per_s"] = statistics.median(rates)
    try:
        start = (run / "config.yaml").stat().st_mtime
        end = (run / "metrics.jsonl").stat().st_mtime
        out["wall_s"] = max(0.0, end - start)
    except OSError:
        pass
    cfg = _read_json(ckpt / "config.json") if ckpt else None
    if cfg:
        n_layer = cfg.get("n_layer") or cfg.get("num_hidden_layers")
        d = cfg.get("n_embd") or cfg.get("hidden_size")
        if ckpt is not None:
            out["params"] = _count_params(ckpt)
        block = config.get("block_size") or 256
        if out.get("params") and n_layer and d:
            out["flops_per_token"] = 6 * out["params"] + 12 * n_layer * d * block
            if rates:
                achieved = out["tokens_per_s"] * out["flops_per_token"] / 1e9
                out["achieved_gflops"] = achieved
                peak = _peak_gflops()
                if peak:
                    out["peak_gflops"] = peak
                    out["mfu"] = achieved / peak
    return out


def _peak_gflops() -> float | None:
    """A GPU's data-sheet bf16 peak; None on a CPU, whose usable peak depends on what else runs (a matmul measured
    on a shared machine gave a tenth of the rate the training itself reached): no MFU there, only FLOP/s."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, tf in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1000
    return None


def _count_params(ckpt: Path) -> int | None:
    """Parameters stored in a checkpoint's safetensors (headers only; no weights are read)."""
    from safetensors import safe_open

    total = 0
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shape = sf.get_slice(k).get_shape()
                total += math.prod(shape) if shape else 1
    return total


def checkpoint_facts(run: Path) -> list[dict[str, Any]]:
    out = []
    ck = run / "checkpoints"
    for d in sorted(ck.iterdir()) if ck.is_dir() else []:
        if not d.is_dir() or d.name.startswith("."):
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        meta = _read_json(d / "owngpt.json") or {}
        out.append({"name": d.name, "bytes": size, "step": meta.get("step")})
    return out


def _best_checkpoint(run: Path) -> Path | None:
    for name in ("best", "merged", "last"):
        p = run / "checkpoints" / name
        if (p / "config.json").exists():
            return p
    return None


def default_prompts(data: dict[str, Any], n: int = 3) -> list[str]:
    """The first line (up to 40 characters) of `n` validation paragraphs, and "" (an unconditional sample)."""
    prompts: list[str] = []
    meta = data.get("meta") or {}
    if data.get("found") and meta.get("task") == "lm":
        try:
            d = open_data_dir(data["path"])
            tok = d.load_tokenizer()
            split = "val" if d.has_split("val") else "train"
            toks = d.tokens(split)[:20000].tolist()
            eos = tok.eos_token_id
            docs, cur = [], []
            for t in toks + [eos]:  # documents end with EOS; a one-document corpus has none in this window
                if t == eos:
                    if cur:
                        docs.append(tok.decode(cur))
                    cur = []
                else:
                    cur.append(t)
            # paragraphs (blank-line separated) of the documents; the window's first one may start mid-sentence
            paras = [x.strip() for doc in docs for x in doc.split("\n\n") if x.strip()]
            if len(paras) > n + 1:
                paras = paras[1:]
            for para in paras:
                lines = para.split("\n")
                first = lines[0].strip()[:40]
                if first and first not in [p.strip() for p in prompts]:
                    prompts.append(first + ("\n" if len(lines) > 1 and len(first) == len(lines[0].strip()) else ""))
                if len(prompts) >= n:
                    break
        except Exception:  # a damaged data dir must not cost the report its samples
            prompts = []
    return prompts + [""]


def lm_samples(ckpt: Path, prompts: Sequence[str], max_new_tokens: int, seed: int) -> dict[str, Any]:

    m = load(str(ckpt))
    settings = {"temperature": 0.8, "top_k": 50, "max_new_tokens": max_new_tokens, "seed": seed}
    # one call each (an empty prompt cannot share a batch), seed + i: the prompts do not share one random stream
    texts = [m.generate(p, **dict(settings, seed=seed + i)) for i, p in enumerate(prompts)]
    return {
        "kind": "samples",
        "settings": settings,
        "samples": [{"prompt": p, "text": t} for p, t in zip(prompts, texts)],
    }


def chat_turns(
    ckpt: Path, data: dict[str, Any], mmi: str | None, max_new_tokens: int, seed: int, n: int = 3
) -> dict[str, Any]:
    """Up to two user turns of `n` validation conversations, answered by the model (and with MMI reranking)."""

    m = load(str(ckpt))
    backward = load(mmi) if mmi else None
    conversations: list[list[str]] = []
    if data.get("found"):
        d = open_data_dir(data["path"])
        split = "val" if d.has_split("val") else "train"
        for r in d.records(split):
            users = [x["content"] for x in r.get("messages", []) if x.get("role") == "user"][:2]
            if users:
                conversations.append(users)
            if len(conversations) >= n:
                break
    if not conversations:
        conversations = [["Hello!", "What do you like?"]]
    settings = {"temperature": 0.8, "top_k": 50, "max_new_tokens": max_new_tokens, "seed": seed}
    dialogues = []
    for users in conversations:
        history: list[dict[str, str]] = []
        turns = []
        for u in users:
            history.append({"role": "user", "content": u})
            answer = m.chat(history, **settings)
            turn = {"user": u, "model": answer}
            if backward is not None:
                turn["mmi"] = m.chat(history, mmi=backward, candidates=5, **settings)
            history.append({"role": "assistant", "content": answer})
            turns.append(turn)
        dialogues.append(turns)
    return {"kind": "dialogue", "settings": settings, "dialogues": dialogues, "mmi": mmi}


def classify_facts(ckpt: Path, data: dict[str, Any], max_examples: int = 5000) -> dict[str, Any]:
    import tempfile

    import numpy as np

    if not data.get("found"):
        return {"kind": "classify", "error": "data dir not found"}
    d = open_data_dir(data["path"])
    split = "val" if d.has_split("val") else "train"
    records = list(d.records(split))[:max_examples]
    clf = load_classifier(ckpt)
    index = {name: i for i, name in enumerate(clf.labels)}
    records = [r for r in records if str(r["label"]) in index]
    y = np.asarray([index[str(r["label"])] for r in records], dtype=np.int64)
    probs = predict_proba(clf, [str(r["text"]) for r in records])
    pred = probs.argmax(-1)
    m = classification_metrics(y, pred, clf.labels)
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_confusion_matrix(m["confusion_matrix"], clf.labels, Path(tmp) / "cm.png", title=f"{split}")
        png_bytes = png.read_bytes()
    wrong = [i for i in range(len(y)) if pred[i] != y[i]]
    wrong.sort(key=lambda i: -probs[i, pred[i]])
    mistakes = [
        {
            "text": str(records[i]["text"]),
            "gold": clf.labels[y[i]],
            "predicted": clf.labels[pred[i]],
            "probability": float(probs[i, pred[i]]),
        }
        for i in wrong[:5]
    ]
    return {
        "kind": "classify",
        "split": split,
        "examples": len(y),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "per_class": m["per_class"],
        "confusion_png": png_bytes,
        "mistakes": mistakes,
    }


def collect(
    run_dir: str | os.PathLike,
    samples: bool = True,
    prompts: Sequence[str] | None = None,
    mmi: str | None = None,
    max_new_tokens: int = 200,
    seed: int = 0,
) -> RunFacts:
    """Read a run dir (config.yaml, metrics.jsonl, checkpoints/, the data dir) and, with `samples`, run the model."""
    import yaml

    run = Path(run_dir)
    if not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists():
        raise ConfigError(f"{run} is not an owngpt run dir (no config.yaml or metrics.jsonl): pass the --out of a run")
    try:
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    ckpt = _best_checkpoint(run)
    ckpt_meta = (_read_json(ckpt / "owngpt.json") or {}) if ckpt else {}
    task = config.get("task") or ckpt_meta.get("task") or "lm"
    history = read_history(run)
    facts = RunFacts(
        path=run,
        name=run.resolve().name,
        task=task,
        config=config,
        history=history,
        environment=environment(),
        data=data_facts(config, ckpt_meta),
        metrics=metric_facts(history, config, task),
        speed=speed_facts(run, history, config, ckpt),
        checkpoints=checkpoint_facts(run),
        cv=_read_json(run / "cv.json"),
    )
    if not samples:
        facts.model = {"kind": "skipped"}
    elif ckpt is None:
        facts.model = {"kind": "none"}
    else:
        try:
            if task == "classify":
                facts.model = classify_facts(ckpt, facts.data)
            elif task == "chat":
                facts.model = chat_turns(ckpt, facts.data, mmi, min(max_new_tokens, 80), seed)
            elif task == "mmi":
                facts.model = {"kind": "skipped"}  # a backward model's samples are replies-to-replies: not telling
            else:
                facts.model = lm_samples(
                    ckpt, list(prompts) if prompts else default_prompts(facts.data), max_new_tokens, seed
                )
        except Exception as e:  # the numbers above stay worth a page even when the model cannot be run
            facts.model = {"kind": "error", "error": f"{type(e).__name__}: {e}"}
    return facts


# --- plots -------------------------------------------------------------------------------------------------------
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def curve_pngs(runs: Sequence[RunFacts]) -> dict[str, bytes]:
    """loss, validation metrics and lr against step, every run on the same axes (matplotlib's object API)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new(h: float = 3.6):
        fig = Figure(figsize=(7.5, h))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
        return fig, ax

    out: dict[str, bytes] = {}
    fig, ax = new()
    drawn = False
    for i, r in enumerate(runs):
        c = _COLORS[i % len(_COLORS)]
        tag = f"{r.name}: " if len(runs) > 1 else ""
        for key, style in (("train_loss", "-"), ("val_loss", "o")):
            pts = [(h["step"], h[key]) for h in r.history if isinstance(h.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, color=c, label=tag + key.replace("_", " "), markersize=4, alpha=0.9)
                drawn = True
    if drawn:
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out["loss"] = _png(fig)
    keys = [k for k in ("accuracy", "macro_f1") if any(k in h for r in runs for h in r.history)]
    if keys:
        fig, ax = new()
        for i, r in enumerate(runs):
            tag = f"{r.name}: " if len(runs) > 1 else ""
            for key, style in zip(keys, ("o-", "s--")):
                pts = [(h["step"], h[key]) for h in r.history if isinstance(h.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), style, color=_COLORS[i % len(_COLORS)], label=tag + key, markersize=4)
        ax.set_ylabel("validation")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out["metrics"] = _png(fig)
    fig, ax = new(2.4)
    drawn = False
    for i, r in enumerate(runs):
        pts = [(h["step"], h["lr"]) for h in r.history if isinstance(h.get("lr"), (int, float))]
        if pts:
            ax.plot(*zip(*pts), "-", color=_COLORS[i % len(_COLORS)], label=r.name)
            drawn = True
    if drawn:
        ax.set_ylabel("lr")
        if len(runs) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        out["lr"] = _png(fig)
    return out


# --- the page, as blocks both renderers understand ----------------------------------------------------------------
@dataclass
class Cell:
    text: str
    value: Any = None  # full-precision number (or string) behind the shown text


@dataclass
class KV:
    """A key/value table with a column per run: rows of (label, data key, one cell per run)."""

    rows: list[tuple[str, str, list[Cell]]]
    pairs: int = 1  # (label, value) pairs per table row when there is one run: long lists take less height


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    key: str = ""  # data-key prefix of the table's numeric cells


@dataclass
class Image:
    png: bytes
    alt: str
    name: str


@dataclass
class Text:
    text: str
    pre: bool = False


@dataclass
class Columns:
    """One list of blocks per run, side by side."""

    titles: list[str]
    columns: list[list[Any]]


@dataclass
class Section:
    key: str
    title: str
    blocks: list[Any]


def _num(v: Any, digits: int = 4) -> Cell:
    if v is None:
        return Cell("—")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return Cell(str(v), v)
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return Cell(f"{int(v):,}", v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return Cell(f"{v:.3e}", v)
    return Cell(f"{v:.{digits}f}", v)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def build_sections(runs: Sequence[RunFacts], lang: str) -> list[Section]:
    L = lambda k: label(k, lang)  # noqa: E731
    secs: list[Section] = []
    n = len(runs)

    def kv(keys: Sequence[tuple[str, str]], get) -> KV:
        rows = []
        for lab, key in keys:
            cells = [get(r, key) for r in runs]
            if all(c.text == "—" for c in cells):
                continue
            rows.append((lab, key, cells))
        return KV(rows)

    env_keys = ["owngpt", "torch", "transformers", "python", "platform", "device", "threads"]
    secs.append(
        Section(
            "environment",
            L("environment"),
            [
                kv([(L(k), f"env.{k}") for k in env_keys], lambda r, k: Cell(str(r.environment.get(k[4:], "—")))),
                Text(L("env_note")),
            ],
        )
    )

    # data
    def data_cell(r: RunFacts, key: str) -> Cell:
        d, meta, rep = r.data, r.data.get("meta", {}), r.data.get("report", {})
        what = key.split(".", 1)[1]
        if what == "path":
            return Cell(d["path"] + ("" if d["found"] else f" ({L('data_missing')})"), d["path"])
        if what == "sources":
            paths = [i.get("path", "?") for i in meta.get("inputs", [])]
            return Cell(", ".join(paths) if paths else "—", "; ".join(paths))
        if what in ("in", "out"):
            unit = rep.get("unit", "documents")
            v = (rep.get(what) or {}).get(unit)
            return _num(v) if v is not None else Cell("—")
        if what.startswith("split_"):
            s = (meta.get("splits") or {}).get(what[6:]) or {}
            unit = "documents" if "documents" in s else "examples"
            if not s:
                return Cell("—")
            extra = f", {s['tokens']:,} {L('unit_tokens')}" if "tokens" in s else ""
            return Cell(f"{s.get(unit, 0):,} {L('unit_' + unit)}{extra}", s.get(unit))
        if what == "tokenizer":
            t = meta.get("tokenizer") or {}
            return Cell(t.get("kind", "—") + (f" ({t['source']})" if t.get("source") else ""), t.get("kind"))
        if what == "vocab":
            return _num((meta.get("tokenizer") or {}).get("vocab_size"))
        if what == "labels":
            labs = meta.get("labels")
            return Cell(", ".join(labs), ",".join(labs)) if labs else Cell("—")
        return Cell("—")

    data_keys = [
        (L("data_dir"), "data.path"),
        (L("sources"), "data.sources"),
        (L("records_in"), "data.in"),
        (L("records_out"), "data.out"),
        (L("split_train"), "data.split_train"),
        (L("split_val"), "data.split_val"),
        (L("tokenizer"), "data.tokenizer"),
        (L("vocab"), "data.vocab"),
        (L("label"), "data.labels"),
    ]
    blocks: list[Any] = [kv(data_keys, data_cell)]
    rule_cols = []
    for r in runs:
        rules = (r.data.get("report") or {}).get("rules") or {}
        if rules:
            rows = [
                [
                    Cell(name),
                    Cell(str(x.get("kind", ""))),
                    _num(x.get("count")),
                    Cell((x.get("examples") or [""])[0]),
                ]
                for name, x in rules.items()
            ]
            rule_cols.append([Table([L("rule"), L("kind"), L("count"), L("example")], rows, key="rules")])
        else:
            rule_cols.append([Text(L("no_rules"))])
    blocks.append(Text(L("cleaning")))
    blocks.append(Columns([r.name for r in runs], rule_cols) if n > 1 else rule_cols[0][0])
    secs.append(Section("data", L("data"), blocks))

    # config
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    secs.append(
        Section(
            "config",
            L("config"),
            [KV([(k, f"config.{k}", [_cfg_cell(r.config.get(k, "—")) for r in runs]) for k in keys], pairs=3)],
        )
    )

    # curves
    pngs = curve_pngs(runs)
    names = {"loss": L("loss_curve"), "metrics": L("metric_curve"), "lr": L("lr_curve")}
    secs.append(Section("curves", L("curves"), [Image(b, names[k], k) for k, b in pngs.items()]))

    # metrics
    mkeys: list[str] = []
    for r in runs:
        for k in list(r.metrics["final"]) + list(r.metrics["best"]):
            if k not in mkeys:
                mkeys.append(k)
    rows: list[tuple[str, str]] = [(L("best_by"), "metrics.best_by"), (L("best_step"), "metrics.best_step")]
    rows += [(f"{L('best')} {L(k)}", f"best.{k}") for k in mkeys if k != "train_loss"]
    rows += [(f"{L('final')} {L(k)}", f"final.{k}") for k in mkeys]

    def metric_cell(r: RunFacts, key: str) -> Cell:
        if key == "metrics.best_by":
            return Cell(r.metrics["metric"], r.metrics["metric"])
        if key == "metrics.best_step":
            return _num(r.metrics["best_step"])
        part, k = key.split(".", 1)
        return _num(r.metrics[part].get(k))

    secs.append(Section("metrics", L("metrics"), [kv(rows, metric_cell)]))

    # speed
    def speed_cell(r: RunFacts, key: str) -> Cell:
        k = key.split(".", 1)[1]
        v = r.speed.get(k)
        if v is None:
            return Cell("—")
        if k == "wall_s":
            return Cell(_dur(v), v)
        if k == "mfu":
            return Cell(f"{100 * v:.1f}%", v)
        if k in ("tokens_per_s", "achieved_gflops", "peak_gflops"):
            return Cell(f"{v:,.1f}", v)
        return _num(v)

    speed_rows = [
        (L("steps"), "speed.steps"),
        (L("tokens_per_s"), "speed.tokens_per_s"),
        (L("wall"), "speed.wall_s"),
        (L("params"), "speed.params"),
        (L("flops_token"), "speed.flops_per_token"),
        (L("achieved"), "speed.achieved_gflops"),
        (L("peak"), "speed.peak_gflops"),
        (L("mfu"), "speed.mfu"),
    ]
    secs.append(Section("speed", L("speed"), [kv(speed_rows, speed_cell), Text(L("peak_note"))]))

    # checkpoints
    names_ck = list(dict.fromkeys(c["name"] for r in runs for c in r.checkpoints))

    def ck_cell(r: RunFacts, key: str) -> Cell:
        name = key.split(".", 1)[1]
        c = next((c for c in r.checkpoints if c["name"] == name), None)
        if c is None:
            return Cell("—")
        step = f" ({L('ckpt_step')} {c['step']})" if c.get("step") is not None else ""
        return Cell(_bytes(c["bytes"]) + step, c["bytes"])

    secs.append(
        Section("checkpoints", L("checkpoints"), [kv([(f"{x}/", f"checkpoint.{x}") for x in names_ck], ck_cell)])
    )

    # cross-validation (a run dir made by `owngpt train ... cv=K`)
    if any(r.cv for r in runs):
        cv_cols = [_cv_blocks(r, lang) for r in runs]
        secs.append(Section("cv", L("cv"), [Columns([r.name for r in runs], cv_cols)] if n > 1 else cv_cols[0]))

    # what the model does
    cols = [_model_blocks(r, lang) for r in runs]
    secs.append(Section("model", L("model_does"), [Columns([r.name for r in runs], cols)] if n > 1 else cols[0]))
    return secs


def _cv_blocks(r: RunFacts, lang: str) -> list[Any]:
    L = lambda k: label(k, lang)  # noqa: E731
    cv = r.cv
    if not cv:
        return [Text("—")]
    head = [L("fold"), L("split_train"), L("split_val"), L("best_step"), L("accuracy"), L("macro_f1")]
    rows = [
        [
            Cell(str(f["fold"])),
            _num(f["train_examples"]),
            _num(f["val_examples"]),
            _num(f["best_step"]),
            _num(f["accuracy"]),
            _num(f["macro_f1"]),
        ]
        for f in cv["folds"]
    ]
    mean, std = cv.get("mean", {}), cv.get("std", {})

    def pm(k: str, digits: int = 4) -> Cell:
        if k not in mean:
            return Cell("—")
        return Cell(f"{mean[k]:.{digits}f} ± {std.get(k, 0):.{digits}f}", mean[k])

    rows.append([Cell(L("mean_std")), Cell(""), Cell(""), pm("best_step", 0), pm("accuracy"), pm("macro_f1")])
    blocks: list[Any] = [Table(head, rows, key="cv")]
    if cv.get("peak_step") is not None:
        blocks.append(Text(f"{L('cv_peak')} ({cv['metric']}): {cv['peak_step']} ({cv['peak_value']:.4f})"))
    return blocks


def _cfg_cell(v: Any) -> Cell:
    if isinstance(v, (dict, list)):
        return Cell(json.dumps(v, ensure_ascii=False), json.dumps(v, ensure_ascii=False))
    if v is None:
        return Cell("null", None)
    return Cell(str(v), v)


def _model_blocks(r: RunFacts, lang: str) -> list[Any]:
    L = lambda k: label(k, lang)  # noqa: E731
    m = r.model
    kind = m.get("kind")
    if kind == "skipped":
        return [Text(L("skipped"))]
    if kind == "none":
        return [Text(L("no_checkpoint"))]
    if kind == "error":
        return [Text(f"{L('failed')}: {m['error']}")]
    if kind == "samples":
        s = m["settings"]
        blocks: list[Any] = [
            Text(
                f"{L('sampling')}: temperature {s['temperature']}, top_k {s['top_k']}, "
                f"max_new_tokens {s['max_new_tokens']}, seed {s['seed']}"
            )
        ]
        for ex in m["samples"]:
            p = ex["prompt"]
            blocks.append(Text(f"{L('prompt')}: {p!r}" if p else f"{L('prompt')}: {L('unconditional')}"))
            blocks.append(Text(p + ex["text"], pre=True))
        return blocks
    if kind == "dialogue":
        blocks = []
        for turns in m["dialogues"]:
            lines = []
            for t in turns:
                lines.append(f"{L('user')}: {t['user']}")
                lines.append(f"{L('assistant')}: {t['model']}")
                if "mmi" in t:
                    lines.append(f"{L('with_mmi')}: {t['mmi']}")
            blocks.append(Text("\n".join(lines), pre=True))
        return [Text(L("dialogue"))] + blocks
    if kind == "classify":
        if "error" in m:
            return [Text(f"{L('failed')}: {m['error']}")]
        per = [
            [Cell(name), _num(x["precision"]), _num(x["recall"]), _num(x["f1"]), _num(x["support"])]
            for name, x in m["per_class"].items()
        ]
        blocks = [
            Text(
                f"{L('accuracy')} {m['accuracy']:.4f}, {L('macro_f1')} {m['macro_f1']:.4f} ({m['examples']} {m['split']})"
            ),
            Text(L("confusion")),
            Image(m["confusion_png"], L("confusion"), f"confusion_{r.name}"),
            Text(L("per_class")),
            Table([L("label"), L("precision"), L("recall"), L("f1"), L("support")], per, key="per_class"),
            Text(L("mistakes")),
        ]
        if m["mistakes"]:
            rows = [
                [Cell(x["text"]), Cell(x["gold"]), Cell(x["predicted"]), _num(x["probability"])] for x in m["mistakes"]
            ]
            blocks.append(Table([L("text"), L("gold"), L("predicted"), L("probability")], rows, key="mistakes"))
        else:
            blocks.append(Text(L("no_mistakes")))
        return blocks
    return [Text(L("skipped"))]


# --- HTML ---------------------------------------------------------------------------------------------------------
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans","PingFang SC","Microsoft YaHei",sans-serif;
max-width:1100px;margin:2em auto;padding:0 1em;color:#1d1d1f;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:14px}td,th{border:1px solid #e3e3e3;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f9;border:1px solid #eee;padding:.6em;white-space:pre-wrap;word-break:break-word;font-size:13px}
img{max-width:100%;height:auto}.cols{display:flex;gap:1.2em}.cols>div{flex:1;min-width:0}.muted{color:#666}
nav a{margin-right:.8em}
"""


def _html_cell(c: Cell, key: str, run: int | None, tag: str = "td") -> str:
    num = isinstance(c.value, (int, float)) and not isinstance(c.value, bool)
    attrs = ' class="num"' if num else ""
    if key:
        attrs += f' data-key="{html.escape(key)}"'
        if run is not None:
            attrs += f' data-run="{run}"'
        if c.value is not None or c.text != "—":
            shown = c.text if c.value is None else (repr(c.value) if num else str(c.value))
            attrs += f' data-value="{html.escape(shown)}"'
    return f"<{tag}{attrs}>{html.escape(c.text)}</{tag}>"


def _html_block(b: Any, runs: Sequence[RunFacts], run_index: int | None = None) -> str:
    if isinstance(b, KV):
        head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs) if len(runs) > 1 else ""
        rows = []
        for lab, key, cells in b.rows:
            tds = "".join(_html_cell(c, key, i) for i, c in enumerate(cells))
            rows.append(f"<th>{html.escape(lab)}</th>{tds}")
        per = b.pairs if len(runs) == 1 else 1
        rows = ["<tr>" + "".join(rows[i : i + per]) + "</tr>" for i in range(0, len(rows), per)]
        thead = f"<tr><th></th>{head}</tr>" if head else ""
        return f"<table>{thead}{''.join(rows)}</table>"
    if isinstance(b, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
        body = []
        for row in b.rows:
            name = row[0].text
            tds = "".join(
                _html_cell(c, f"{b.key}.{name}.{b.header[j]}" if b.key and j else "", run_index)
                for j, c in enumerate(row)
            )
            body.append(f"<tr>{tds}</tr>")
        return f"<table><tr>{head}</tr>{''.join(body)}</table>"
    if isinstance(b, Image):
        data = base64.b64encode(b.png).decode("ascii")
        return f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}"><figcaption class="muted">{html.escape(b.alt)}</figcaption></figure>'
    if isinstance(b, Text):
        return f"<pre>{html.escape(b.text)}</pre>" if b.pre else f"<p>{html.escape(b.text)}</p>"
    if isinstance(b, Columns):
        cols = []
        for i, (title, blocks) in enumerate(zip(b.titles, b.columns)):
            inner = "".join(_html_block(x, runs, i) for x in blocks)
            cols.append(f"<div><h3>{html.escape(title)}</h3>{inner}</div>")
        return f'<div class="cols">{"".join(cols)}</div>'
    raise TypeError(type(b))


def render_html(runs: Sequence[RunFacts], sections: Sequence[Section], lang: str) -> str:
    from datetime import datetime, timezone

    title = label("title" if len(runs) == 1 else "compare", lang) + ": " + " vs ".join(r.name for r in runs)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        inner = "".join(_html_block(b, runs, 0 if len(runs) == 1 else None) for b in s.blocks)
        body.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{inner}</section>')
    sub = " · ".join(f"{html.escape(str(r.path))} ({label('task', lang)} {html.escape(r.task)})" for r in runs)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{"zh-CN" if lang == "zh" else "en"}"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">"
        f'<meta name="generator" content="{GENERATOR}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="muted">{sub}<br>{label("made", lang)} {when}</p>'
        f"<nav>{nav}</nav>{''.join(body)}</body></html>\n"
    )


# --- Markdown -----------------------------------------------------------------------------------------------------
def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_block(b: Any, runs: Sequence[RunFacts], assets: Path, rel: str) -> str:
    if isinstance(b, KV):
        head = "| | " + " | ".join(_md_escape(r.name) for r in runs) + " |" if len(runs) > 1 else "| | |"
        lines = [head, "|---" * (len(runs) + 1) + "|"]
        for lab, _key, cells in b.rows:
            lines.append(f"| {_md_escape(lab)} | " + " | ".join(_md_escape(c.text) for c in cells) + " |")
        return "\n".join(lines)
    if isinstance(b, Table):
        lines = ["| " + " | ".join(_md_escape(h) for h in b.header) + " |", "|---" * len(b.header) + "|"]
        for row in b.rows:
            lines.append("| " + " | ".join(_md_escape(c.text) for c in row) + " |")
        return "\n".join(lines)
    if isinstance(b, Image):
        assets.mkdir(parents=True, exist_ok=True)
        (assets / f"{b.name}.png").write_bytes(b.png)
        return f"![{b.alt}]({rel}/{b.name}.png)"
    if isinstance(b, Text):
        if b.pre:
            return "```text\n" + b.text.replace("```", "ʼʼʼ") + "\n```"
        return b.text
    if isinstance(b, Columns):
        return "\n\n".join(
            f"#### {t}\n\n" + "\n\n".join(_md_block(x, runs, assets, rel) for x in blocks)
            for t, blocks in zip(b.titles, b.columns)
        )
    raise TypeError(type(b))


def render_markdown(runs: Sequence[RunFacts], sections: Sequence[Section], lang: str, assets: Path) -> str:
    title = label("title" if len(runs) == 1 else "compare", lang) + ": " + " vs ".join(r.name for r in runs)
    parts = [f"# {title}", " · ".join(f"`{r.path}` ({label('task', lang)} {r.task})" for r in runs)]
    for s in sections:
        parts.append(f"## {s.title}")
        parts += [_md_block(b, runs, assets, assets.name) for b in s.blocks]
    return "\n\n".join(parts) + "\n"


# --- writing ------------------------------------------------------------------------------------------------------
def default_lang() -> str:
    """zh when the user's locale is Chinese, else en (what the report at the end of training uses)."""
    loc = os.environ.get("LC_ALL") or os.environ.get("LC_MESSAGES") or os.environ.get("LANG") or ""
    return "zh" if loc.lower().startswith("zh") else "en"


GENERATOR = "owngpt report"  # marks a page this module wrote: the only kind it replaces without --overwrite


def _ours(html_path: Path) -> bool:
    try:
        with open(html_path, encoding="utf-8", errors="replace") as f:
            return f'<meta name="generator" content="{GENERATOR}">' in f.read(4096)
    except OSError:
        return False


ASSETS_MARK = ".owngpt-report"  # in <page>_files/: the folder (and the pictures in it) are the report's own


def _our_assets(assets: Path, html_path: Path) -> bool:
    """The pictures folder is ours: it has our mark, or (reports written before the mark) only PNGs beside our page."""
    if not assets.is_dir():
        return False
    if (assets / ASSETS_MARK).is_file() or not any(assets.iterdir()):  # an empty folder holds nothing to lose
        return True
    return _ours(html_path) and all(f.is_file() and f.suffix == ".png" for f in assets.iterdir())


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    lang: str = "en",
    samples: bool = True,
    prompts: Sequence[str] | None = None,
    mmi: str | None = None,
    max_new_tokens: int = 200,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the HTML report (and its Markdown twin next to it) of one run, or of two side by side.

    Default place: RUN/report.html for one run, RUN_A/compare_<RUN_B name>.html for two. Returns (html, md).
    An earlier owngpt report there is replaced; any other existing file (the page or its twin) only with `overwrite`.
    """
    if lang not in LANGS:
        raise ConfigError(f"--lang {lang}: expected one of {', '.join(LANGS)}")
    if not 1 <= len(run_dirs) <= 2:
        raise ConfigError("owngpt report takes one run dir, or two to compare")
    if out is None:
        first = Path(run_dirs[0])
        out = first / ("report.html" if len(run_dirs) == 1 else f"compare_{Path(run_dirs[1]).resolve().name}.html")
    html_path = Path(out)
    if html_path.suffix.lower() != ".html":
        raise ConfigError(f"--out {html_path}: the report is an .html file (the Markdown twin is written next to it)")
    if html_path.exists() and html_path.is_dir():
        raise ConfigError(f"--out {html_path} is a directory; give a file name ending in .html")
    if not overwrite:  # owngpt deletes only what it made: a page of yours (or its .md name) is never replaced
        for f in (html_path, html_path.with_suffix(".md")):
            if f.exists() and not (html_path.is_file() and _ours(html_path)):
                raise ConfigError(
                    f"--out {html_path}: {f} exists and is not an owngpt report; choose another --out, or pass "
                    "--overwrite to replace it"
                )
    assets = html_path.with_name(html_path.stem + "_files")  # the Markdown's pictures
    if not overwrite and assets.exists() and not _our_assets(assets, html_path):
        raise ConfigError(
            f"--out {html_path}: the folder {assets} (where the Markdown's pictures go) exists and was not made by "
            "owngpt report; choose another --out, or pass --overwrite to write the pictures into it"
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the middle of ours
    try:
        runs = [collect(d, samples, prompts, mmi, max_new_tokens, seed) for d in run_dirs]
    finally:
        hf_logging.enable_progress_bar()
    html_path.parent.mkdir(parents=True, exist_ok=True)
    sections = build_sections(runs, lang)
    md_path = html_path.with_suffix(".md")
    assets.mkdir(exist_ok=True)
    (assets / ASSETS_MARK).write_text(f"made by {GENERATOR}: its pictures are replaced by the next report\n")
    atomic.write_text(html_path, render_html(runs, sections, lang))
    atomic.write_text(md_path, render_markdown(runs, sections, lang, assets))
    return html_path, md_path


def report_after_run(run_dir: str | os.PathLike) -> Path | None:
    """The report `train()` writes at the end of a run. Never raises: a failure becomes a warning on stderr.

    OWNGPT_NO_REPORT=1 in the environment turns it off for every run (CI, the test suite); report=false for one.
    """
    if os.environ.get("OWNGPT_NO_REPORT", "") not in ("", "0"):
        return None
    try:
        html_path, _ = write_report([run_dir], lang=default_lang())
        print(f"report: {html_path}", file=sys.stderr, flush=True)
        return html_path
    except Exception as e:  # noqa: BLE001 - the run itself succeeded; its report is a bonus
        print(
            f"warning: the run's report could not be written ({type(e).__name__}: {e}); try `owngpt report {run_dir}`",
            file=sys.stderr,
            flush=True,
        )
        return None
