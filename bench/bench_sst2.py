"""SST-2 sentiment: owngpt classifiers trained on this CPU in minutes vs TF-IDF + logistic regression, same split.

    python bench/bench_sst2.py                     # the numbers in docs/benchmarks.md (section bench:sst2)
    python bench/bench_sst2.py --quick --no-write  # a fast sanity run

Data: /work/shared/data/sst2 (GLUE SST-2; or --data DIR with train.tsv and dev.tsv). The split is the one of
/work/shared/smoke/classify.sh: the train rows shuffled with random.Random(0), the first --train-rows (8,000) for
training; the test set is the whole dev.tsv (6,735 rows: one standard error of an accuracy near 0.8 is 0.5 points),
or its first --test-rows (the smoke script takes 1,000). Every model sees only those training rows' labels;
`owngpt prepare` holds 10% of them out as the validation split that picks checkpoints/best. The pre-trained variant
additionally reads the *text* (no labels) of the whole SST-2 train file to pre-train its language model first,
which is the point of a GPT backbone: unlabelled text is cheap. No dev/test text is ever trained on.

Every owngpt model goes through the CLI a user would run (prepare -> train -> predict), and accuracy is computed
from `owngpt predict`'s JSONL output. The baseline is measured in the same run on the same rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
NAME = "sst2"


import _doc  # noqa: E402  (bench/ is on sys.path when a script runs)


def load_split(data: Path, n_train: int, n_test: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    def read(f: Path) -> list[tuple[str, str]]:
        rows = list(csv.reader(open(f, encoding="utf-8"), delimiter="\t"))[1:]
        return [(t.strip(), lab) for t, lab in rows]

    for f in ("train.tsv", "dev.tsv"):
        if not (data / f).is_file():
            sys.exit(f"--data {data}: no {f} there (expected SST-2's train.tsv and dev.tsv, sentence<TAB>label)")
    train_all = read(data / "train.tsv")
    shuffled = list(train_all)
    random.Random(0).shuffle(shuffled)
    test = read(data / "dev.tsv")
    return shuffled[:n_train], test[:n_test] if n_test else test, [t for t, _ in train_all]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def run(cmd: list[str], log: Path) -> float:
    """Run an owngpt command, appending its output to `log`; return the wall time."""
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def accuracy_of_predictions(pred_file: Path, gold: list[str]) -> float:
    pred = [json.loads(line)["label"] for line in open(pred_file, encoding="utf-8") if line.strip()]
    assert len(pred) == len(gold), (len(pred), len(gold))
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def baseline(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> tuple[float, float, list[str]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2))
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform([t for t, _ in train]), [lab for _, lab in train])
    pred = clf.predict(vec.transform([t for t, _ in test]))
    return float((pred == [lab for _, lab in test]).mean()), time.perf_counter() - t0, [str(p) for p in pred]


def predictions(pred_file: Path) -> list[str]:
    return [json.loads(line)["label"] for line in open(pred_file, encoding="utf-8") if line.strip()]


def mcnemar(ours: list[str], theirs: list[str], gold: list[str]) -> tuple[int, int, float]:
    """Paired test on the same test rows: (rows only we get right, rows only they get right, two-sided p-value).

    McNemar's exact test: under "equally good" each discordant row is a fair coin, so the p-value is scipy's exact
    binomial test of b successes in b + c (scipy comes with scikit-learn, which the baseline needs anyway).
    """
    from scipy.stats import binomtest

    b = sum(o == g != t for o, t, g in zip(ours, theirs, gold))
    c = sum(t == g != o for o, t, g in zip(ours, theirs, gold))
    return b, c, 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def params_of(ckpt: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# the arguments a saved model run depends on: --reuse takes a run only if all of them are unchanged
RUN_SETTINGS = (
    "data", "train_rows", "model", "steps", "pretrain_steps", "pretrain_batch_size", "pretrain_dropout", "batch_size",
    "block_size", "lr", "vocab_size", "seed", "optimizer",
)  # fmt: skip

LM_SETTINGS = (
    "data", "model", "pretrain_steps", "pretrain_batch_size", "pretrain_dropout", "block_size", "vocab_size", "seed",
    "optimizer",
)  # fmt: skip


def run_settings(args, name: str) -> dict:
    # the model from scratch does not depend on the language model's settings
    keys = RUN_SETTINGS if name.startswith("pretrained") else [k for k in RUN_SETTINGS if not k.startswith("pretrain")]
    return {k: getattr(args, k) for k in keys}


def cached(w: Path, name: str, args) -> dict | None:
    """A model run saved by an earlier invocation with the same --work and settings (only with --reuse)."""
    f = w / f"{name}.result.json"
    if not args.reuse or not f.exists():
        return None
    r = json.loads(f.read_text(encoding="utf-8"))
    if r.get("settings") != run_settings(args, name):
        print(f"{name}: saved with other settings, training it again", file=sys.stderr)
        return None
    r["pred"], r["reused"] = Path(r["pred"]), True
    return r


def save_result(w: Path, r: dict, args) -> None:
    r["settings"] = run_settings(args, r["name"])
    (w / f"{r['name']}.result.json").write_text(json.dumps({**r, "pred": str(r["pred"])}, indent=2), encoding="utf-8")


def classify_run(
    name: str, w: Path, data: Path, model: str, steps: int, args, log: Path, extra: list[str], seed: int | None = None
) -> dict:
    out = w / name
    train_s = run(
        [
            "owngpt",
            "train",
            "--task",
            "classify",
            "--data",
            str(data),
            "--model",
            model,
            "--max-steps",
            str(steps),
            "--eval-every",
            str(max(1, steps // 4)),
            "--batch-size",
            str(args.batch_size),
            "--block-size",
            str(args.block_size),
            "--lr",
            str(args.lr),
            "--warmup-steps",
            str(min(100, steps // 10)),
            "--seed",
            str(args.seed if seed is None else seed),
            "--out",
            str(out),
            "--overwrite",  # a run left by an earlier invocation with other settings (see cached())
            "eval_batches=0",
            f"optimizer={args.optimizer}",
            *extra,
        ],
        log,
    )
    ckpt = out / "checkpoints" / "best"
    pred = w / f"{name}.jsonl"
    t0 = time.perf_counter()
    with open(pred, "w", encoding="utf-8") as f, open(log, "a", encoding="utf-8") as err:
        res = subprocess.run(["owngpt", "predict", str(ckpt), "--input", str(w / "test.csv")], stdout=f, stderr=err)
    if res.returncode != 0:
        sys.exit(f"predict failed for {name}; see {log}")
    predict_s = time.perf_counter() - t0
    meta = json.loads((ckpt / "owngpt.json").read_text(encoding="utf-8"))
    return {
        "name": name,
        "train_s": train_s,
        "predict_s": predict_s,
        "best_step": meta.get("step"),
        "val_accuracy": meta.get("metrics", {}).get("accuracy"),
        "params": params_of(ckpt),
        "pred": pred,
    }


def write_section(body: str) -> None:
    _doc.write_section(NAME, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data/sst2")
    ap.add_argument("--train-rows", type=int, default=8000)
    ap.add_argument("--test-rows", type=int, default=0, help="first N rows of dev.tsv as the test set (0: all)")
    ap.add_argument("--model", default="tiny", help="preset for both owngpt models (default tiny)")
    ap.add_argument("--steps", type=int, default=600, help="classifier fine-tuning steps")
    ap.add_argument("--pretrain-steps", type=int, default=1500, help="LM pre-training steps (0 skips that variant)")
    ap.add_argument(
        "--finetune-seeds",
        type=int,
        default=3,
        choices=range(1, 11),
        metavar="1..10",
        help="classifiers fine-tuned from the one pre-trained LM, seeds --seed, --seed+1, ... (ensembled)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pretrain-batch-size", type=int, default=16)
    ap.add_argument(
        "--pretrain-dropout",
        type=float,
        default=0.0,
        help="dropout while pre-training the language model (the SST-2 text is small: many epochs of it memorise)",
    )
    ap.add_argument("--parallel", action="store_true", help="run the two owngpt pipelines side by side")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    # AdamW: what docs/classify.md's numbers were measured with (owngpt's default for a preset is now Muon)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon", "auto"], help="optimizer of every run")
    ap.add_argument("--vocab-size", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--work", default=None, help="keep the data, runs and log here (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="60 steps each: checks the pipeline, not the accuracy")
    ap.add_argument("--reuse", action="store_true", help="reuse model runs an earlier invocation saved in --work")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating the doc")
    args = ap.parse_args()
    # the command that reproduces this run: every option given a non-default value (bookkeeping ones left out)
    defaults = vars(ap.parse_args([]))
    args.command = " ".join(
        ["python bench/bench_sst2.py"]
        + [
            f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
            for k, v in vars(args).items()
            if v != defaults[k] and k not in ("work", "reuse", "no_write")
        ]
    )
    if args.quick:
        args.steps, args.pretrain_steps = 60, 60
    w = Path(args.work or tempfile.mkdtemp(prefix="bench-sst2-"))
    w.mkdir(parents=True, exist_ok=True)
    log = w / "log.txt"
    train, test, all_train_text = load_split(Path(args.data), args.train_rows, args.test_rows)
    args.n_lm_rows = len(all_train_text)
    write_csv(w / "train.csv", train)
    write_csv(w / "test.csv", test)
    gold = [lab for _, lab in test]
    t_start = time.perf_counter()

    base_acc, base_s, base_pred = baseline(train, test)
    args.base_pred = base_pred
    print(f"TF-IDF + LR: {base_acc:.3f} ({base_s:.1f} s)", flush=True)

    results: list[dict] = []
    lock = threading.Lock()

    def done(r: dict) -> None:
        with lock:
            results.append(r)
            results.sort(key=lambda x: x["order"])
            print(f"{r['label']}: {accuracy_of_predictions(r['pred'], gold):.3f} ({r['train_s']:.0f} s)", flush=True)
            if not args.no_write:
                report(args, train, test, gold, base_acc, base_s, results, t_start, final=False)

    def scratch() -> None:
        if (r := cached(w, "scratch", args)) is not None:
            return done(r)
        prep = ["owngpt", "prepare", str(w / "train.csv"), "--task", "classify", "--tokenizer", "bpe"]
        prep_s = run([*prep, "--vocab-size", str(args.vocab_size), "--out", str(w / "data"), "--overwrite"], log)
        r = classify_run("scratch", w, w / "data", args.model, args.steps, args, log, ["dropout=0.1"])
        r.update(label=f"`{args.model}` from scratch, {args.steps} steps", prep_s=prep_s, order=0)
        save_result(w, r, args)
        done(r)

    def pretrained() -> None:
        seeds = [args.seed + i for i in range(args.finetune_seeds)]
        names = ["pretrained" if i == 0 else f"pretrained_seed{sd}" for i, sd in enumerate(seeds)]
        todo = []
        for i, (name, sd) in enumerate(zip(names, seeds)):
            if (r := cached(w, name, args)) is not None:
                done(r)
            else:
                todo.append((i, name, sd))
        if not todo:
            return
        lm_ckpt = w / "lm" / "checkpoints" / "last"
        lm_result = w / "lm.result.json"
        # the language model depends on fewer settings than the fine-tunes: reuse it when only those changed
        lm_settings = {k: getattr(args, k) for k in LM_SETTINGS}
        prev = json.loads(lm_result.read_text(encoding="utf-8")) if args.reuse and lm_result.exists() else None
        if prev is not None and prev.get("settings") == lm_settings and lm_ckpt.is_dir():
            lm_prep_s, lm_s = prev["prep_s"], prev["pretrain_s"]  # the language model of an earlier invocation
        else:
            # The language model reads the text of the whole SST-2 train file (no labels), one sentence per line.
            (w / "lm.txt").write_text("\n".join(all_train_text) + "\n", encoding="utf-8")
            prep = ["owngpt", "prepare", str(w / "lm.txt"), "--task", "lm", "--doc-sep", "line", "--tokenizer", "bpe"]
            lm_prep_s = run(
                [*prep, "--vocab-size", str(args.vocab_size), "--out", str(w / "lm_data"), "--overwrite"], log
            )
            lm_s = run(
                [
                    "owngpt",
                    "train",
                    "--task",
                    "lm",
                    "--data",
                    str(w / "lm_data"),
                    "--model",
                    args.model,
                    "--max-steps",
                    str(args.pretrain_steps),
                    "--eval-every",
                    str(max(1, args.pretrain_steps // 2)),
                    "--batch-size",
                    str(args.pretrain_batch_size),
                    "--block-size",
                    str(args.block_size),
                    "--lr",
                    "2e-3",
                    "--warmup-steps",
                    str(min(100, args.pretrain_steps // 10)),
                    "--seed",
                    str(args.seed),
                    "--out",
                    str(w / "lm"),
                    "--overwrite",
                    f"dropout={args.pretrain_dropout}",
                    f"optimizer={args.optimizer}",
                ],
                log,
            )
            lm_result.write_text(
                json.dumps({"prep_s": lm_prep_s, "pretrain_s": lm_s, "settings": lm_settings}), encoding="utf-8"
            )
        # the labelled rows in the language model's tokenizer (cheap; redone so that --train-rows may change)
        prep = ["owngpt", "prepare", str(w / "train.csv"), "--task", "classify", "--tokenizer", str(lm_ckpt)]
        prep_s = lm_prep_s + run([*prep, "--out", str(w / "data_lm"), "--overwrite"], log)
        for i, name, sd in todo:
            r = classify_run(name, w, w / "data_lm", str(lm_ckpt), args.steps, args, log, ["dropout=0.1"], seed=sd)
            r.update(
                label=f"`{args.model}` LM pre-trained {args.pretrain_steps} steps (batch {args.pretrain_batch_size}"
                + (f", dropout {args.pretrain_dropout:g}" if args.pretrain_dropout else "")
                + ") "
                f"on SST-2 text, then {args.steps} steps, seed {sd}",
                prep_s=prep_s,
                # the language model is trained once and shared: its time is counted on the first fine-tune
                pretrain_s=lm_s if i == 0 else 0.0,
                order=1 + i,
                seed=sd,
                pretrained=True,
            )
            save_result(w, r, args)
            done(r)

    jobs = [scratch] + ([pretrained] if args.pretrain_steps else [])
    # The two pipelines are independent; --parallel runs them side by side (each then gets part of the CPU).
    with ThreadPoolExecutor(max_workers=len(jobs) if args.parallel else 1) as ex:
        for f in [ex.submit(j) for j in jobs]:
            f.result()
    # Soft voting: `owngpt predict --models` averages the classifiers' probabilities.
    singles = list(results)
    ensembles = []
    pre = [r for r in singles if r.get("pretrained")]
    if len(pre) > 1:
        ensembles.append(("ensemble_pretrained", f"ensemble of the {len(pre)} pre-trained fine-tunes above", pre))
    if len(singles) > 1 and len(singles) != len(pre):
        ensembles.append(("ensemble", f"ensemble of all {len(singles)} models above", singles))
    for k, (name, label, members) in enumerate(ensembles):
        pred = w / f"{name}.jsonl"
        models = [str(w / r["name"] / "checkpoints" / "best") for r in members]
        t0 = time.perf_counter()
        with open(pred, "w", encoding="utf-8") as f, open(log, "a", encoding="utf-8") as err:
            res = subprocess.run(
                ["owngpt", "predict", "--models", *models, "--input", str(w / "test.csv")], stdout=f, stderr=err
            )
        if res.returncode != 0:
            sys.exit(f"ensemble predict failed; see {log}")
        results.append(
            {
                "name": name,
                "label": f"{label} (`owngpt predict --models`)",
                "ensemble": True,
                "train_s": 0.0,
                "predict_s": time.perf_counter() - t0,
                "pred": pred,
                "order": 100 + k,
                "params": sum(r["params"] for r in members),
            }
        )
        print(f"{name}: {accuracy_of_predictions(pred, gold):.3f}", flush=True)

    report(args, train, test, gold, base_acc, base_s, results, t_start, final=True)


def report(args, train, test, gold, base_acc, base_s, results, t_start, final: bool) -> None:
    """Write (or print) the doc section; called after every model so that an interrupted run still documents."""
    total = time.perf_counter() - t_start
    rows = [f"| TF-IDF (1-2 grams) + logistic regression (scikit-learn) | **{base_acc:.3f}** | — | {base_s:.1f} s |"]
    for r in results:
        acc = accuracy_of_predictions(r["pred"], gold)
        t = r["train_s"] + r.get("pretrain_s", 0)
        if r.get("ensemble"):
            rows.append(
                f"| owngpt: {r['label']} | **{acc:.3f}** ({acc - base_acc:+.3f}) | {r['params'] / 1e6:.2f} M "
                f"| {r['predict_s']:.0f} s predict |"
            )
            continue
        rows.append(
            f"| owngpt: {r['label']} | **{acc:.3f}** ({acc - base_acc:+.3f}) | {r['params'] / 1e6:.2f} M "
            f"| {t:.0f} s (+{r['predict_s']:.0f} s predict) |"
        )
    accs = {r["label"]: accuracy_of_predictions(r["pred"], gold) for r in results}
    best_label, best_acc = max(accs.items(), key=lambda kv: kv[1]) if accs else ("", 0.0)
    best = next((r for r in results if r["label"] == best_label), None)
    b, c, p = mcnemar(predictions(best["pred"]), args.base_pred, gold) if best else (0, 0, 1.0)
    paired = (
        f" On the same rows it is right where the baseline is wrong {b} times and wrong where the baseline is right "
        f"{c} times (McNemar's paired test: p = {p:.2g}"
    )
    if best_acc > base_acc:
        verdict = (
            f"The best owngpt result, {best_label}, is {100 * (best_acc - base_acc):.1f} points above the baseline."
            + paired
            + ("; a real difference at the 5% level)." if p < 0.05 else "; not a significant difference).")
        )
    else:
        verdict = (
            f"No owngpt model beats the baseline here: the best, {best_label}, is "
            f"{100 * (base_acc - best_acc):.1f} points below." + paired + ")."
        )
    rising = [r["label"] for r in results if r.get("best_step") is not None and r["best_step"] >= args.steps]
    if rising:
        verdict += (
            f" Best validation accuracy at the last evaluation: {'; '.join(rising)}. The cosine schedule reaches its "
            "lowest learning rate there, so this alone does not promise gains from more steps (longer fine-tunes "
            'measured so far overfit: docs/classify.md, "What helped on SST-2").'
        )
    reused = any(r.get("reused") for r in results)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    threads = os.environ.get("OMP_NUM_THREADS")
    reproduce = f"{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}{args.command}"
    threads_note = (
        f" `OMP_NUM_THREADS={threads}`: with many processes on two cores, one thread per process made a training "
        "step 4-5x faster than torch's default of one thread per core (23 s vs 5 s measured here)."
        if threads
        else ""
    )
    partial = "" if final else "\n**Partial run** (interrupted before every model was trained).\n"
    body = f"""## SST-2 sentiment: owngpt classifiers vs TF-IDF + logistic regression
{partial}
Test accuracy on {"all " if not args.test_rows else "the first "}{len(test):,} rows of SST-2 `dev.tsv`; training on {len(train):,} rows of `train.tsv`
(shuffled with seed 0, as in `smoke/classify.sh`), of which `owngpt prepare` holds 10% out for validation
(checkpoints/best is picked on it). The baseline is measured in the same run on the same rows. The pre-trained models
start from one language model trained on the text of the SST-2 train file ({args.n_lm_rows:,} rows, no labels, no dev text)
for {args.pretrain_steps} steps of {args.pretrain_batch_size} x {args.block_size} tokens{f", dropout {args.pretrain_dropout:g}" if args.pretrain_dropout else ""} (its time is counted on the
first of them), then are fine-tuned on the labelled rows with different seeds.

| model | test accuracy (vs baseline) | parameters | time on this CPU |
|---|---|---|---|
{chr(10).join(rows)}

{verdict}

Settings: batch {args.batch_size}, block {args.block_size}, lr {args.lr}, dropout 0.1, BPE vocabulary
{args.vocab_size}, seed {args.seed} unless given; one run per model (on {len(test):,} test examples one standard error of an accuracy near
0.8 is {100 * (0.16 / len(test)) ** 0.5:.1f} points, so smaller differences are noise). {"Model runs reused from an earlier invocation (times as measured then); this one: " if reused else "Whole benchmark: "}{total / 60:.1f} min on {os.cpu_count()} CPU
cores ({platform.processor() or platform.machine()}); load average at the end {load:.1f}: other work shared the CPU,
so the times are upper bounds.{threads_note}

Reproduce: `{reproduce}`
"""
    if args.no_write:
        print(body)
    else:
        write_section(body)
        print(f"updated {DOC}", flush=True)


if __name__ == "__main__":
    main()
