"""Which int8 matrix kernel of this torch build decodes fastest: the projections of one gpt2-size decode step, alone.

    python bench/bench_int8_kernels.py                 # batch 1 and 8, 1 thread, 7 interleaved repeats
    python bench/bench_int8_kernels.py --threads 2 --batch-sizes 1

Times the 48 transformer projections of GPT-2 124M (12 x c_attn, attn c_proj, c_fc, mlp c_proj) plus the tied LM head
(50257 x 768), once each per "step", with every int8 kernel torch's CPU build offers, on the same int8 weights
(symmetric, one fp32 scale per output channel: owngpt's int8 format), plus the fp32 oneDNN kernel owngpt's fp32 path
uses as a reference. Each kernel is a plain callable x -> x @ (q * scale).T + bias; the error column is its largest
absolute difference from that product computed in float64, relative to the product's largest value. Medians of
interleaved repeats (A B C ... then reversed); prints only (the numbers inform owngpt.quantize's docstring).

    python bench/bench_int8_kernels.py --ppl CKPT DATA_DIR   # int8 perplexity: fbgemm vs owngpt's one-row kernel

    python bench/bench_int8_kernels.py --decode        # where batch-1 int8 decode time goes, end to end

With --decode it instead decodes greedily (32-token random prompt, --new-tokens, batch --batch-sizes) with the int8
model three ways, interleaved: owngpt's engine (`generate_batch`, transformers' forward per step), a hand-written
GPT-2 step over the same int8 modules (static KV buffers, the shape of a decode step without transformers' per-module
Python; written here only to measure, and checked to give the engine's tokens), and llama.cpp q8_0 of the same
weights (as bench/bench_decode.py runs it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]  # (out, in), the head last


def kernels(q: Any, s: Any, b: Any) -> dict[str, Callable[[Any], Any]]:
    """Every int8 way to compute x @ (q * s).T + b (x fp32 (M, in)), set up once per weight (packing included)."""
    import torch

    out: dict[str, Callable[[Any], Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    zero = torch.zeros(q.shape[0], dtype=torch.long)
    qw = torch.quantize_per_channel(q.float() * s[:, None], s.double(), zero, 0, torch.qint8)
    for engine in ("x86", "fbgemm", "onednn"):
        torch.backends.quantized.engine = engine
        mod = DynamicLinear(q.shape[1], q.shape[0], dtype=torch.qint8)
        mod.set_weight_bias(qw, b)
        packed = mod._packed_params._packed_params
        if engine == "x86":
            out["DynamicLinear module (x86)"] = mod
            out["quantized.linear_dynamic op (x86, reduce_range)"] = lambda x, p=packed: (
                torch.ops.quantized.linear_dynamic(x, p, reduce_range=True)
            )
        out[f"quantized.linear_dynamic op ({engine})"] = lambda x, p=packed: torch.ops.quantized.linear_dynamic(x, p)
    torch.backends.quantized.engine = "x86"
    qt = q.contiguous()
    out["_weight_int8pack_mm fp32 x"] = lambda x: torch._weight_int8pack_mm(x, qt, s) + b
    out["_weight_int8pack_mm bf16 x"] = lambda x: (
        (torch._weight_int8pack_mm(x.bfloat16(), qt, s.bfloat16())).float() + b
    )
    qT = q.t().contiguous()

    def int_mm(x: Any) -> Any:  # symmetric per-row int8 activations, int32 accumulation, rescaled by hand
        sx = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        xq = torch.round(x / sx).to(torch.int8)
        return torch._int_mm(xq, qT).float() * (sx * s) + b

    out["_int_mm + own activation quant"] = int_mm
    wp = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)
    wzp = torch.zeros(q.shape[0], dtype=torch.int64)

    def onednn_q(x: Any) -> Any:  # asymmetric per-tensor uint8 activations (what inductor's x86 int8 path emits)
        lo, hi = torch.aminmax(x)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        sx = ((hi - lo) / 255.0).clamp(min=1e-12)
        zp = torch.round(-lo / sx).to(torch.int64)
        xq = torch.clamp(torch.round(x / sx) + zp, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise.tensor(
            xq, sx, zp, wp, s, wzp, b, 1.0, 0, torch.float32, "none", [], ""
        )

    out["onednn.qlinear_pointwise (uint8 x)"] = onednn_q
    from owngpt.native_kernels import native_gemv

    native = native_gemv()
    if native is not None and native.int8_level > 0:  # owngpt's own int8 kernel (one row at a time; blocks of 32)
        out[f"owngpt native int8 ({native.isa_int8})"] = native.kernel_int8(
            native.pack_int8(q), s, q.shape[0], q.shape[1], b, ("none", "")
        )
    q64 = q.contiguous().view(torch.int64)  # not a kernel: one read of the int8 weight, the bandwidth ceiling
    out["(read the int8 weight once: the ceiling)"] = lambda x: q64.sum().float().expand(x.shape[0], q.shape[0])
    w32 = (q.float() * s[:, None]).contiguous()
    pw = torch.ops.mkldnn._reorder_linear_weight(w32, None)
    out["fp32 oneDNN packed (reference)"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, pw, b, "none", [], "")
    return out


def decode_ab(threads: int, batch: int, new_tokens: int, repeats: int) -> None:
    """int8 decode three ways, interleaved (see the module doc): tokens/s and the ratio to llama.cpp q8_0."""
    import tempfile

    import bench_decode
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from owngpt.generation import SamplingParams, generate_batch
    from owngpt.quantize import quantize_model
    from owngpt.tokenizer import gpt2_tokenizer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config()).eval()
    tok = gpt2_tokenizer()
    with torch.no_grad():
        model = quantize_model(ref)
    t, B, H, D, C, P, N = model.transformer, batch, 12, 64, 768, 32, new_tokens
    gelu = ("gelu", "tanh")  # GPT-2's gelu_new, applied to the c_fc product
    layers = [
        (
            b.ln_1,
            b.attn.c_attn.kernel(),
            b.attn.c_proj.kernel(),
            b.ln_2,
            b.mlp.c_fc.kernel(True, gelu),
            b.mlp.c_proj.kernel(),
        )
        for b in t.h
    ]
    head = model.lm_head.kernel()

    def ln(x: Any, m: Any) -> Any:
        return F.layer_norm(x, (C,), m.weight, m.bias, m.eps)

    def step(ids: Any, keys: list[Any], values: list[Any], n: int) -> Any:  # one token per row at position n
        h = t.wte(ids) + t.wpe.weight[n]  # (B, C)
        for i, (ln1, c_attn, c_proj, ln2, c_fc, m_proj) in enumerate(layers):
            qkv = c_attn(ln(h, ln1)).view(B, 3, H, 1, D)
            keys[i][:, :, n : n + 1], values[i][:, :, n : n + 1] = qkv[:, 1], qkv[:, 2]
            o = F.scaled_dot_product_attention(qkv[:, 0], keys[i][:, :, : n + 1], values[i][:, :, : n + 1])
            h = h + c_proj(o.view(B, C))
            h = h + m_proj(c_fc(ln(h, ln2)))
        return head(ln(h, t.ln_f))

    prompts = torch.randint(0, 50257, (B, P), generator=torch.Generator().manual_seed(1))

    def hand() -> list[list[int]]:
        keys = [torch.zeros(B, H, P + N, D) for _ in t.h]
        values = [torch.zeros(B, H, P + N, D) for _ in t.h]
        with torch.no_grad():
            out = model(prompts, use_cache=True)  # the prompt through the model, its cache copied into the buffers
            for i, layer in enumerate(out.past_key_values.layers):
                keys[i][:, :, :P], values[i][:, :, :P] = layer.keys, layer.values
            nxt = out.logits[:, -1].argmax(-1)
            got = [nxt]
            for s in range(N - 1):
                nxt = step(nxt, keys, values, P + s).argmax(-1)
                got.append(nxt)
        return torch.stack(got, 1).tolist()

    params = SamplingParams(max_new_tokens=N, temperature=0)

    def engine() -> list[list[int]]:
        return [r.token_ids for r in generate_batch(model, tok, prompts.tolist(), params, eos_token_ids=[])]

    fns = {"owngpt int8, engine": engine, "owngpt int8, hand-written step": hand}
    with tempfile.TemporaryDirectory() as work:
        files = bench_decode.gguf_files(ref, tok, Path(work), threads)
        llama = bench_decode.LlamaCpp(files["q8_0"], threads, B, P + N + 16)
        fns["llama.cpp q8_0"] = lambda: llama.generate(prompts.tolist(), N)
        assert hand() == engine(), "the hand-written step's tokens differ from the engine's"
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(repeats):
            for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        llama.close()
    tps = {k: B * N / statistics.median(v) for k, v in times.items()}
    for k, v in tps.items():
        print(f"threads {threads} batch {B}: {k:32s} {v:7.1f} tokens/s  {v / tps['llama.cpp q8_0']:.2f}x of llama.cpp")


def ppl_ab(ckpt: str, data: str, block_size: int, max_tokens: int) -> None:
    """Perplexity of a trained checkpoint on DATA's validation split: fp32, int8 through fbgemm (the module's forward,
    what `owngpt eval` measures) and int8 with every row of every projection through owngpt's one-row int8 kernel (what
    batch-1 decoding computes): the issue's bound is int8 within +2% of fp32."""
    import torch

    from owngpt.measure import eval_tokens, load_fp32, perplexity
    from owngpt.quantize import _int8_linear_class, quantize_model

    model, tok, _, _ = load_fp32(Path(ckpt))
    tokens, _ = eval_tokens(tok, data, None, max_tokens, Path(ckpt))
    int8 = quantize_model(model).eval()
    got = {"fp32": perplexity(model, tokens, block_size), "int8 fbgemm": perplexity(int8, tokens, block_size)}
    cls = _int8_linear_class()
    forward = cls.forward

    def row_by_row(self: Any, x: Any) -> Any:
        k, flat = self.kernel(True), x.reshape(-1, self.in_features)
        return torch.cat([k(flat[i : i + 1]) for i in range(len(flat))]).view(*x.shape[:-1], self.out_features)

    cls.forward = row_by_row
    try:
        got["int8 owngpt kernel (row by row)"] = perplexity(int8, tokens, block_size)
    finally:
        cls.forward = forward
    for k, v in got.items():
        print(f"perplexity {k:34s} {v:8.4f}  {100 * (v / got['fp32'] - 1):+.3f}% vs fp32")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", nargs="*", help="substrings of kernel names to keep")
    ap.add_argument("--decode", action="store_true", help="time whole int8 decodes instead (see above)")
    ap.add_argument("--new-tokens", type=int, default=48, help="with --decode: tokens generated per row")
    ap.add_argument("--ppl", nargs=2, metavar=("CKPT", "DATA_DIR"), help="perplexity instead (see ppl_ab)")
    ap.add_argument("--block-size", type=int, default=64, help="with --ppl: the window the model was trained with")
    ap.add_argument("--eval-tokens", type=int, default=20000, help="with --ppl: validation tokens")
    args = ap.parse_args()
    if args.ppl:
        ppl_ab(*args.ppl, args.block_size, args.eval_tokens)
        return 0
    if args.decode:
        for b in args.batch_sizes:
            decode_ab(args.threads, b, args.new_tokens, args.repeats)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = []
    for o, i in SHAPES:
        w = torch.randn(o, i) * 0.02
        sc = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / sc[:, None]).clamp(-127, 127).to(torch.int8)
        layers.append((q, sc, torch.randn(o) * 0.01))
    per_layer = [kernels(*t) for t in layers]
    names = [n for n in per_layer[0] if not args.only or any(k in n for k in args.only)]
    for bsz in args.batch_sizes:
        xs = [torch.randn(bsz, i) for _, i in SHAPES]
        errs: dict[str, float] = {}
        with torch.no_grad():
            for n in names:
                worst = 0.0
                for (q, sc, b), k, x in zip(layers, per_layer, xs, strict=True):
                    want = x.double() @ (q.double() * sc.double()[:, None]).t() + b.double()
                    got = k[n](x)
                    assert got.shape == want.shape and got.dtype == torch.float32, (n, got.shape, got.dtype)
                    worst = max(worst, float((got.double() - want).abs().max() / want.abs().max()))
                errs[n] = worst
            times: dict[str, list[float]] = {n: [] for n in names}
            head: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.repeats):
                for n in names if r % 2 == 0 else names[::-1]:
                    t0 = time.perf_counter()
                    for k, x in zip(per_layer[:-1], xs[:-1], strict=True):
                        k[n](x)
                    t1 = time.perf_counter()
                    per_layer[-1][n](xs[-1])
                    t2 = time.perf_counter()
                    times[n].append(t2 - t0)
                    head[n].append(t2 - t1)
        base = statistics.median(times[names[0]])
        print(f"threads {args.threads}, batch {bsz}: one step's 49 projections (ms), median of {args.repeats}")
        for n in names:
            med = statistics.median(times[n])
            print(
                f"  {n:40s} {1e3 * med:7.2f} ms (fastest {1e3 * min(times[n]):6.2f}, LM head "
                f"{1e3 * statistics.median(head[n]):5.2f})  "
                f"{base / med:5.2f}x of first  rel.err " + ("n/a" if n.startswith("(") else f"{errs[n]:.1e}"),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
