"""What owngpt's native decode blocks (src/owngpt/native_block.cpp) give over the Python blocks of owngpt.decode_step.

    python bench/bench_native_block.py               # presets tiny and mini, GPT-2 and LLaMA, batch 1 and 8, 1 thread
    python bench/bench_native_block.py --write       # and the table into docs/benchmarks.md (section native-block)

The decode engine end to end (`owngpt.generation.generate_batch`: greedy, a 6-character prompt, 200 new tokens per
row, no early stop) on a random model of each preset's shape with a character vocabulary (the laptop-size models
owngpt trains from scratch; the gpt2-size rows are bench_decode.py's), packed as `load_for_generation` packs it, once
with each block in one native call and once with the Python blocks (the same packed weights and native products:
`_NativeGPT2Blocks.of` / `_NativeLlamaBlocks.of` made to return None). Medians of interleaved repeats; the speed-up
is the median of the paired ratios (runs timed next to each other see the same load). The greedy tokens of the two
must be equal (the benchmark stops otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _doc import cpu_model, write_section  # noqa: E402


def model_for(preset: str, arch: str, tok: Any) -> Any:
    import torch

    from owngpt.decode_kernels import pack_for_decode
    from owngpt.model_init import preset_config, preset_model_class
    from owngpt.models import PRESETS

    name = preset if arch == "gpt2" else f"llama-{preset}"
    cfg = preset_config(dict(PRESETS[name]), tok, 0.0, {})
    torch.manual_seed(0)
    model = preset_model_class(cfg, "causal_lm")(cfg).eval()
    pack_for_decode(model)
    return model, name, sum(p.numel() for p in model.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "mini"], help="owngpt presets (GPT-2 names)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="rows decoded together")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--new-tokens", type=int, default=200, help="tokens generated per row")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()

    import torch

    from owngpt import decode_step
    from owngpt.generation import SamplingParams, generate_batch
    from owngpt.native_kernels import native_gemv
    from owngpt.tokenizer import char_tokenizer

    if native_gemv() is None:
        print("owngpt's native library does not build here: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    text = (Path(__file__).resolve().parents[1] / "src/owngpt/sample_data/tinyshakespeare.txt").read_text()
    tok = char_tokenizer([text])
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    load = os.getloadavg()[0]
    rows = []
    for preset in args.presets:
        for arch, cls in (("gpt2", decode_step._NativeGPT2Blocks), ("llama", decode_step._NativeLlamaBlocks)):
            model, name, n_params = model_for(preset, arch, tok)
            native_of = cls.__dict__["of"]
            for batch in args.batch:
                prompts = [tok.encode("ROMEO:")] * batch
                times: dict[str, list[float]] = {"python": [], "native": []}
                tokens = {}
                for _ in range(args.repeats + 1):  # the first round warms up (not counted)
                    for kind in times:
                        cls.of = native_of if kind == "native" else staticmethod(lambda *a: None)
                        try:
                            t = time.perf_counter()
                            out = generate_batch(model, tok, prompts, params, eos_token_ids=[])
                            times[kind].append(time.perf_counter() - t)
                        finally:
                            cls.of = native_of
                        tokens[kind] = [r.token_ids for r in out]
                if tokens["python"] != tokens["native"]:
                    raise SystemExit(f"{name} batch {batch}: the native blocks' greedy tokens differ")
                med = {k: batch * args.new_tokens / statistics.median(v[1:]) for k, v in times.items()}
                ratio = statistics.median(a / b for a, b in zip(times["python"][1:], times["native"][1:]))
                rows.append((name, n_params, batch, med["python"], med["native"], ratio))
                print(f"{name:11s} batch {batch}: Python blocks {med['python']:7.0f} tokens/s, native blocks "
                      f"{med['native']:7.0f} tokens/s, {ratio:.2f}x", flush=True)  # fmt: skip
    if args.write:
        write_doc(args, rows, load, os.getloadavg()[0])
    return 0


def write_doc(args: Any, rows: list[tuple[Any, ...]], load_before: float, load_after: float) -> None:
    import platform

    import torch

    lines = [
        "## Decode blocks in one native call (native_block.cpp) vs the Python blocks, small models",
        "",
        f"The decode engine end to end (`generate_batch`, greedy, a 6-character prompt, {args.new_tokens} new tokens "
        "per row, no early stop) on random models of owngpt's presets with a character vocabulary (owngpt's char "
        "tokenizer of Tiny Shakespeare: 65 characters and 256 byte tokens), packed as `owngpt generate` packs them; *Python blocks* is owngpt.decode_step's "
        "per-block torch calls around the same native products, *native blocks* each block as one call into "
        "`src/owngpt/native_block.cpp` (what owngpt uses where its native library builds). "
        f"{args.threads} thread(s); medians of {args.repeats} interleaved repeats; the speed-up is the median of "
        "the paired ratios. Greedy tokens equal in every row (checked).",
        "",
        "| model | parameters | batch | Python blocks tokens/s | native blocks tokens/s | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n, batch, py, nat, ratio in rows:
        lines.append(f"| {name} | {n / 1e6:.2f}M | {batch} | {py:.0f} | {nat:.0f} | {ratio:.2f}x |")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines += [
        "",
        f"Measured {when} on {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
        f"{platform.python_version()}; load average before {load_before:.1f}, after {load_after:.1f}.",
        "",
        f"Reproduce: `python bench/bench_native_block.py --write{'' if args.threads == 1 else f' --threads {args.threads}'}`",
    ]
    write_section("native-block", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
