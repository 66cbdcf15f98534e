"""Decode speed: owngpt's generation path vs plain transformers `model.generate`, same model, same run.

    python bench/bench_decode.py                 # gpt2 size (124M, random weights), batch 1 and 8, 64 new tokens
    python bench/bench_decode.py --repeats 5 --new-tokens 128

owngpt's path (`owngpt.generation.generate_batch`, the decode engine `owngpt.engine` that the CLI, the chat and the
server share) runs its own step loop over a batched KV cache (rows of one length prefilled together, per-row sampling, incremental
detokenization, stop strings, cancel, a sliding window past the context). This measures what that costs against
transformers' `generate`. Both decode greedily with the KV cache and never stop early (no end-of-text), so both
produce exactly batch x new-tokens tokens; the two are run alternately (A B A B ...) and the medians compared, since
the machine's speed drifts when anything else runs. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
NAME = "decode"


import _doc  # noqa: E402  (bench/ is on sys.path when a script runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from owngpt.generation import SamplingParams, generate_batch
    from owngpt.tokenizer import gpt2_tokenizer

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()  # the `gpt2` preset size: 12 layers, 768 dims, vocab 50257
    model.generation_config.eos_token_id = None  # never stop early: both sides generate exactly new_tokens
    model.generation_config.pad_token_id = 50256
    tok = gpt2_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)

    def prompts(b: int) -> list[list[int]]:
        return torch.randint(0, 50257, (b, args.prompt_tokens), generator=gen).tolist()

    def ours(p: list[list[int]]) -> list[list[int]]:
        return [r.token_ids for r in generate_batch(model, tok, p, params, eos_token_ids=[])]

    def plain(p: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(p)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=50256,
            )
        return out[:, ids.shape[1] :].tolist()

    rows = []
    for b in args.batch_sizes:
        p = prompts(b)
        a, c = ours(p), plain(p)  # warm-up, and a check that both produce the same tokens
        assert a == c, "owngpt's greedy tokens differ from transformers'"
        times: dict[str, list[float]] = {"owngpt": [], "transformers": []}
        for r in range(args.repeats):
            order = [("owngpt", ours), ("transformers", plain)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn(p)
                times[name].append(time.perf_counter() - t0)
        n = b * args.new_tokens
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((b, n / med["owngpt"], n / med["transformers"], med["transformers"] / med["owngpt"]))
        print(
            f"batch {b}: owngpt {rows[-1][1]:.1f} tokens/s, transformers generate {rows[-1][2]:.1f} tokens/s, "
            f"ratio {rows[-1][3]:.2f}x  (times owngpt {' '.join(f'{t:.2f}' for t in times['owngpt'])}, "
            f"transformers {' '.join(f'{t:.2f}' for t in times['transformers'])})",
            flush=True,
        )

    if not args.no_write:
        write_section(render(args, rows, n_params))
        print(f"updated {DOC.relative_to(ROOT)}")
    return 0


def render(args: argparse.Namespace, rows: list[tuple[int, float, float, float]], n_params: int) -> str:
    import torch
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    threads = os.environ.get("OMP_NUM_THREADS")
    cmd = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python bench/bench_decode.py"
    if args.repeats != 3 or args.new_tokens != 64 or args.batch_sizes != [1, 8] or args.prompt_tokens != 32:
        cmd += (
            f" --batch-sizes {' '.join(map(str, args.batch_sizes))} --new-tokens {args.new_tokens} "
            f"--prompt-tokens {args.prompt_tokens} --repeats {args.repeats}"
        )
    lines = [
        "## Decode speed: owngpt generation vs transformers `generate`",
        "",
        f"GPT-2 124M architecture (`GPT2LMHeadModel(GPT2Config())`, {n_params / 1e6:.0f}M parameters, random weights), "
        f"greedy, KV cache, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, no early stop; "
        f"median of {args.repeats} alternating runs each. owngpt's path is `owngpt.generation.generate_batch`, "
        "the decode engine `owngpt.engine` (what `owngpt generate`, `owngpt chat`, the Python API and the server "
        "use: its own step loop over a batched KV cache, rows of one prompt length prefilled together, per-row "
        "sampling and incremental detokenization, stop strings, cancel, a window that slides past the context); both "
        "produce identical tokens. Compare the ratio within one run: single runs vary on a shared machine.",
        "",
        "| batch | owngpt tokens/s | transformers generate tokens/s | ratio |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {b} | {o:.1f} | {t:.1f} | {r:.2f}x |" for b, o, t, r in rows]
    lines += [
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}. Load average at the end: {load:.1f}"
        + (
            " (other work shared the CPU: absolute numbers are low, the ratio is what this compares)."
            if load > 1.5
            else "."
        ),
        "",
        f"Reproduce: `{cmd}`",
    ]
    return "\n".join(lines)


def write_section(body: str) -> None:
    _doc.write_section(NAME, body)


if __name__ == "__main__":
    sys.exit(main())
