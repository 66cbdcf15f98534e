"""Where a batch-1 decode step's time goes at gpt2 size: the matrix kernels alone vs owngpt's whole step vs llama.cpp's.

    python bench/bench_decode_step.py                 # gpt2 size, batch 1, 1 and 2 threads, 7 interleaved repeats
    python bench/bench_decode_step.py --batch 8 --threads 1
    python bench/bench_decode_step.py --preset tiny --vocab 96 --threads 1   # a laptop-size char model
    python bench/bench_decode_step.py --small-pages   # weights on 4 KiB pages (compare with a run without it)

Prints milliseconds per token (median and minimum of interleaved repeats; nothing is written to the docs), for a
random GPT-2 of an owngpt preset's shape (`--preset`, default `gpt2`: 124M):
- kernels: the 4 projections per layer + the LM head, `--batch` rows each, with nothing around them, through each
  kernel torch offers here: oneDNN's inner product on weights packed once (`PackedLinear`, what owngpt uses),
  MKL's sgemm on the [in, out] layout (`addmm`, GPT-2's `Conv1D`), on the [out, in] layout (`F.linear`, `nn.Linear`),
  and MKL's packed sgemm (`torch.ops.mkl._mkl_linear`); plus the LM head alone, packed vs read from the tied
  embedding as stored ([V, C], `F.linear`);
- owngpt step: `owngpt.decode_step` (the hand-written step the engine calls) at a 64-token cache, and the same model's
  transformers forward with the engine's cache (what the engine called before);
- llama.cpp f32: its decode step on `owngpt export --to gguf` f32 of the same weights (64 tokens minus 1, over 63),
  through bench_decode.py's C-API driver; skipped when llama-cpp-python is missing or `--vocab` is not GPT-2's.
The kernels' row is a floor for any Python-side decode step built on them: it says how close to llama.cpp one can get
without another kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def kernels(cfg: Any, batch: int) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

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

    out["kernels: oneDNN packed (owngpt)"] = k_packed
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

    def hf() -> None:
        with torch.no_grad():
            model(
                input_ids=ids.view(batch, 1),
                position_ids=pos.view(batch, 1),
                use_cache=True,
                **{_cache_arg(model): cache.as_transformers_cache()},
            )

    return {"owngpt step (decode_step)": fast, "owngpt step (transformers forward)": hf}, ref


def llama_step(ref: Any, batch: int, threads: int, work: Path) -> Callable[[int], None] | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import LlamaCpp, gguf_files

    from owngpt.tokenizer import gpt2_tokenizer

    files = gguf_files(ref, gpt2_tokenizer(), work, threads)
    lc = LlamaCpp(files["f32"], threads, batch, 32 + 64 + 16)
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
    args = ap.parse_args()
    from owngpt.decode_kernels import prefer_huge_pages

    if not args.small_pages:
        prefer_huge_pages()  # as owngpt's decode commands do, before torch's first allocation
    import torch
    from transformers import GPT2Config
    from transformers.utils import logging as hf_logging

    from owngpt.models import PRESETS

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(**PRESETS[args.preset], vocab_size=args.vocab)
    fns = kernels(cfg, args.batch)
    steps, ref = owngpt_steps(cfg, args.batch)
    fns.update(steps)
    work = tempfile.TemporaryDirectory(prefix="bench_decode_step_")
    # llama.cpp reads the GGUF's tokenizer (GPT-2's) for its vocabulary size: only with GPT-2's vocabulary
    llama = llama_step(ref, args.batch, max(args.threads), Path(work.name)) if args.vocab == 50257 else None
    for th in args.threads:
        torch.set_num_threads(th)
        times: dict[str, list[float]] = {k: [] for k in fns}
        if llama is not None:
            times["llama.cpp f32 step"] = []
        for f in fns.values():
            f()
        order = list(times)
        for r in range(args.repeats):
            for k in order if r % 2 == 0 else order[::-1]:
                if k.startswith("llama.cpp"):
                    times[k].append(llama(th))
                    continue
                t = time.perf_counter()
                for _ in range(5):
                    fns[k]()
                times[k].append((time.perf_counter() - t) / 5)
        base = statistics.median(times["llama.cpp f32 step"]) if llama is not None else None
        for k, v in times.items():
            m = statistics.median(v)
            rel = f"  llama.cpp step / this {base / m:4.2f}" if base else ""
            print(
                f"{args.preset} threads {th} batch {args.batch} {k:36s} {m * 1e3:7.2f} ms (min {min(v) * 1e3:6.2f}){rel}"
            )
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
