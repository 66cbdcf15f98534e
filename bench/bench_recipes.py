"""From-scratch recipes on nanoGPT's CPU budget: GPT-2 or LLaMA-style model, AdamW or Muon, through owngpt's `train()`.

    nice python bench/bench_recipes.py                       # the numbers in docs/benchmarks.md (bench:recipes)
    python bench/bench_recipes.py --steps 300 --seeds 1 --no-write   # a quick check

Quality: nanoGPT's CPU recipe (bench_train.RECIPE: character-level Tiny Shakespeare, 4 layers, 4 heads, 128 dims,
batch 12 x 64, warmup 100, cosine to lr/10, AdamW lr 1e-3, weight decay 0.1, beta2 0.99, clip 1.0, no dropout) for
`--steps` steps, four ways, interleaved per seed:

    tiny       + adamw   nanoGPT's recipe (GPT-2, what bench_train/bench_nanogpt measure)
    tiny       + muon    Muon (muon_lr 0.02) on the block matrices, AdamW 1e-3 on embeddings, head, norms, biases
    llama-tiny + adamw   LLaMA-style (rotary, RMSNorm, SwiGLU 344, tied embeddings)
    llama-tiny + muon

Every run evaluates on the whole validation split every `--eval-every` steps. Reported: the loss at steps 1,000 and
--steps of the same run (the cosine runs to --steps, so step 1,000 is mid-schedule), and the training wall time until
the first evaluation at or below --target (nanoGPT README's 1.88): wall time of the call minus the time spent in
evaluations (measured by wrapping the task's evaluate in this process), checkpoint saves included.

Speed: training tokens/s of every preset pair (GPT-2 and LLaMA-style, tiny/mini/small) with each optimizer, batch
12 x 64, median of the logged windows after the first.

With `--nanogpt CHECKOUT`, every seed first runs nanoGPT's own train.py on its README's CPU recipe (2,000 steps, its
cosine over 2,000, one intra-op thread like the runs here; bench_nanogpt.py's copy of the checkout, only the seed
line changed), interleaved with the four recipes, and a race table compares each recipe's training time to --target
with nanoGPT's training time for its 2,000 steps: the sum of the per-iteration times train.py prints, its
evaluation iterations counted at the median iteration time (evaluations are excluded on both sides). nanoGPT's
2,000-step weights are scored over the whole validation split too (bench_nanogpt.nanogpt_full_val).

    nice python bench/bench_recipes.py --steps 1000 --eval-every 100 --speed-steps 0 --nanogpt /tmp/nanoGPT

A run with --steps other than 2000 writes its own section (bench:recipes-STEPS), with the cosine over its own steps.

One intra-op thread (what the small model runs fastest with on a shared CPU, see NOTES), `nice`d by the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _doc  # bench/ is on sys.path when a script runs
import torch
from bench_train import RECIPE, prepare

RUNS = (("tiny", "adamw"), ("tiny", "muon"), ("llama-tiny", "adamw"), ("llama-tiny", "muon"))
LABEL = {"tiny": "GPT-2", "llama-tiny": "LLaMA-style"}


class EvalClock:
    """Seconds spent inside the LM task's evaluate (wrapped for the duration of the benchmark)."""

    def __init__(self) -> None:
        from owngpt.tasks.base import CausalLMTask

        self.cls, self.original, self.seconds = CausalLMTask, CausalLMTask.evaluate, 0.0
        clock = self

        def timed(task, *args, **kwargs):
            t = time.perf_counter()
            try:
                return clock.original(task, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - t

        CausalLMTask.evaluate = timed

    def close(self) -> None:
        self.cls.evaluate = self.original


def config(data: Path, out: Path, model: str, optimizer: str, steps: int, seed: int, **kw):
    from owngpt.config import TrainConfig

    r = RECIPE
    base = dict(
        task="lm", data=str(data), out=str(out), model=model, optimizer=optimizer, max_steps=steps,
        batch_size=r["batch"], block_size=r["block"], lr=r["lr"], min_lr=r["min_lr"], warmup_steps=r["warmup"],
        weight_decay=r["weight_decay"], beta2=r["beta2"], grad_clip=r["grad_clip"], dropout=0.0, seed=seed,
        log_every=50, overwrite=True,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def quality_run(data: Path, out: Path, model: str, optimizer: str, steps: int, seed: int, every: int, clock):
    """(curve [(step, val_loss, train seconds)], total seconds) of one run."""
    from owngpt.train import train

    curve: list[tuple[int, float, float]] = []
    t0, e0 = time.perf_counter(), clock.seconds

    def record(step: int, metrics: dict) -> None:
        curve.append((step, metrics["val_loss"], time.perf_counter() - t0 - (clock.seconds - e0)))

    cfg = config(data, out, model, optimizer, steps, seed, eval_every=every, eval_batches=0)
    train(cfg, callbacks=[record])
    return curve, time.perf_counter() - t0


def speed_run(data: Path, out: Path, model: str, optimizer: str, steps: int) -> float:
    from owngpt.train import train

    every = 10 if steps >= 30 else 1  # a big preset gets a few steps: each one a window
    cfg = config(data, out, model, optimizer, steps, 1, eval_every=steps, eval_batches=1, log_every=every)
    train(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in recs if "tokens_per_s" in x][1:]
    return statistics.median(rates)


def nanogpt_timed(repo: Path, seed: int, steps: int = 2000) -> dict:
    """nanoGPT's train.py on its README CPU recipe with one intra-op thread: its times and its final losses."""
    from bench_nanogpt import README_FLAGS, SEED_LINE, nanogpt_full_val

    src = (repo / "train.py").read_text(encoding="utf-8")
    script = repo / f"train_seed{seed}.py"
    script.write_text(src.replace(SEED_LINE, f"torch.manual_seed({seed} + seed_offset)"), encoding="utf-8")
    out = f"out-seed{seed}"
    flags = [f for f in README_FLAGS if not f.startswith(("--max_iters", "--lr_decay_iters"))]
    flags += [f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--always_save_checkpoint=True", f"--out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # as torch.set_num_threads(1) here
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, script.name, "config/train_shakespeare_char.py", *flags],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"nanoGPT's train.py failed (seed {seed}):\n{res.stderr[-2000:]}")
    iters = {
        int(i): float(ms) / 1000 for i, ms in re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", res.stdout, re.M)
    }
    interval = 250  # config/train_shakespeare_char.py's eval_interval: those iterations' times include an evaluation
    plain = [dt for i, dt in iters.items() if i % interval]
    n_eval = len(iters) - len(plain)
    est = re.search(rf"^step {steps}: train loss [\d.]+, val loss ([\d.]+)", res.stdout, re.M)
    return {
        "seed": seed,
        "train_s": sum(plain) + n_eval * statistics.median(plain),
        "wall_s": wall,
        "iters": len(iters),
        "estimate": float(est.group(1)) if est else None,
        "full": nanogpt_full_val(repo, repo / out / "ckpt.pt", steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="steps of every quality run (default 2000)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds (default 1 2)")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between whole-split evaluations")
    ap.add_argument("--target", type=float, default=1.88, help="validation loss to time (default 1.88)")
    ap.add_argument("--speed-steps", type=int, default=30, help="steps of each speed run (0 skips them)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    ap.add_argument(
        "--only", nargs="+", metavar="MODEL+OPT", help="run only these of the four (e.g. llama-tiny+muon tiny+muon)"
    )
    ap.add_argument(
        "--nanogpt", type=Path, help="a nanoGPT checkout: also run its train.py per seed and time the race to --target"
    )
    ap.add_argument(
        "--nanogpt-steps", type=int, default=2000, help="steps of nanoGPT's runs (default 2000, its recipe)"
    )
    ap.add_argument(
        "--speed-only",
        nargs="+",
        metavar="PRESET:STEPS[:REPEATS]",
        help="only measure training tokens/s of these GPT-2 presets and their LLaMA twins (e.g. tiny:30 gpt2:4:1), "
        "AdamW and Muon interleaved --speed-repeats times; writes section bench:recipes-speed",
    )
    ap.add_argument("--speed-repeats", type=int, default=3, help="--speed-only: repeats of each pair (default 3)")
    ap.add_argument("--note", default="", help="a paragraph added under the tables (what disturbed this run)")
    ap.add_argument(
        "--from-log",
        nargs="+",
        metavar="STDERR_LOG",
        help="write the tables from the stderr logs of earlier runs of this script (e.g. seeds run as separate "
        "processes) instead of training",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    mid = min(1000, args.steps)
    if args.from_log:
        results, speeds, ref = read_logs(args.from_log)
        args.seeds = sorted({r["seed"] for rows in results.values() for r in rows})
        report(args, mid, results, speeds, ref)
        return

    if args.speed_only:
        speed_only(args)
        return
    results: dict[tuple[str, str], list[dict]] = {k: [] for k in RUNS}
    speeds: list[tuple[str, str, float, float]] = []
    ref: list[dict] = []  # nanoGPT's runs
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        work = Path(tmp)
        data = prepare(work / "char", "char")
        if args.nanogpt:
            from bench_nanogpt import nanogpt_copy

            repo = nanogpt_copy(args.nanogpt.resolve(), work)
        if args.speed_steps:  # first: short, and what a reader of a partial run needs too
            for gpt2, llama in (("tiny", "llama-tiny"), ("mini", "llama-mini"), ("small", "llama-small")):
                for model in (gpt2, llama):
                    a = speed_run(data, work / f"speed-{model}-a", model, "adamw", args.speed_steps)
                    m = speed_run(data, work / f"speed-{model}-m", model, "muon", args.speed_steps)
                    speeds.append((model, "llama" if model.startswith("llama") else "gpt2", a, m))
                    print(f"speed {model}: adamw {a:.0f}, muon {m:.0f} tokens/s", file=sys.stderr, flush=True)
        clock = EvalClock()
        try:
            for seed in args.seeds:
                if args.nanogpt:
                    ref.append(nanogpt_timed(repo, seed, args.nanogpt_steps))
                    print(f"nanoGPT, seed {seed}: {json.dumps(ref[-1])}", file=sys.stderr, flush=True)
                for model, opt in RUNS:
                    if args.only and f"{model}+{opt}" not in args.only:
                        continue
                    curve, total = quality_run(
                        data, work / f"{model}-{opt}-{seed}", model, opt, args.steps, seed, args.eval_every, clock
                    )
                    at = dict((s, v) for s, v, _ in curve)
                    hit = next(((s, t) for s, v, t in curve if v <= args.target), None)
                    row = {
                        "seed": seed,
                        "mid": at.get(mid),
                        "end": at[args.steps],
                        "hit_step": hit[0] if hit else None,
                        "hit_s": hit[1] if hit else None,
                        "train_s": curve[-1][2],
                        "total_s": total,
                    }
                    results[(model, opt)].append(row)
                    print(f"{model} + {opt}, seed {seed}: {json.dumps(row)}", file=sys.stderr, flush=True)
                # after every seed: a run stopped later (shared machine, deadline) still leaves its table
                report(args, mid, results, speeds, ref)
        finally:
            clock.close()


def speed_only(args: argparse.Namespace) -> None:
    """Tokens/s of each preset pair with each optimizer: runs interleaved (A M A M ...), medians of the repeats."""
    from owngpt.models import PRESETS

    LLAMA_OF = {"tiny": "llama-tiny", "mini": "llama-mini", "small": "llama-small", "gpt2": "llama-base"}
    LLAMA_OF |= {"gpt2-medium": "llama-medium", "gpt2-large": "llama-large", "gpt2-xl": "llama-xl"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-recipes-speed-") as tmp:
        work = Path(tmp)
        data = prepare(work / "char", "char")
        for spec in args.speed_only:
            name, steps, repeats = (spec.split(":") + ["", ""])[:3]
            steps, repeats = int(steps or 30), int(repeats or args.speed_repeats)
            for model in (name, LLAMA_OF[name]):
                spec_name = f"scratch:{model}" if model.startswith("gpt2") else model
                a, m = [], []
                for i in range(repeats):
                    a.append(speed_run(data, work / f"{model}-a{i}", spec_name, "adamw", steps))
                    m.append(speed_run(data, work / f"{model}-m{i}", spec_name, "muon", steps))
                    print(f"speed {model} #{i}: adamw {a[-1]:.1f}, muon {m[-1]:.1f}", file=sys.stderr, flush=True)
                p = PRESETS[model]
                shape = f"{p['n_layer']} x {p['n_embd']}"
                ratios = [y / x for x, y in zip(a, m)]
                rows.append((model, shape, f"{steps} x {repeats}", a, m, ratios))
    lines = [
        "## training tokens/s of each preset, AdamW and Muon (`bench/bench_recipes.py --speed-only`)",
        "",
        f"Command: `nice python bench/bench_recipes.py --speed-only {' '.join(args.speed_only)} --speed-repeats "
        f"{args.speed_repeats}` — {time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, one "
        "intra-op thread, fp32. **The machine (2 cores) was shared with other engineers' jobs**: absolute numbers "
        "are low and noisy; the Muon / AdamW ratio is the median of the per-repeat ratios of back-to-back runs.",
        "",
        "Character-level Tiny Shakespeare (65-token vocabulary), batch 12 x 64, nanoGPT's recipe's optimizer settings. "
        "Each run: STEPS steps from scratch; tokens/s is the median over the logged windows after the first (10-step "
        "windows, or single steps for runs under 30 steps). Muon's extra cost is its Newton-Schulz iterations (bf16 "
        "matmuls, slow on CPUs without AMX) on every block matrix at every step.",
        "",
        "| preset | layers x width | steps per run x runs each | AdamW tokens/s (median) | Muon tokens/s (median) | Muon / AdamW "
        "(median) |",
        "|---|---|---|---|---|---|",
    ]
    for model, shape, steps, a, m, ratios in rows:
        lines.append(
            f"| `{model}` | {shape} | {steps} | {statistics.median(a):,.0f} | {statistics.median(m):,.0f} | "
            f"{statistics.median(ratios):.2f}x |"
        )
    if args.note:
        lines += ["", args.note]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        _doc.write_section("recipes-speed", body)


def read_logs(paths: list[str]) -> tuple[dict, list, list]:
    """The per-run result lines and speed lines this script prints to stderr, from one or more logs."""
    results: dict[tuple[str, str], list[dict]] = {k: [] for k in RUNS}
    speeds, ref = [], []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines():
            m = re.match(r"^(\S+) \+ (adamw|muon), seed \d+: (\{.*\})$", line)
            if m and (m.group(1), m.group(2)) in results:
                results[(m.group(1), m.group(2))].append(json.loads(m.group(3)))
            m = re.match(r"^nanoGPT, seed \d+: (\{.*\})$", line)
            if m:
                ref.append(json.loads(m.group(1)))
            m = re.match(r"^speed (\S+): adamw (\d+), muon (\d+) tokens/s$", line)
            if m:
                model = m.group(1)
                speeds.append(
                    (model, "llama" if model.startswith("llama") else "gpt2", float(m.group(2)), float(m.group(3)))
                )
    for rows in results.values():
        rows.sort(key=lambda r: r["seed"])
    return results, speeds, sorted(ref, key=lambda r: r["seed"])


def report(args: argparse.Namespace, mid: int, results: dict, speeds: list, ref: list) -> None:
    seeds = sorted({r["seed"] for rows in results.values() for r in rows})

    def med(rows, key):
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.median(vals) if len(vals) == len(rows) else None

    def fmt(x, spec=".4f"):
        return "not reached" if x is None else format(x, spec)

    base_train = med(results[RUNS[0]], "train_s") if results[RUNS[0]] else None
    both = mid != args.steps  # a step-1,000 column only when the run goes beyond it
    command = (
        f"nice python bench/bench_recipes.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} "
        f"--eval-every {args.eval_every} --speed-steps {args.speed_steps}"
        + (" --nanogpt NANOGPT_CHECKOUT" if ref else "")
    )
    lines = [
        "## from-scratch recipes: GPT-2 or LLaMA-style, AdamW or Muon (`bench/bench_recipes.py`)"
        + ("" if args.steps == 2000 else f", {args.steps:,}-step schedule"),
        "",
        f"Command: `{command}` — {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, torch {torch.__version__}, one intra-op thread; seeds finished: "
        f"{', '.join(map(str, seeds))}.",
        "**The machine (2 cores) was shared with other engineers' jobs during this run**: wall times are",
        "inflated (several times slower than alone) and noisy; compare rows of the same run, not other sections.",
        "",
        f"nanoGPT's CPU recipe (character-level Tiny Shakespeare, 4 layers, 4 heads, 128 dims, batch 12 x 64, warmup "
        f"100, cosine to lr/10 over {args.steps} steps, AdamW lr 1e-3; Muon lr 0.02 on the block matrices), through "
        f"owngpt's `train()`, each run once per seed, interleaved. Validation loss over the whole validation split "
        f"(111,540 characters) every {args.eval_every} steps"
        + (f"; the step-{mid} loss is mid-schedule of the same run. " if both else ". ")
        + f"Time to {args.target}: training wall time until the first evaluation at or below it (evaluations "
        "excluded, checkpoint saves included), so it is a multiple of the evaluation interval's time.",
        "",
        "| model + optimizer | "
        + (f"val loss @ {mid} (per seed) | " if both else "")
        + f"val loss @ {args.steps} (per seed) | median @ {args.steps} | steps to {args.target} (per seed) | median "
        f"time to {args.target} (s) | median train time (s) | time vs GPT-2+AdamW | time to {args.target} from "
        "tokens/s (s) |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if both else ""),
    ]
    rate = {(m, "adamw"): a for m, _, a, _ in speeds} | {(m, "muon"): mu for m, _, _, mu in speeds}
    tokens_per_step = RECIPE["batch"] * RECIPE["block"]
    for model, opt in RUNS:
        rows = results[(model, opt)]
        if not rows:
            continue
        t = med(rows, "train_s")
        hit = med(rows, "hit_step")
        derived = fmt(hit * tokens_per_step / rate[(model, opt)], ".0f") if hit and (model, opt) in rate else "-"
        lines.append(
            f"| {LABEL[model]} (`{model}`) + {'AdamW' if opt == 'adamw' else 'Muon'} | "
            + (f"{', '.join(fmt(r['mid']) for r in rows)} | " if both else "")
            + f"{', '.join(fmt(r['end']) for r in rows)} | "
            f"**{fmt(med(rows, 'end'))}** | {', '.join(str(r['hit_step']) if r['hit_step'] else '-' for r in rows)} | "
            f"{fmt(med(rows, 'hit_s'), '.0f')} | {t:.0f} | "
            + (f"{t / base_train:.2f}x" if base_train else "-")
            + f" | {derived} |"
        )
    if speeds:
        lines += [
            "",
            f"The last column is the median number of steps to {args.target} x {tokens_per_step} tokens a step / the "
            "preset's tokens/s with that optimizer from the speed table below (measured back to back, so less "
            "disturbed by other jobs than the long runs' wall times).",
        ]
    if ref:
        lines += race_table(args, results, ref)
    if args.note:
        lines += ["", args.note]
    if speeds:
        lines += [
            "",
            "Speed: training tokens/s at batch 12 x 64 (character vocabulary), median of 10-step windows after the "
            f"first, one {args.speed_steps}-step run each, in the same run as the table above.",
            "",
            "| preset | arch | AdamW tokens/s | Muon tokens/s | Muon / AdamW |",
            "|---|---|---|---|---|",
        ]
        for model, arch, a, m in speeds:
            lines.append(f"| `{model}` | {arch} | {a:,.0f} | {m:,.0f} | {m / a:.2f}x |")
    body = "\n".join(lines)
    print(body)
    print(json.dumps({f"{m}+{o}": r for (m, o), r in results.items()}), file=sys.stderr)
    if not args.no_write:
        _doc.write_section("recipes" if args.steps == 2000 else f"recipes-{args.steps}", body)


def race_table(args: argparse.Namespace, results: dict, ref: list) -> list[str]:
    """Each recipe's training time to the target against nanoGPT's own code on the same seed, in the same run."""
    by_seed = {r["seed"]: r for r in ref}
    ref_t = statistics.median(r["train_s"] for r in ref)
    ref_times = ", ".join(f"{r['train_s']:.0f}" for r in ref)
    full = ", ".join(f"{r['full']:.4f}" for r in ref)
    est = ", ".join("-" if r["estimate"] is None else f"{r['estimate']:.4f}" for r in ref)
    lines = [
        "",
        f"Race to {args.target} against nanoGPT's own `train.py` (its README CPU recipe, 2,000 steps, one intra-op "
        "thread, run before the four recipes of each seed): nanoGPT's training time is the sum of the iteration "
        "times it prints, its evaluation iterations (which also hold its checkpoint saves; owngpt's times include "
        "theirs) counted at the median iteration time. Its 2,000-step weights "
        f"scored over the whole validation split: {full} (its own 20-batch estimate: {est}), so on the whole split "
        f"nanoGPT's recipe {'reaches' if max(r['full'] for r in ref) <= args.target else 'does not reach'} "
        f"{args.target} in its run; its time below is that of the whole recipe, the one its README reports about "
        f"{args.target} for. The target of the issue: {args.target} in at most half of nanoGPT's time.",
        "",
        f"| run | training time to {args.target} (s, per seed) | median (s) | vs nanoGPT's time (per seed) | median "
        "ratio | at most half? |",
        "|---|---|---|---|---|---|",
        f"| nanoGPT's `train.py`, its whole 2,000-step recipe | {ref_times} | {ref_t:.0f} | 1.00x | 1.00x | - |",
    ]
    for model, opt in RUNS:
        rows = [r for r in results[(model, opt)] if r["seed"] in by_seed]
        if not rows:
            continue
        ratios = [None if r["hit_s"] is None else r["hit_s"] / by_seed[r["seed"]]["train_s"] for r in rows]
        times = [r["hit_s"] for r in rows]
        reached = [x for x in ratios if x is not None]
        med_ratio = statistics.median(reached) if len(reached) == len(ratios) else None
        lines.append(
            f"| owngpt: {LABEL[model]} (`{model}`) + {'AdamW' if opt == 'adamw' else 'Muon'} | "
            f"{', '.join('not reached' if x is None else f'{x:.0f}' for x in times)} | "
            f"{'-' if med_ratio is None else f'{statistics.median(times):.0f}'} | "
            f"{', '.join('-' if x is None else f'{x:.2f}x' for x in ratios)} | "
            f"{'-' if med_ratio is None else f'**{med_ratio:.2f}x**'} | "
            f"{'-' if med_ratio is None else ('yes' if med_ratio <= 0.5 else 'no')} |"
        )
    walls = ", ".join(f"{r['wall_s']:.0f}" for r in ref)
    lines += ["", f"nanoGPT's whole process wall time (start-up, evaluations and checkpoints included): {walls} s."]
    return lines


if __name__ == "__main__":
    main()
