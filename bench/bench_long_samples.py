"""Long samples past the trained context: do they read as well at the end as at the start?

    python bench/bench_long_samples.py --ckpt runs/demo-shakespeare/run/checkpoints/best
    python bench/bench_long_samples.py                # trains the demo's model first (tiny, block 64, 1000 steps)

The measure: the fraction of words (runs of letters and apostrophes) in a stretch of generated text that occur in
the training text (Tiny Shakespeare's own vocabulary, lowercased). Samples of 600 characters (character-level model,
so 600 new tokens, 9x its block of 64) are scored over their first 200 and their last 200 characters. A model that
falls apart past its trained context writes non-words at the end; one that does not scores the same at both ends.

Three ways to read the same weights, same seeds, in the same run:
- `trained context, shift C/4`: owngpt's default: the window is the trained context (64) and jumps by 16 tokens;
- `trained context, shift 1`: nanoGPT's exact semantics (the last 64 tokens at every step), a re-fill every step;
- `position table (old)`: what owngpt did before: the window is the model's 256 positions, 192 of them never trained.
Also the decode speed of each (tokens/s, one thread). Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import _doc  # noqa: E402  (bench/ is on sys.path when a script runs)

ROOT = Path(__file__).resolve().parents[1]
NAME = "long-samples"
WORD = re.compile(r"[A-Za-z']+")


def word_fraction(text: str, vocab: set[str]) -> float:
    words = [w.lower().strip("'") for w in WORD.findall(text)]
    words = [w for w in words if w]
    return sum(w in vocab for w in words) / len(words) if words else 0.0


def train_demo_model(out: Path, steps: int) -> Path:
    from owngpt.config import TrainConfig
    from owngpt.data.prepare import PrepareConfig, prepare
    from owngpt.demo import sample_file
    from owngpt.train import train

    data = out / "data"
    prepare(
        PrepareConfig(sources=[str(sample_file("tinyshakespeare.txt"))], out=str(data), tokenizer="char", seed=1337)
    )
    cfg = TrainConfig(
        task="lm", data=str(data), out=str(out / "run"), model="tiny", max_steps=steps, batch_size=12, block_size=64,
        lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule="cosine", eval_every=steps, dropout=0.0, seed=1337,
    ).validate()  # fmt: skip
    res = train(cfg)
    return Path(res.best_checkpoint or res.last_checkpoint)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a char-level Tiny Shakespeare checkpoint trained on blocks of 64 (else: train one)")
    ap.add_argument("--steps", type=int, default=1000, help="training steps when no --ckpt is given")
    ap.add_argument("--samples", type=int, default=8, help="samples (seeds) per way of reading")
    ap.add_argument("--chars", type=int, default=600)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    from owngpt.demo import sample_file
    from owngpt.generation import SamplingParams, encode_prompt, generate_batch, load_for_generation, position_table

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else train_demo_model(Path(tmp), args.steps)
        lm = load_for_generation(str(ckpt))
        vocab = {w.lower().strip("'") for w in WORD.findall(sample_file("tinyshakespeare.txt").read_text())}
        ctx, table = lm.context_length, position_table(lm.model.config)
        ways = {
            f"trained context {ctx}, shift {ctx // 4}": dict(context=ctx, shift=None),
            f"trained context {ctx}, shift 1 (nanoGPT)": dict(context=ctx, shift=1),
            f"position table {table} (old)": dict(context=table, shift=None),
        }
        prompt = encode_prompt(lm.tokenizer, "ROMEO:")
        rows = []
        for name, kw in ways.items():
            first, last, speeds, example = [], [], [], ""
            for seed in range(args.samples):
                p = SamplingParams(max_new_tokens=args.chars, temperature=0.8, top_k=50, seed=seed)
                t0 = time.perf_counter()
                (r,) = generate_batch(lm.model, lm.tokenizer, [prompt], p, eos_token_ids=[], **kw)
                speeds.append(r.completion_tokens / (time.perf_counter() - t0))
                first.append(word_fraction(r.text[:200], vocab))
                last.append(word_fraction(r.text[-200:], vocab))
                example = example or r.text[-120:]
            rows.append((name, statistics.mean(first), statistics.mean(last), statistics.median(speeds), example))
            print(f"{name}: first {rows[-1][1]:.3f} last {rows[-1][2]:.3f} {rows[-1][3]:.0f} tok/s", flush=True)
        meta = lm.meta

    lines = [
        "## Long samples past the trained context (`bench/bench_long_samples.py`)",
        "",
        f"Character-level `tiny` model on Tiny Shakespeare, trained on blocks of {ctx} (step {meta.get('step')}, "
        f"validation loss {meta.get('metrics', {}).get('val_loss', float('nan')):.3f}); {args.samples} samples of "
        f"{args.chars} characters from `ROMEO:` (temperature 0.8, top-k 50, seeds 0-{args.samples - 1}). Score: "
        "the fraction of words in a 200-character stretch that occur in the training text, mean over samples; "
        "decode speed: median tokens/s, one thread, batch 1.",
        "",
        "| window | first 200 chars | last 200 chars | tokens/s | the end of sample 0 |",
        "|---|---:|---:|---:|---|",
    ]
    for name, f, la, sp, ex in rows:
        shown = ex.replace("\n", " / ").replace("|", "\\|")
        lines.append(f"| {name} | {f:.3f} | {la:.3f} | {sp:.0f} | `{shown[-70:]}` |")
    load = os.getloadavg()[0]
    lines += [
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load average {load:.1f}"
        + (" (the machine was shared: speeds are low, compare within the table)." if load > 1.5 else "."),
        "",
        "Reproduce: `python bench/bench_long_samples.py" + (f" --ckpt {args.ckpt}`" if args.ckpt else "`"),
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        _doc.write_section(NAME, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
