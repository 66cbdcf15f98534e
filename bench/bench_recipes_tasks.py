"""The four from-scratch recipes on the other tasks: chat fine-tuning and SST-2 classification, small CPU budgets.

    nice python bench/bench_recipes_tasks.py chat   # docs/benchmarks.md, section bench:recipes-chat
    nice python bench/bench_recipes_tasks.py sst2 --pretrain-steps 1000   # section bench:recipes-sst2
    python bench/bench_recipes_tasks.py chat --steps 40 --seeds 1 --no-write --work /tmp/x   # a quick check

bench_recipes.py compares GPT-2 or LLaMA-style bodies trained with AdamW or Muon on nanoGPT's language-modelling
recipe; this script asks the same question of the two other tasks a user trains from scratch, with every setting but
the preset and the optimizer fixed, interleaved per seed:

    tiny       + adamw   GPT-2 (transformers' GPT2LMHeadModel / GPT2ForSequenceClassification), AdamW lr 1e-3
    tiny       + muon    Muon (muon_lr 0.02) on the block matrices, AdamW 1e-3 on embeddings, head, norms, biases
    llama-tiny + adamw   LLaMA-style (rotary, RMSNorm, SwiGLU, tied embeddings)
    llama-tiny + muon

chat: the bundled English chatterbot dialogues (../shared/data/dialogs/english.jsonl, 2,026 conversations; or
--chat-data), `owngpt prepare --task chat --tokenizer bpe --vocab-size 2000` (10% of the conversations held out),
then `--steps` steps of batch 16 x block 128, dropout 0.1, warmup --steps/10, cosine to lr/10. Metric: the loss
over the assistant's tokens of the whole validation split (what `owngpt eval` reports, the chat task's val_loss)
at the last step, and the lowest seen at the evaluations every --steps/6 steps. After the runs, a few replies of the
best run's model are sampled and printed into the section, to be read.

sst2: bench_sst2.py's split (8,000 shuffled rows of SST-2's train.tsv; `owngpt prepare --task classify` holds 10% out
to pick checkpoints/best by accuracy), BPE vocabulary 4000, `--steps` steps of batch 32 x block 64, dropout 0.1.
Metric: accuracy and macro-F1 of checkpoints/best on all of dev.tsv (6,735 rows), computed with owngpt.predict;
the TF-IDF (1-2 grams) + logistic regression baseline is fitted on the same 8,000 rows in the same run, and the
best recipe is compared with it row by row (McNemar's exact test). With --pretrain-steps N, a `llama-tiny` LM is
first pre-trained with AdamW on the text of the whole SST-2 train file (no labels) and fine-tuned on the same rows
with AdamW and with Muon: which optimizer to fine-tune a pre-trained model with.

Each run's result is appended to WORK/results.jsonl as it finishes, and runs already there are not trained again, so
seeds can be added by later invocations with the same --work; the section is rewritten from all of them each time.
One intra-op thread per process (what a tiny model runs fastest with on a shared CPU, see NOTES).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import _doc  # bench/ is on sys.path when a script runs
import torch

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data beside the checkout (or one level up, for a git worktree kept in a subfolder)
SHARED = next(
    (d for d in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if d.is_dir()), ROOT.parent / "shared"
)
DIALOGS = SHARED / "data" / "dialogs" / "english.jsonl"
SST2 = SHARED / "data" / "sst2"
RUNS = (("tiny", "adamw"), ("tiny", "muon"), ("llama-tiny", "adamw"), ("llama-tiny", "muon"))
LABEL = {"tiny": "GPT-2", "llama-tiny": "LLaMA-style"}
PRETRAINED = "pretrained-llama-tiny"  # sst2 --pretrain-steps: the fine-tunes of an AdamW-pre-trained LLaMA-style LM
FINETUNES = ((PRETRAINED, "adamw"), (PRETRAINED, "muon"))
SETTINGS = {
    "chat": dict(batch_size=16, block_size=128, dropout=0.1, vocab=2000),
    "sst2": dict(batch_size=32, block_size=64, dropout=0.1, vocab=4000),
}
PROMPTS = ["Hello", "What is AI?", "Do you like music?", "Tell me a joke.", "What is your name?", "Are you a robot?"]


def name_of(model: str, opt: str) -> str:
    if model == PRETRAINED:
        return f"LLaMA-style LM pre-trained (AdamW), fine-tuned with {'AdamW' if opt == 'adamw' else 'Muon'}"
    return f"{LABEL[model]} (`{model}`) + {'AdamW' if opt == 'adamw' else 'Muon'}"


def prepare_chat(src: Path, out: Path) -> Path:
    from owngpt.data.prepare import PrepareConfig, prepare

    if not (out / "meta.json").exists():
        v = SETTINGS["chat"]["vocab"]
        prepare(
            PrepareConfig(
                sources=[str(src)], out=str(out), task="chat", tokenizer="bpe", vocab_size=v, progress=False, quiet=True
            )
        )
    return out


def prepare_sst2(src: Path, work: Path, n_train: int) -> tuple[Path, list[tuple[str, str]], list[tuple[str, str]]]:
    from bench_sst2 import load_split, write_csv

    from owngpt.data.prepare import PrepareConfig, prepare

    train_rows, test_rows, _ = load_split(src, n_train, 0)
    out = work / "sst2-data"
    if not (out / "meta.json").exists():
        write_csv(work / "train.csv", train_rows)
        v = SETTINGS["sst2"]["vocab"]
        prepare(
            PrepareConfig(
                sources=[str(work / "train.csv")],
                out=str(out),
                task="classify",
                tokenizer="bpe",
                vocab_size=v,
                progress=False,
                quiet=True,
            )
        )
    return out, train_rows, test_rows


def pretrain_lm(src: Path, work: Path, steps: int) -> Path:
    """bench_sst2.py's pre-trained variant at this script's size: a `llama-tiny` LM trained with AdamW (how public
    checkpoints were trained) on the text of the whole SST-2 train file, no labels; returns its checkpoint."""
    from bench_sst2 import load_split

    from owngpt.config import TrainConfig
    from owngpt.data.prepare import PrepareConfig, prepare
    from owngpt.train import train

    ckpt = work / f"lm-{steps}" / "checkpoints" / "last"
    if ckpt.is_dir():
        return ckpt
    _, _, all_text = load_split(src, 0, 0)
    (work / "lm.txt").write_text("\n".join(all_text) + "\n", encoding="utf-8")
    lm_data = work / "lm-data"
    if not (lm_data / "meta.json").exists():
        prepare(
            PrepareConfig(
                sources=[str(work / "lm.txt")], out=str(lm_data), task="lm", doc_sep="line", tokenizer="bpe",
                vocab_size=SETTINGS["sst2"]["vocab"], progress=False, quiet=True,
            )
        )  # fmt: skip
    t0 = time.perf_counter()
    train(
        TrainConfig(
            task="lm", data=str(lm_data), out=str(work / f"lm-{steps}"), model="llama-tiny", optimizer="adamw",
            max_steps=steps, batch_size=32, block_size=64, lr=2e-3, warmup_steps=min(100, steps // 10), dropout=0.1,
            seed=1337, eval_every=steps, eval_batches=20, log_every=max(1, steps // 10), overwrite=True, report=False,
        )
    )  # fmt: skip
    (work / f"lm-{steps}.seconds").write_text(f"{time.perf_counter() - t0:.1f}", encoding="utf-8")
    return ckpt


def train_run(task: str, data: Path, out: Path, model: str, opt: str, steps: int, seed: int) -> tuple[list, float]:
    """(evaluations [(step, metrics)], training seconds) of one run."""
    from owngpt.config import TrainConfig
    from owngpt.train import train

    s = SETTINGS[task]
    evals: list[tuple[int, dict]] = []
    cfg = TrainConfig(
        task="chat" if task == "chat" else "classify",
        data=str(data),
        out=str(out),
        model=model,
        optimizer=opt,
        max_steps=steps,
        batch_size=s["batch_size"],
        block_size=s["block_size"],
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=max(1, steps // 10),
        dropout=s["dropout"],
        seed=seed,
        eval_every=max(1, steps // (6 if task == "chat" else 5)),
        eval_batches=0,
        log_every=max(1, steps // 10),
        overwrite=True,
        report=False,
    )
    t0 = time.perf_counter()
    train(cfg, callbacks=[lambda step, m: evals.append((step, dict(m)))])
    return evals, time.perf_counter() - t0


def scores_on_test(ckpt: Path, test_rows: list[tuple[str, str]]) -> tuple[float, float, list[str]]:
    """(accuracy, macro-F1, predicted labels) of a classifier checkpoint on the test rows."""
    from owngpt.classify_eval import classification_metrics
    from owngpt.predict import load_classifier, predict_proba

    clf = load_classifier(ckpt)
    probs = predict_proba(clf, [t for t, _ in test_rows])
    pred = [clf.labels[i] for i in probs.argmax(-1)]
    index = {lab: i for i, lab in enumerate(clf.labels)}
    m = classification_metrics([index[g] for _, g in test_rows], [index[p] for p in pred], clf.labels)
    return float(m["accuracy"]), float(m["macro_f1"]), pred


def baseline_scores(train_rows, test_rows) -> tuple[float, float, list[str], float]:
    from bench_sst2 import baseline
    from sklearn.metrics import f1_score

    acc, secs, pred = baseline(train_rows, test_rows)
    f1 = f1_score([g for _, g in test_rows], pred, average="macro")
    return acc, float(f1), pred, secs


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("chat", "sst2"))
    ap.add_argument("--steps", type=int, default=300, help="steps of every run (default 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default 1 2 3)")
    ap.add_argument("--work", type=Path, default=None, help="kept work dir (default /tmp/owngpt-bench-recipes-TASK)")
    ap.add_argument("--chat-data", type=Path, default=DIALOGS, help="chat JSONL (default the bundled English)")
    ap.add_argument("--sst2-data", type=Path, default=SST2, help="dir with SST-2's train.tsv and dev.tsv")
    ap.add_argument("--train-rows", type=int, default=8000, help="sst2: training rows (default 8000)")
    ap.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="sst2: also pre-train a llama-tiny LM with AdamW for this many steps on SST-2's train text (no labels) "
        "and fine-tune it with AdamW and with Muon (the fine-tuning default's question); 0 = skip (default)",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="MODEL+OPT",
        help="run only these (e.g. llama-tiny+muon pretrained-llama-tiny+adamw)",
    )
    ap.add_argument("--section", help="docs/benchmarks.md section to write (default recipes-TASK)")
    ap.add_argument("--note", default="", help="a paragraph added to the section (what disturbed the run)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(f"/tmp/owngpt-bench-recipes-{args.task}")
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.jsonl"
    extra: dict = {}
    if args.task == "chat":
        data = prepare_chat(args.chat_data, work / "chat-data")
    else:
        data, train_rows, test_rows = prepare_sst2(args.sst2_data, work, args.train_rows)
        acc, f1, pred, secs = baseline_scores(train_rows, test_rows)
        extra["baseline"] = {"accuracy": acc, "macro_f1": f1, "seconds": secs, "pred": pred}
        extra["gold"] = [g for _, g in test_rows]
        print(f"TF-IDF + LR: accuracy {acc:.4f}, macro-F1 {f1:.4f}", file=sys.stderr, flush=True)
    runs = list(RUNS)
    if args.task == "sst2" and args.pretrain_steps:
        from owngpt.data.prepare import PrepareConfig, prepare

        lm_ckpt = pretrain_lm(args.sst2_data, work, args.pretrain_steps)
        ft_data = work / "sst2-data-lm"
        if not (ft_data / "meta.json").exists():  # the labelled rows in the language model's tokenizer
            prepare(
                PrepareConfig(
                    sources=[str(work / "train.csv")], out=str(ft_data), task="classify", tokenizer=str(lm_ckpt),
                    progress=False, quiet=True,
                )
            )  # fmt: skip
        extra["pretrain_s"] = float((work / f"lm-{args.pretrain_steps}.seconds").read_text())
        runs += FINETUNES
    for seed in args.seeds:
        for model, opt in runs:
            if args.only and f"{model}+{opt}" not in args.only:
                continue
            done = load_results(results_file)
            if any(
                r["model"] == model and r["optimizer"] == opt and r["seed"] == seed and r["steps"] == args.steps
                for r in done
            ):
                continue
            out = work / f"{model}-{opt}-{args.steps}-{seed}"
            if model == PRETRAINED:
                evals, secs = train_run(args.task, ft_data, out, str(lm_ckpt), opt, args.steps, seed)
            else:
                evals, secs = train_run(args.task, data, out, model, opt, args.steps, seed)
            row = {"model": model, "optimizer": opt, "seed": seed, "steps": args.steps, "train_s": secs}
            row["evals"] = evals
            row["checkpoint"] = str(out / "checkpoints" / ("last" if args.task == "chat" else "best"))
            if args.task == "sst2":
                acc, f1, pred = scores_on_test(Path(row["checkpoint"]), test_rows)
                row.update(test_accuracy=acc, test_macro_f1=f1, pred=pred)
            with open(results_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            short = {k: v for k, v in row.items() if k not in ("pred", "evals")}
            print(f"{model} + {opt}, seed {seed}: {json.dumps(short)} last eval {evals[-1]}", file=sys.stderr)
    rows = [r for r in load_results(results_file) if r["steps"] == args.steps]
    body = report_chat(args, rows, data) if args.task == "chat" else report_sst2(args, rows, extra)
    print(body)
    if not args.no_write:
        _doc.write_section(args.section or f"recipes-{args.task}", body)


def command(args) -> str:
    seeds = sorted({*args.seeds})
    return (
        f"nice python bench/bench_recipes_tasks.py {args.task} --steps {args.steps} --seeds {' '.join(map(str, seeds))}"
    )


def header(args, rows: list[dict]) -> list[str]:
    seeds = sorted({r["seed"] for r in rows})
    return [
        f"Command: `{command(args)}` — {time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
        f"one intra-op thread per run; seeds finished: {', '.join(map(str, seeds))}. Budget: {args.steps} steps per "
        "run, every run from scratch (random weights)"
        + (", except the fine-tunes of the last rows." if any(r["model"] == PRETRAINED for r in rows) else "."),
        "**The machine (2 cores) was shared with other engineers' jobs**: training times are inflated and noisy; "
        "compare the quality columns, and times only within a row's seeds.",
    ]


def report_chat(args, rows: list[dict], data: Path) -> str:
    s = SETTINGS["chat"]
    splits = json.loads((data / "meta.json").read_text(encoding="utf-8"))["splits"]
    n_conv = sum(x["examples"] for x in splits.values())
    lines = [
        "## from-scratch recipes on chat: GPT-2 or LLaMA-style, AdamW or Muon (`bench/bench_recipes_tasks.py chat`)",
        "",
        *header(args, rows),
        "",
        f"The bundled English chatterbot dialogues (2,026 conversations, {n_conv:,} after `owngpt prepare`'s "
        f"de-duplication, 10% of them held out), byte-level BPE of "
        f"{s['vocab']} tokens, the chat task (loss on the assistant's tokens only, owngpt's ChatML template), batch "
        f"{s['batch_size']} x block {s['block_size']}, dropout {s['dropout']}, AdamW lr 1e-3 (Muon lr 0.02 on the "
        f"block matrices), warmup {max(1, args.steps // 10)}, cosine to lr/10 over {args.steps} steps. Validation "
        "loss: over the assistant's tokens of the whole validation split (what `owngpt eval` reports), every "
        f"{max(1, args.steps // 6)} steps.",
        "",
        f"| model + optimizer | val loss @ {args.steps} (per seed) | median @ {args.steps} | lowest val loss (per "
        "seed) | median train time (s) |",
        "|---|---|---|---|---|",
    ]
    best = None
    for model, opt in RUNS:
        rs = sorted((r for r in rows if (r["model"], r["optimizer"]) == (model, opt)), key=lambda r: r["seed"])
        if not rs:
            continue
        end = [r["evals"][-1][1]["val_loss"] for r in rs]
        low = [min(m["val_loss"] for _, m in r["evals"]) for r in rs]
        med = statistics.median(end)
        if best is None or med < best[0]:
            best = (med, model, opt, min(rs, key=lambda r: r["evals"][-1][1]["val_loss"]))
        lines.append(
            f"| {name_of(model, opt)} | {', '.join(f'{x:.4f}' for x in end)} | **{med:.4f}** | "
            f"{', '.join(f'{x:.4f}' for x in low)} | {statistics.median(r['train_s'] for r in rs):.0f} |"
        )
    if args.note:
        lines += ["", args.note]
    if best is not None:
        lines += ["", *sample_replies(best)]
    return "\n".join(lines)


def sample_replies(best) -> list[str]:
    from owngpt.api import load

    med, model, opt, run = best
    bot = load(run["checkpoint"])
    cell = lambda t: t.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"  # noqa: E731
    lines = [
        f"Replies of the best recipe's best seed ({name_of(model, opt)}, seed {run['seed']}, val loss "
        f"{run['evals'][-1][1]['val_loss']:.4f}), step {run['steps']}: greedy, and sampled (temperature 0.8, top-p "
        "0.9, seed 0), 40 new tokens at most:",
        "",
        "| user | greedy | sampled |",
        "|---|---|---|",
    ]
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        greedy = bot.chat(msgs, max_new_tokens=40, temperature=0.0)
        sampled = bot.chat(msgs, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=0)
        lines.append(f"| {cell(p)} | {cell(greedy)} | {cell(sampled)} |")
    return lines


def report_sst2(args, rows: list[dict], extra: dict) -> str:
    from bench_sst2 import mcnemar

    s, base, gold = SETTINGS["sst2"], extra["baseline"], extra["gold"]
    lines = [
        "## from-scratch recipes on SST-2: GPT-2 or LLaMA-style, AdamW or Muon (`bench/bench_recipes_tasks.py sst2`)",
        "",
        *header(args, rows),
        "",
        f"bench_sst2.py's split: {args.train_rows:,} shuffled rows of SST-2's train.tsv (10% held out by `owngpt "
        f"prepare` to pick checkpoints/best by accuracy), BPE vocabulary {s['vocab']}, batch {s['batch_size']} x "
        f"block {s['block_size']}, dropout {s['dropout']}, AdamW lr 1e-3 (Muon lr 0.02 on the block matrices), warmup "
        f"{max(1, args.steps // 10)}, cosine to lr/10 over {args.steps} steps, evaluation every "
        f"{max(1, args.steps // 5)} steps. Test: all {len(gold):,} rows of dev.tsv, scored by `owngpt.predict` on "
        "checkpoints/best. The baseline is fitted on the same training rows in the same run.",
        "",
        "| model | test accuracy (per seed) | median accuracy (vs baseline) | test macro-F1 (per seed) | median macro-F1 "
        "| median train time (s) |",
        "|---|---|---|---|---|---|",
        f"| TF-IDF (1-2 grams) + logistic regression (scikit-learn) | {base['accuracy']:.4f} | **{base['accuracy']:.4f}** "
        f"| {base['macro_f1']:.4f} | **{base['macro_f1']:.4f}** | {base['seconds']:.1f} |",
    ]
    best = None
    for model, opt in RUNS + FINETUNES:
        rs = sorted((r for r in rows if (r["model"], r["optimizer"]) == (model, opt)), key=lambda r: r["seed"])
        if not rs:
            continue
        acc = [r["test_accuracy"] for r in rs]
        f1 = [r["test_macro_f1"] for r in rs]
        med = statistics.median(acc)
        if model != PRETRAINED and (best is None or med > best[0]):
            best = (med, model, opt, rs)
        lines.append(
            f"| owngpt: {name_of(model, opt)} | {', '.join(f'{x:.4f}' for x in acc)} | **{med:.4f}** "
            f"({med - base['accuracy']:+.4f}) | {', '.join(f'{x:.4f}' for x in f1)} | **{statistics.median(f1):.4f}** "
            f"| {statistics.median(r['train_s'] for r in rs):.0f} |"
        )
    if best is not None:
        med, model, opt, rs = best
        lines.append("")
        verdicts = []
        for r in rs:
            b, c, p = mcnemar(r["pred"], base["pred"], gold)
            verdicts.append(
                f"seed {r['seed']}: right where the baseline is wrong {b} times, the reverse {c}, p = {p:.2g}"
            )
        side = "above" if med > base["accuracy"] else "below"
        lines.append(
            f"Best from-scratch recipe by median accuracy: {name_of(model, opt)}, {100 * abs(med - base['accuracy']):.1f} points "
            f"{side} TF-IDF + logistic regression. Row by row against the baseline (McNemar's exact test): "
            + "; ".join(verdicts)
            + "."
        )
    if any(r["model"] == PRETRAINED for r in rows):
        lines += [
            "",
            f"The last two rows answer which optimizer to fine-tune a pre-trained model with: one `llama-tiny` "
            f"language model pre-trained with AdamW for {args.pretrain_steps} steps (batch 32 x 64, lr 2e-3, dropout "
            f"0.1; {extra.get('pretrain_s', 0):.0f} s) on the text of the whole SST-2 train file (no labels, no dev "
            "text), as bench_sst2.py's pre-trained variant does at its size, then fine-tuned on the same labelled "
            "rows with the same settings as the rows above and each optimizer (Muon on the pre-trained block "
            "matrices at muon_lr 0.02, AdamW on the rest and the new head).",
        ]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
