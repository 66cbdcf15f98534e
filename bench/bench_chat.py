"""Chat fine-tuning and MMI reranking on the bundled-style dialogues (English and Chinese), written to docs/chat.md.

    python bench/bench_chat.py [--data ../shared/data/dialogs] [--steps 1500]

For each language: prepare the dialogues (`--task chat`, byte-level BPE), train a forward chat model and a backward
MMI model (`--task mmi`) with the same settings, then report validation assistant-token perplexity and distinct-1/2
of sampled answers with and without MMI reranking, plus a few sample dialogues. Every number comes from this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import _doc  # bench/ is on sys.path when a script runs
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "chat.md"


def run_language(name: str, src: Path, work: Path, steps: int, samples: int) -> dict:
    from owngpt.api import load
    from owngpt.config import TrainConfig
    from owngpt.data.prepare import PrepareConfig, prepare
    from owngpt.evaluate import evaluate
    from owngpt.train import train

    data = work / f"{name}-data"
    prepare(
        PrepareConfig(
            sources=[str(src)], out=str(data), task="chat", tokenizer="bpe", vocab_size=2000, progress=False, quiet=True
        )
    )
    runs = {}
    t = time.perf_counter()
    for task in ("chat", "mmi"):
        cfg = TrainConfig(
            task=task,
            data=str(data),
            out=str(work / f"{name}-{task}"),
            model="tiny",
            optimizer="adamw",  # what docs/benchmarks.md's chat numbers were measured with (a preset's default is Muon)
            max_steps=steps,
            batch_size=16,
            block_size=128,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=100,
            dropout=0.1,
            eval_every=max(steps // 10, 1),
            eval_batches=0,
            patience=4,
            overwrite=True,
        )
        res = train(cfg)
        runs[task] = res.best_checkpoint or res.last_checkpoint
    train_secs = time.perf_counter() - t
    m = evaluate(
        str(runs["chat"]),
        str(data),
        samples=samples,
        max_new_tokens=40,
        seed=0,
        mmi=str(runs["mmi"]),
        candidates=5,
        progress=False,
    )
    # a few multi-turn sample dialogues, greedy-free sampling with a fixed seed, with and without MMI
    bot, backward = load(str(runs["chat"])), load(str(runs["mmi"]))
    prompts = {"en": ["Hello", "What is AI?", "Do you like music?"], "zh": ["你好", "你叫什么名字", "你喜欢音乐吗"]}[
        name
    ]
    dialogues = []
    for i, p in enumerate(prompts):
        msgs = [{"role": "user", "content": p}]
        plain = bot.chat(msgs, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=i)
        reranked = bot.chat(msgs, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=i, mmi=backward, candidates=5)
        dialogues.append((p, plain, reranked))
    return {"metrics": m, "dialogues": dialogues, "train_secs": train_secs, "steps": steps}


def write_doc(results: dict, steps: int, cmd: str) -> None:
    rows, samples = [], []
    for name, r in results.items():
        m = r["metrics"]
        rows.append(
            f"| {name} | {m['assistant_perplexity']:.2f} | {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | "
            f"{m['mmi_distinct_1']:.3f} | {m['mmi_distinct_2']:.3f} | {m['samples']} | {r['train_secs']:.0f} |"
        )
        samples.append(f"\n### {name}\n\n| user | answer (sampled) | answer (MMI, 5 candidates) |\n|---|---|---|")
        for p, a, b in r["dialogues"]:
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ") or "(empty)"  # noqa: E731
            samples.append(f"| {cell(p)} | {cell(a)} | {cell(b)} |")
    body = f"""
## Results on the chatterbot dialogues (English and Chinese)

Command: `{cmd}` — {time.strftime("%Y-%m-%d")}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.
Each language: `owngpt prepare --task chat --tokenizer bpe --vocab-size 2000`, then the `tiny` preset trained from
scratch for up to {steps} steps (batch 16, block 128, lr 1e-3 cosine, dropout 0.1, early stopping with patience 4) as
a forward chat model and as an MMI backward model. Perplexity is over the assistant's tokens of the validation split;
distinct-n is over answers sampled (temperature 0.8, top-p 0.9) for validation prompts.

| data | val assistant perplexity | distinct-1 | distinct-2 | distinct-1 (MMI) | distinct-2 (MMI) | prompts | train s (both) |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

These are tiny models trained from scratch on a few hundred to two thousand short dialogues: they learn the style
and the common answers, not facts. Start from a pretrained checkpoint (`--model DIR`, see docs/models.md) for more.
{"".join(s + chr(10) for s in samples)}"""
    _doc.write_section("chat", body, doc=DOC, title="# Chat fine-tuning and MMI\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dialogs"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="owngpt-bench-chat-"))
    results = {}
    for name, f in (("en", "english.jsonl"), ("zh", "chinese.jsonl")):
        results[name] = run_language(name, Path(args.data) / f, work, args.steps, args.samples)
        print(name, results[name]["metrics"])
    if not args.no_write:
        write_doc(results, args.steps, f"python bench/bench_chat.py --steps {args.steps} --samples {args.samples}")


if __name__ == "__main__":
    main()
