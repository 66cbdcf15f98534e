"""Muon's Newton-Schulz iteration on the CPU: bf16 (torch.optim.Muon's hard-coded choice) against fp32 (owngpt's on
the CPU, owngpt/muon.py), at the matrix shapes of owngpt's presets, and one whole optimizer step of each preset.

    python bench/bench_muon.py                 # 1 thread, 5 interleaved repeats, writes its section of docs/benchmarks.md
    python bench/bench_muon.py --quick --no-write

Part 1 times `owngpt.muon.newton_schulz` (5 iterations, torch's coefficients) on one matrix of each shape in bf16 and
in fp32, alternately. Part 2 times `Muon.step()` over all the block matrices of a preset (random gradients) with the
iteration in bf16 (torch's own step) and in fp32, alternately. Medians of the repeats; the ratio is bf16 time / fp32
time (above 1: fp32 is faster). Whether bf16 is fast depends on the CPU having native bf16 matmul (AVX512_BF16, AMX):
the table says which CPU ran it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import _doc  # noqa: E402  (bench/ is on sys.path when a script runs)

NAME = "muon"


def _time(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def block_matrices(preset: dict) -> list[tuple[int, int]]:
    """(out, in) of every matrix Muon trains in a LLaMA-style preset: q, k, v, o, then SwiGLU's gate, up and down."""
    d, ffn = preset["n_embd"], preset["intermediate_size"]
    return [(d, d)] * 4 * preset["n_layer"] + [(ffn, d), (ffn, d), (d, ffn)] * preset["n_layer"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (the median is reported)")
    ap.add_argument("--presets", nargs="+", default=["llama-tiny", "llama-mini"], help="presets timed in part 2")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, small shapes, nothing written")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()
    import torch

    from owngpt.models import PRESETS
    from owngpt.muon import Muon, newton_schulz

    BF16, FP32 = torch.bfloat16, torch.float32

    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    shapes = [(128, 128), (128, 512)] if args.quick else [(128, 128), (512, 128), (192, 192), (768, 192), (768, 768)]
    coeffs = (3.4445, -4.7750, 2.0315)
    before = os.getloadavg()[0]
    rows = []
    for shape in shapes:
        g = torch.randn(*shape)
        t = {BF16: [], FP32: []}
        reps = 1 if shape[0] * shape[1] >= 768 * 768 else 3
        for _ in range(repeats):
            for dt in (BF16, FP32):
                t[dt].append(_time(lambda dt=dt, g=g: newton_schulz(g, coeffs, 5, 1e-7, dt), reps))
        b, f = statistics.median(t[BF16]), statistics.median(t[FP32])
        rows.append((f"Newton-Schulz, one {shape[0]} x {shape[1]} matrix", b, f))
        print(rows[-1])
    for preset in [] if args.quick else args.presets:
        params = [torch.nn.Parameter(torch.randn(*shape) * 0.02) for shape in block_matrices(PRESETS[preset])]
        for p in params:
            p.grad = torch.randn_like(p)
        opts = {dt: Muon([p for p in params], lr=1e-3, ns_dtype=dt) for dt in (BF16, FP32)}
        t = {BF16: [], FP32: []}
        for _ in range(repeats):
            for dt in (BF16, FP32):
                t[dt].append(_time(opts[dt].step, 1))
        b, f = statistics.median(t[BF16]), statistics.median(t[FP32])
        rows.append((f"Muon.step, `{preset}`'s {len(params)} block matrices", b, f))
        print(rows[-1])
    load = os.getloadavg()[0]
    lines = [
        "## Muon's Newton-Schulz on the CPU: bf16 (torch's) vs fp32 (owngpt's)",
        "",
        "Milliseconds, median of interleaved repeats, "
        f"{args.threads} thread(s); ratio = bf16 time / fp32 time (above 1: fp32 is faster). owngpt runs the "
        'iteration in fp32 on the CPU and in bf16 on GPUs (owngpt/muon.py, docs/training.md "Newton-Schulz '
        'precision").',
        "",
        "| what | bf16 ms | fp32 ms | bf16 / fp32 |",
        "|---|---:|---:|---:|",
        *[f"| {what} | {b:.2f} | {f:.2f} | {b / f:.1f}x |" for what, b, f in rows],
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {_doc.cpu_model()}, torch {torch.__version__}; "
        f"load average {before:.1f} before, {load:.1f} after.",
        "",
        "Reproduce: `python bench/bench_muon.py`",
    ]
    text = "\n".join(lines)
    print(text)
    if not (args.quick or args.no_write):
        _doc.write_section(NAME, text)


if __name__ == "__main__":
    main()
