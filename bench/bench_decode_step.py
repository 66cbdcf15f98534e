"""Where a batch-1 decode step's time goes at gpt2 size: the matrix kernels alone vs owngpt's whole step vs llama.cpp's.

    python bench/bench_decode_step.py                 # gpt2 size, batch 1, 1 and 2 threads, 7 interleaved repeats
    python bench/bench_decode_step.py --batch 8 --threads 1
    python bench/bench_decode_step.py --preset tiny --vocab 96 --threads 1   # a laptop-size char model
    python bench/bench_decode_step.py --small-pages   # weights on 4 KiB pages (compare with a run without it)

Prints milliseconds per token (median and minimum of interleaved repeats; nothing is written to the docs), for a
random GPT-2 of an owngpt preset's shape (`--preset`, default `gpt2`: 124M):
- kernels: the 4 projections per layer + the LM head, `--batch` rows each, with nothing around them, through each
  kernel torch offers here: oneDNN's inner product on weights packed once (`PackedLinear`, what owngpt uses for
  several rows), owngpt's own kernel (owngpt.native_kernels: what owngpt uses at one row, where it builds),
  MKL's sgemm on the [in, out] layout (`addmm`, GPT-2's `Conv1D`), on the [out, in] layout (`F.linear`, `nn.Linear`),
  and MKL's packed sgemm (`torch.ops.mkl._mkl_linear`); plus the LM head alone, packed vs read from the tied
  embedding as stored ([V, C], `F.linear`);
- owngpt step: `owngpt.decode_step` (the hand-written step the engine calls) at a 64-token cache, the same step on
  torch's kernels only (OWNGPT_NATIVE_KERNELS=0), and the same model's transformers forward with the engine's cache
  (what the engine called before);
- llama.cpp f32: its decode step on `owngpt export --to gguf` f32 of the same weights (64 tokens minus 1, over 63),
  through bench_decode.py's C-API driver; skipped when llama-cpp-python is missing or `--vocab` is not GPT-2's.
The kernels' row is a floor for any Python-side decode step built on them: it says how close to llama.cpp one can get
without another kernel.

    python bench/bench_decode_step.py --int8 --main   # the int8 model: owngpt's int8 kernel vs fbgemm's, one row

With --int8 the model is owngpt's int8 copy of the same weights (owngpt.quantize): the 49 products through
`Int8Linear.kernel(one_row=True)` (owngpt's int8 kernel, native_gemv_int8.cpp) and through fbgemm's op (what the
module's forward calls), the whole int8 step (owngpt.decode_step) with each at one row, and llama.cpp q8_0's step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_decode, _doc


def kernels(cfg: Any, batch: int) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    from owngpt.native_kernels import native_gemv

    torch.manual_seed(0)
    c = cfg.n_embd
    shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)] * cfg.n_layer  # (out, in) per layer: qkv, proj, fc, proj
    ws = [torch.randn(o, i) * 0.02 for o, i in shapes]
    bs = [torch.randn(o) * 0.02 for o, _ in shapes]
    head = torch.randn(cfg.vocab_size, c) * 0.02
    xs = {n: torch.randn(batch, n) for n in (c, 4 * c)}
    lp = torch.ops.mkldnn._linear_pointwise
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
    head_packed = torch.ops.mkldnn._reorder_linear_weight(head, None)
    w_io = [w.t().contiguous() for w in ws]
    head_io = head.t().contiguous()
    out: dict[str, Callable[[], Any]] = {}

    def k_packed() -> None:
        for w, b, p in zip(ws, bs, packed, strict=True):
            lp(xs[w.shape[1]], p, b, "none", [], "")
        lp(xs[c], head_packed, None, "none", [], "")

    def k_addmm_io() -> None:
        for w, b in zip(w_io, bs, strict=True):
            torch.addmm(b, xs[w.shape[0]], w)
        torch.mm(xs[c], head_io)

    def k_linear_oi() -> None:
        for w, b in zip(ws, bs, strict=True):
            F.linear(xs[w.shape[1]], w, b)
        F.linear(xs[c], head)

    out["kernels: oneDNN packed"] = k_packed
    native = native_gemv()
    if native is not None:  # owngpt's own kernel (owngpt.native_kernels), what owngpt uses at one row
        nk = [native.kernel(native.pack(w), w.shape[0], w.shape[1], b, ("none", "")) for w, b in zip(ws, bs)]
        nk.append(native.kernel(native.pack(head), head.shape[0], c, None, ("none", "")))

        def k_native() -> None:
            for w, k in zip(ws + [head], nk, strict=True):
                k(xs[w.shape[1]])

        out[f"kernels: owngpt native ({native.isa})"] = k_native
    out["kernels: MKL addmm [in,out]"] = k_addmm_io
    out["kernels: MKL F.linear [out,in]"] = k_linear_oi
    if hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, batch) for w in ws + [head]]

        def k_mkl() -> None:
            for w, b, p in zip(ws + [head], bs + [None], mkl, strict=True):
                torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, b, batch)

        out["kernels: MKL packed sgemm"] = k_mkl
    out["LM head: oneDNN packed copy"] = lambda: lp(xs[c], head_packed, None, "none", [], "")
    out["LM head: tied embedding [V,C]"] = lambda: F.linear(xs[c], head)
    out["LM head: [C,V] copy, addmm"] = lambda: torch.mm(xs[c], head_io)
    return out


def owngpt_steps(cfg: Any, batch: int) -> tuple[dict[str, Callable[[], Any]], Any]:
    import torch
    from transformers import GPT2LMHeadModel

    from owngpt.decode_kernels import pack_for_decode
    from owngpt.decode_step import decode_step_for
    from owngpt.engine import _cache_arg, _SlotCache
    from owngpt.native_kernels import ENV

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(cfg).eval()
    model = GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(ref.state_dict())
    pack_for_decode(model)
    step = decode_step_for(model)
    n = 64
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (batch, n)), use_cache=True)
    cache = _SlotCache(cfg.n_positions)
    for g in range(batch):
        cache.append([(layer.keys[g : g + 1], layer.values[g : g + 1]) for layer in out.past_key_values.layers])
    ids = torch.randint(0, cfg.vocab_size, (batch,))
    pos = torch.full((batch,), n)

    def fast() -> None:
        with torch.no_grad():
            step(ids, pos, cache.k, cache.v, batch, n, None)

    def fast_greedy() -> None:  # the step a greedy batch gets: the LM head screened (owngpt.greedy_head)
        with torch.no_grad():
            step(ids, pos, cache.k, cache.v, batch, n, None, top_k=1)

    # the same step on torch's kernels only (what owngpt does with OWNGPT_NATIVE_KERNELS=0 or without a compiler)
    torch_only = GPT2LMHeadModel(cfg).eval()
    torch_only.load_state_dict(ref.state_dict())
    os.environ[ENV] = "0"
    try:
        pack_for_decode(torch_only)
    finally:
        del os.environ[ENV]
    torch_step = decode_step_for(torch_only)

    def fast_torch() -> None:
        with torch.no_grad():
            torch_step(ids, pos, cache.k, cache.v, batch, n, None)

    def hf() -> None:
        with torch.no_grad():
            model(
                input_ids=ids.view(batch, 1),
                position_ids=pos.view(batch, 1),
                use_cache=True,
                **{_cache_arg(model): cache.as_transformers_cache()},
            )

    steps = {
        "owngpt step (decode_step)": fast,
        "owngpt step, greedy (screened head)": fast_greedy,
        "owngpt step, torch kernels only": fast_torch,
    }
    return {**steps, "owngpt step (transformers forward)": hf}, ref


def int8_steps(cfg: Any, batch: int) -> tuple[dict[str, Callable[[], Any]], Any]:
    """The int8 rows (see the module doc): products alone and whole steps, owngpt's int8 kernel vs fbgemm's op."""
    import torch
    from transformers import GPT2LMHeadModel

    from owngpt.decode_step import decode_step_for
    from owngpt.engine import _SlotCache
    from owngpt.quantize import quantize_model

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model = quantize_model(ref).eval()
    lins = [m for m in model.modules() if type(m).__name__ == "Int8Linear"]
    n = 64
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (batch, n)), use_cache=True)
    cache = _SlotCache(cfg.n_positions)
    for g in range(batch):
        cache.append([(layer.keys[g : g + 1], layer.values[g : g + 1]) for layer in out.past_key_values.layers])
    ids = torch.randint(0, cfg.vocab_size, (batch,))
    pos = torch.full((batch,), n)
    xs = {k: torch.randn(batch, k) for k in {m.in_features for m in lins}}
    fns: dict[str, Callable[[], Any]] = {}

    def products(ks: list[Any]) -> Callable[[], None]:
        def run() -> None:
            for m, k in zip(lins, ks, strict=True):
                k(xs[m.in_features])

        return run

    native = lins[0].native
    if native is not None:
        fns[f"kernels: owngpt native int8 ({native.isa_int8})"] = products([m.kernel(True) for m in lins])
    fns["kernels: fbgemm int8 (linear_dynamic)"] = products([m.kernel(False) for m in lins])

    def timed(step: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                step(ids, pos, cache.k, cache.v, batch, n, None)

        return run

    if native is not None:
        fns["owngpt int8 step, native kernel"] = timed(decode_step_for(model))
    kept = [m.native_packed for m in lins]
    for m in lins:  # the same model with fbgemm at one row (as with OWNGPT_NATIVE_KERNELS=0)
        m.native_packed = None
    fns["owngpt int8 step, fbgemm"] = timed(decode_step_for(model))
    for m, k in zip(lins, kept, strict=True):
        m.native_packed = k
    return fns, ref


def llama_step(ref: Any, batch: int, threads: int, work: Path, kind: str = "f32") -> Callable[[int], None] | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import LlamaCpp, gguf_files

    from owngpt.tokenizer import gpt2_tokenizer

    files = gguf_files(ref, gpt2_tokenizer(), work, threads)
    lc = LlamaCpp(files[kind], threads, batch, 32 + 64 + 16)
    prompts = [list(range(100 + s, 132 + s)) for s in range(batch)]

    def run(th: int) -> float:
        lc.set_threads(th)
        t = time.perf_counter()
        lc.generate(prompts, 1)
        t1 = time.perf_counter()
        lc.generate(prompts, 64)
        return ((time.perf_counter() - t1) - (t1 - t)) / 63

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset", default="gpt2", help="owngpt GPT-2 preset whose shape to build (tiny, small, gpt2, ...)"
    )
    ap.add_argument(
        "--vocab", type=int, default=50257, help="vocabulary size (GPT-2's by default; a char model's ~100)"
    )
    ap.add_argument("--batch", type=int, default=1, help="rows per step")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch and llama.cpp thread counts")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median and minimum reported)")
    ap.add_argument("--small-pages", action="store_true", help="do not ask torch for 2 MiB pages (owngpt's default)")
    ap.add_argument(
        "--main",
        action="store_true",
        help="only the rows that decide owngpt's kernel choice (oneDNN, owngpt's native kernel, the step on each, "
        "llama.cpp): a shorter run",
    )
    ap.add_argument("--int8", action="store_true", help="the int8 model: owngpt's int8 kernel vs fbgemm's op")
    ap.add_argument(
        "--write", action="store_true", help="write the table into docs/benchmarks.md (decode-step, decode-step-int8)"
    )
    args = ap.parse_args()
    import bench_decode

    load_before = bench_decode._load_average()
    from owngpt.decode_kernels import prefer_huge_pages

    if not args.small_pages:
        prefer_huge_pages()  # as owngpt's decode commands do, before torch's first allocation
    import torch
    from transformers import GPT2Config
    from transformers.utils import logging as hf_logging

    from owngpt.models import PRESETS

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(**PRESETS[args.preset], vocab_size=args.vocab)
    if args.int8:
        fns, ref = int8_steps(cfg, args.batch)
    else:
        fns = kernels(cfg, args.batch)
        steps, ref = owngpt_steps(cfg, args.batch)
        fns.update(steps)
    if args.main:
        fns = {
            k: f for k, f in fns.items() if "oneDNN packed" in k and "LM head" not in k or "owngpt" in k or "int8" in k
        }
        fns.pop("owngpt step (transformers forward)", None)
    weight_bytes = bench_decode.decode_weight_bytes(ref, 1 if args.int8 else 4)
    kind = "q8_0" if args.int8 else "f32"
    bandwidth = bench_decode.copy_bandwidth()  # the memory-rate limit, measured between the repeats
    work = tempfile.TemporaryDirectory(prefix="bench_decode_step_")
    # llama.cpp reads the GGUF's tokenizer (GPT-2's) for its vocabulary size: only with GPT-2's vocabulary
    llama = llama_step(ref, args.batch, max(args.threads), Path(work.name), kind) if args.vocab == 50257 else None
    llama_row = f"llama.cpp {kind} step"
    results: list[tuple[int, str, float, float, float | None]] = []  # threads, row, median, min, llama / this
    copy_rate: dict[int, float] = {}
    paired: list[tuple[int, str, float]] = []  # threads, "A vs B", median of B's time / A's over the repeats
    for th in args.threads:
        torch.set_num_threads(th)
        times: dict[str, list[float]] = {k: [] for k in fns}
        if llama is not None:
            times[llama_row] = []
        for f in fns.values():
            f()
        order = list(times)
        rates = []
        for r in range(args.repeats):
            for k in order if r % 2 == 0 else order[::-1]:
                if k.startswith("llama.cpp"):
                    times[k].append(llama(th))
                    continue
                t = time.perf_counter()
                for _ in range(5):
                    fns[k]()
                times[k].append((time.perf_counter() - t) / 5)
            rates.append(bandwidth())
        copy_rate[th] = statistics.median(rates)
        print(f"{args.preset} threads {th}: copy bandwidth {copy_rate[th]:.1f} GB/s (bytes read + written)")
        # On a shared machine the medians above drift with the other work; the ratio of two rows timed next to each
        # other in the same repeat sees the same load: its median says which kernel is faster more robustly.
        native_row = next((k for k in times if k.startswith("kernels: owngpt native")), None)
        native8_row = next((k for k in times if k.startswith("kernels: owngpt native int8")), None)
        for fast, slow in (
            (native_row, "kernels: oneDNN packed"),
            ("owngpt step (decode_step)", "owngpt step, torch kernels only"),
            ("owngpt step, greedy (screened head)", "owngpt step (decode_step)"),
            (native8_row, "kernels: fbgemm int8 (linear_dynamic)"),
            ("owngpt int8 step, native kernel", "owngpt int8 step, fbgemm"),
            ("owngpt int8 step, native kernel", llama_row),
            ("owngpt int8 step, fbgemm", llama_row),
        ):
            if fast in times and slow in times:
                ratio = statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))
                paired.append((th, f"{fast} vs {slow}", ratio))
                print(f"{args.preset} threads {th}: {fast} is {ratio:.3f}x as fast as {slow} (median of paired ratios)")
        base = statistics.median(times[llama_row]) if llama is not None else None
        for k, v in times.items():
            m = statistics.median(v)
            results.append((th, k, m, min(v), base / m if base else None))
            rel = f"  llama.cpp step / this {base / m:4.2f}" if base else ""
            print(
                f"{args.preset} threads {th} batch {args.batch} {k:36s} {m * 1e3:7.2f} ms (min {min(v) * 1e3:6.2f}){rel}"
            )
    work.cleanup()
    if args.write:
        write_doc(args, results, paired, copy_rate, weight_bytes, load_before, bench_decode._load_average())
    return 0


def write_doc(
    args: Any,
    results: list[tuple[int, str, float, float, float | None]],
    paired: list[tuple[int, str, float]],
    copy_rate: dict[int, float],
    weight_bytes: float,
    load_before: float,
    load_after: float,
) -> None:
    import platform

    import torch
    from _doc import write_section

    cmd = " ".join(["python bench/bench_decode_step.py", *sys.argv[1:]])
    bandwidth_note = (
        "*GB/s* is weight bytes / time, to set against the copy bandwidth (bytes read + written of a 512 MiB tensor "
        "copy, same run: "
        + ", ".join(f"{v:.1f} GB/s on {k} thread(s)" for k, v in copy_rate.items())
        + "; a kernel that only reads can go above it)."
    )
    if args.int8:
        lines = [
            "## Int8 decode step at batch 1: owngpt's int8 kernel vs fbgemm's, alone and in the step, vs llama.cpp",
            "",
            f"One decode step of owngpt's int8 copy (owngpt.quantize) of a random GPT-2 of the `{args.preset}` "
            f"preset's shape ({weight_bytes / 1e6:.0f} MB of int8 weights read per step, the LM head included), "
            f"{args.batch} row(s), a 64-token cache, milliseconds per step, median (and minimum) of {args.repeats} "
            "interleaved repeats. *kernels* rows: the 49 products alone through owngpt's int8 kernel "
            "(`src/owngpt/native_gemv_int8.cpp`: activations quantized per block of 32) and through fbgemm's "
            "`quantized::linear_dynamic` (one activation scale per call). *owngpt int8 step*: the whole hand-written "
            "step (owngpt.decode_step) with each at one row. *llama.cpp q8_0 step*: its decode step on the same "
            "weights (owngpt's GGUF q8_0 export). " + bandwidth_note,
            "",
            "| threads | row | ms (median) | ms (min) | GB/s of weights | llama.cpp step / this |",
            "|---:|---|---:|---:|---:|---:|",
        ]
    lines_fp32 = [
        "## Decode step at batch 1: the matrix kernels alone vs owngpt's step vs llama.cpp's step",
        "",
        f"One decode step of a random GPT-2 of the `{args.preset}` preset's shape ({weight_bytes / 1e6:.0f} MB of "
        f"fp32 weights read per step, the LM head included), {args.batch} row(s), a 64-token cache, milliseconds per "
        f"step, median (and minimum) of {args.repeats} interleaved repeats. *kernels* rows: the 49 products of one "
        "step with nothing around them: oneDNN's inner product on weights packed once (torch's fastest here) and "
        "owngpt's own kernel (`src/owngpt/native_gemv.cpp`, owngpt.native_kernels). *owngpt step*: the whole "
        "hand-written step (owngpt.decode_step) with the native kernel and each block one native call "
        "(`src/owngpt/native_block.cpp`), and with torch's kernels only (`OWNGPT_NATIVE_KERNELS=0`: oneDNN, the "
        "blocks in Python); *greedy (screened head)*: the step a batch of greedy rows gets, its LM head read from "
        "an fp16 copy with only the tokens that can be the argmax recomputed in fp32 (owngpt.greedy_head; its GB/s "
        "counts the fp32 bytes it stands for, not the fewer it reads). *llama.cpp f32 step*: its decode step on the same weights (owngpt's GGUF "
        "export, its C API). " + bandwidth_note,
        "",
        "| threads | row | ms (median) | ms (min) | GB/s of weights | llama.cpp step / this |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    if not args.int8:
        lines = lines_fp32
    for th, name, med, best, rel in results:
        rel_s = f"{rel:.2f}x" if rel is not None else ""
        lines.append(
            f"| {th} | {name} | {med * 1e3:.2f} | {best * 1e3:.2f} | {weight_bytes / med / 1e9:.1f} | {rel_s} |"
        )
    if paired:
        lines += [
            "",
            "Paired speedups (the median over the repeats of the ratio of two rows timed next to each other, which "
            "see the same load): " + "; ".join(f"{th} thread(s), {name}: {r:.2f}x" for th, name, r in paired) + ".",
        ]
    if load_before > 0.5:
        machine = (
            "a shared machine: other work held the cores and the memory bus, so every time is slower than on a quiet "
            "machine; compare the rows with each other"
        )
    else:
        machine = "a quiet machine"
    lines += [
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}. Load average before the run {load_before:.1f}, at the end "
        f"{load_after:.1f} ({machine}).",
        "",
        f"Reproduce: `{cmd}`",
    ]
    write_section("decode-step-int8" if args.int8 else "decode-step", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
