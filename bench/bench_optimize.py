"""Deployment trade-offs: size, decode tokens/s and perplexity of fp32, int8 and pruned variants, all in one run.

    python bench/bench_optimize.py                    # trains the small perplexity model first if needed (~5 min)
    python bench/bench_optimize.py --ppl-ckpt RUN/checkpoints/best --ppl-data DATA_DIR
    python bench/bench_optimize.py --no-write         # print only

Two models, because no trained `gpt2`-size checkpoint exists here (no network, and training one takes days on 2
cores) and random weights give meaningless perplexity:
  - speed and size: a `gpt2`-size GPT-2 (124M parameters, vocab 50257) with random weights. Decode speed does not
    depend on the weights' values (dense kernels), so these columns are the real `gpt2`-size numbers;
  - perplexity: owngpt's `tiny` preset trained for a few minutes on Tiny Shakespeare (char-level), each variant made
    from it by the same code, scored on the same validation tokens.
Every variant is built by owngpt's own code (owngpt.quantize, owngpt.prune) and its size is that of the files it
writes. Decode: transformers' `generate`, greedy, batch 1, the same 16-token prompt and 32 new tokens for all,
run interleaved (A B C A B C ...) with the median of the repeats, so that load from other work hits all alike.
Writes its section of docs/benchmarks.md (between `<!-- bench:optimize -->` markers).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
NAME = "optimize"
CACHE = ROOT / "runs" / "bench_optimize"  # runs/ is git-ignored
SHAKESPEARE = ROOT / "src" / "owngpt" / "sample_data" / "tinyshakespeare.txt"  # the bundled copy


import _doc  # noqa: E402  (bench/ is on sys.path when a script runs)


def train_small(steps: int) -> tuple[Path, Path]:
    """Prepare Tiny Shakespeare (char) and train the `tiny` preset with owngpt's CLI; cached between runs."""
    data, run = CACHE / "shake_data", CACHE / f"shake_tiny_{steps}"
    owngpt = [sys.executable, "-m", "owngpt"]
    if not (data / "meta.json").exists():
        if not SHAKESPEARE.exists():
            sys.exit(f"no {SHAKESPEARE}: pass --ppl-ckpt and --ppl-data")
        subprocess.run([*owngpt, "prepare", str(SHAKESPEARE), "--out", str(data), "--tokenizer", "char"], check=True)
    ckpt = run / "checkpoints" / "last"
    if not (ckpt / "config.json").exists():
        print(f"training the perplexity model: tiny preset, {steps} steps on Tiny Shakespeare...", file=sys.stderr)
        subprocess.run(
            [
                *owngpt,
                "train",
                "--data",
                str(data),
                "--model",
                "tiny",
                "--max-steps",
                str(steps),
                "--eval-every",
                str(steps),
                "--batch-size",
                "12",
                "--block-size",
                "64",
                "--seed",
                "1",
                "--out",
                str(run),
            ],
            check=True,
        )
    return ckpt, data


def variants(model, tok, work: Path, tag: str, finetune: tuple[Path, int, int] | None = None) -> dict[str, tuple]:
    """name -> (model to run, dir written): the same transforms for both models."""
    from owngpt.checkpoint import load_model, save_checkpoint
    from owngpt.prune import magnitude_prune, prune_mlp
    from owngpt.quantize import save_quantized

    out: dict[str, tuple] = {}
    meta = {"task": "lm"}
    d = save_checkpoint(work / f"{tag}-fp32", model, tok, meta)
    out["fp32"] = (model, d)
    save_quantized(model, tok, work / f"{tag}-int8", meta)
    out["int8 (dynamic, all projections)"] = (load_model(work / f"{tag}-int8").eval(), work / f"{tag}-int8")
    mlp = copy.deepcopy(model)
    prune_mlp(mlp, 0.5)
    d = save_checkpoint(work / f"{tag}-mlp50", mlp, tok, meta)
    out["pruned mlp 50% (structured)"] = (mlp, d)
    save_quantized(mlp, tok, work / f"{tag}-mlp50-int8", meta)
    out["pruned mlp 50% + int8"] = (load_model(work / f"{tag}-mlp50-int8").eval(), work / f"{tag}-mlp50-int8")
    mag = copy.deepcopy(model)
    magnitude_prune(mag, 0.5, "global")
    d = save_checkpoint(work / f"{tag}-mag50", mag, tok, meta)
    out["magnitude 50% (unstructured)"] = (mag, d)
    if finetune is not None:
        from owngpt.prune import prune

        data, steps, block = finetune
        prune(
            d.parent / f"{tag}-fp32",
            work / f"{tag}-mlp50-ft",
            0.5,
            structured="mlp",
            finetune_steps=steps,
            finetune_block_size=block,
            data=str(data),
            measure_result=False,
        )
        out[f"pruned mlp 50% + {steps}-step fine-tune"] = (
            load_model(work / f"{tag}-mlp50-ft").eval(),
            work / f"{tag}-mlp50-ft",
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl-ckpt", default=None, help="a trained small checkpoint for the perplexity columns")
    ap.add_argument("--ppl-data", default=None, help="its data dir (val split scored)")
    ap.add_argument("--train-steps", type=int, default=600, help="steps for the perplexity model if trained here")
    ap.add_argument("--finetune-steps", type=int, default=100, help="recovery fine-tune steps of the pruned row")
    ap.add_argument("--eval-tokens", type=int, default=20000)
    ap.add_argument(
        "--block-size",
        type=int,
        default=64,
        help="perplexity windows and fine-tune sequences: the block size the small model was trained with",
    )
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from owngpt.measure import eval_tokens, hf_decode_fn, interleaved, load_fp32, perplexity, weight_bytes

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ppl_ckpt:
        ckpt, data = Path(args.ppl_ckpt), Path(args.ppl_data)
        args.ppl_desc = "as given by --ppl-ckpt"
    else:
        ckpt, data = train_small(args.train_steps)
        args.ppl_desc = f"trained on Tiny Shakespeare for {args.train_steps} steps (batch 12 x 64, owngpt train)"
    t0 = time.time()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        work = Path(tmp)
        # --- perplexity: the small trained model
        small, stok, _, _ = load_fp32(ckpt)
        tokens, _ = eval_tokens(stok, str(data), None, args.eval_tokens, ckpt)
        small_vars = variants(small, stok, work, "small", finetune=(data, args.finetune_steps, args.block_size))
        ppl = {k: perplexity(m, tokens, args.block_size) for k, (m, _) in small_vars.items()}
        # --- speed and size: gpt2 size, random weights
        torch.manual_seed(0)
        big = GPT2LMHeadModel(GPT2Config()).eval()
        big.generation_config.eos_token_id = None  # never stop early: every run decodes exactly new_tokens
        big.generation_config.pad_token_id = 0
        big_vars = variants(big, None, work, "gpt2")
        prompt = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(1)).tolist()
        fns = {k: hf_decode_fn(m, prompt, args.new_tokens) for k, (m, _) in big_vars.items()}
        print(f"decode: {len(fns)} variants x {args.repeats} interleaved repeats...", file=sys.stderr)
        speed = interleaved(fns, repeats=args.repeats)
        size = {k: weight_bytes(d) for k, (_, d) in big_vars.items()}
        small_size = {k: weight_bytes(d) for k, (_, d) in small_vars.items()}
    minutes = (time.time() - t0) / 60
    load_end = os.getloadavg()[0]
    rows = []
    base_s, base_v, base_p = size["fp32"], speed["fp32"], ppl["fp32"]
    for k in small_vars:
        s, v = size.get(k), speed.get(k)
        rows.append((k, s, v, ppl[k], small_size[k], base_s, base_v, base_p))
    body = render(rows, args, ckpt, data, len(tokens), minutes, load_start, load_end, torch.get_num_threads())
    print(body)
    if not args.no_write:
        write_section(body)
    return 0


def render(rows, args, ckpt, data, n_tokens, minutes, load_start, load_end, threads) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        "## deployment trade-offs: int8 and pruning (`owngpt export --to int8`, `owngpt prune`)",
        "",
        f"Command: `{' '.join(['python bench/bench_optimize.py', *sys.argv[1:]])}` (from the repo root; run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{minutes:.1f} min).",
        "",
        "Size and decode speed: a `gpt2`-size model (124M parameters, vocab 50257, **random weights**: speed does not "
        "depend on the values). Decode: transformers `generate`, greedy, batch 1, 16-token prompt, "
        f"{args.new_tokens} new tokens, median of {args.repeats} runs interleaved across all rows. "
        "Perplexity: no trained `gpt2`-size checkpoint exists here, so it is measured on owngpt's `tiny` preset "
        f"(4 layers, 128 dims, char-level) {args.ppl_desc} (`{ckpt}`), each row made from it by the same "
        f"code, on the same {n_tokens:,} validation tokens of `{data}` in windows of {args.block_size} (its training block "
        "size; the fine-tune uses it too).",
        "",
        "| variant | size (gpt2) | size ratio | decode tok/s (gpt2) | speed-up | perplexity (small) | ppl change |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, s, v, p, _small, bs, bv, bp in rows:
        lines.append(
            f"| {k} | {f(s and s / 1e6, '.0f')} MB | {f(s and s / bs, '.2f')} | {f(v, '.1f')} | "
            f"{f(v and v / bv, '.2f')}x | {p:.3f} | {100 * (p / bp - 1):+.2f}% |"
            if s is not None and v is not None
            else f"| {k} | - | - | - | - | {p:.3f} | {100 * (p / bp - 1):+.2f}% |"
        )
    lines += [
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {threads} threads, Python "
        f"{platform.python_version()}; load average {load_start:.1f} at the start and {load_end:.1f} at the end: "
        "other work shared the CPU, so absolute tokens/s are noisy and the ratios (same run, interleaved) are the "
        "numbers to read.",
        "",
        "Reading it: int8 quantizes every projection and the (tied) LM head to int8 weights with per-channel scales "
        "and int8 dynamic activations; structured MLP pruning removes half the MLP neurons (the model really "
        "shrinks); unstructured magnitude pruning zeroes half the projection weights but keeps them dense, so it "
        "changes neither size nor dense decode speed. Issue target for int8: >= 1.8x decode at `gpt2` size with "
        "perplexity up <= 2%. The unstructured row does the same dense work as fp32, so its distance from 1.00x shows "
        "this run's noise. The fine-tune row continues training the (under-trained) small model, which is why it can "
        "end below the original's perplexity; on a converged model expect recovery towards, not past, the original.",
    ]
    return "\n".join(lines)


def write_section(body: str) -> None:
    _doc.write_section(NAME, body)


if __name__ == "__main__":
    sys.exit(main())
