"""Decode speed on the CPU: owngpt (fp32, int8) vs transformers `generate` vs llama.cpp (f32, q8_0), same weights, same run.

    python bench/bench_decode.py                  # gpt2 size (124M, random weights), batch 1 and 8, 64 new tokens
    python bench/bench_decode.py --quick --no-write   # a smoke test: 8 new tokens, one repeat

What runs (every contestant greedy, KV cache, exactly batch x new-tokens tokens, no early stop):
- owngpt fp32: `owngpt.generation.generate_batch` (the decode engine `owngpt.engine` that the CLI, the chat, the API
  and the server share) on the model as `load_for_generation` prepares it (weights packed for oneDNN,
  owngpt.decode_kernels; each cached step through the hand-written owngpt.decode_step, each block one call into
  owngpt's native_block.cpp where the native kernel serves the batch);
- owngpt fp32, full fp32 head: the same with owngpt.greedy_head's screen off (the LM head read whole in fp32 at every
  step, as every other contestant reads it);
- owngpt fp32, torch kernels only: the same, without owngpt's own one-row kernel (owngpt.native_kernels; what a
  machine without a C++ compiler or OWNGPT_NATIVE_KERNELS=0 gets: oneDNN at every batch size);
- owngpt fp32, reference kernels: the same engine on the unpacked model (transformers' forward, MKL's kernels);
- owngpt int8: the engine on the int8 export of the same weights (owngpt.quantize: int8 weights, dynamic activations);
- transformers `generate` on the unpacked fp32 model;
- llama.cpp through llama-cpp-python's low-level API (one `llama_batch` holding every row, one sequence id per row),
  on `owngpt export --to gguf` f32 of the same weights and on that file quantized to q8_0 by llama.cpp itself
  (`llama_model_quantize`); skipped with a note when llama-cpp-python is not installed.
All run on each of `--threads` thread counts in turn (torch intra-op threads and llama.cpp's n_threads alike),
alternately (A B C ... then reversed), and each row of the table is the median of `--repeats` runs. The memory-bandwidth limit is measured in the
same run, between the repeats: a large tensor copy (bytes read + written per second); a decode step reads every
weight once (the LM head included), so tokens/s cannot exceed batch x bandwidth / weight bytes; the table says how
close each contestant gets. Writes its section of docs/benchmarks.md (not with --no-write or --quick).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
NAME = "decode"
VOCAB = 50257

import _doc  # noqa: E402  (bench/ is on sys.path when a script runs)


# --------------------------------------------------------------------------------------------------- llama.cpp
class LlamaCpp:
    """Greedy batched decode with llama.cpp's C API (llama-cpp-python's ctypes bindings, no sampling chain).

    Hand-written because llama-cpp-python's high-level `Llama` decodes one sequence at a time: batch 8 needs one
    `llama_batch` carrying the 8 rows' tokens with a sequence id each, which is what llama.cpp's own batched example
    does. The argmax over each row's logits is numpy's (the same work owngpt's greedy step does)."""

    def __init__(self, path: Path, threads: int, n_seq: int, n_ctx_per_seq: int) -> None:
        import llama_cpp.llama_cpp as L

        self.L = L
        L.llama_backend_init()
        _silence(L)
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_seq * n_ctx_per_seq
        cp.n_batch = cp.n_ubatch = max(512, n_seq * n_ctx_per_seq)
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cp.n_batch, 0, n_seq)

    def set_threads(self, n: int) -> None:
        self.L.llama_set_n_threads(self.ctx, n, n)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence id, wants logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        import numpy as np

        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], n_new: int) -> list[list[int]]:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        items = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        self._decode(items)
        last = [i for i, it in enumerate(items) if it[3]]
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(n_new):
            nxt = [self._argmax(i) for i in last]
            for s, t in enumerate(nxt):
                out[s].append(t)
            if step == n_new - 1:
                break
            self._decode([(t, len(prompts[s]) + step, s, True) for s, t in enumerate(nxt)])
            last = list(range(len(prompts)))
        return out

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


_NO_LOG: Any = None


def _silence(L: Any) -> None:
    """llama.cpp logs every load and quantized tensor to stderr: a no-op callback (kept alive here) instead."""
    global _NO_LOG
    if _NO_LOG is None:
        _NO_LOG = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(_NO_LOG, ctypes.c_void_p(0))


def gguf_files(model: Any, tok: Any, work: Path, threads: int) -> dict[str, Path]:
    """f32 GGUF of `model` through owngpt's own exporter, and q8_0 of it through llama.cpp's quantizer."""
    import llama_cpp.llama_cpp as L

    from owngpt.export.gguf import export_gguf

    f32 = Path(export_gguf(model, tok, work / "f32", dtype="f32"))
    f32 = f32 if f32.suffix == ".gguf" else f32 / "model.gguf"
    q8 = work / "model-q8_0.gguf"
    _silence(L)
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = threads
    rc = L.llama_model_quantize(str(f32).encode(), str(q8).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {"f32": f32, "q8_0": q8}


# --------------------------------------------------------------------------------------------------- bandwidth
def copy_bandwidth(mib: int = 512) -> Callable[[], float]:
    """A callable returning GB/s of a `mib` MiB copy (bytes read + bytes written), far larger than any cache."""
    import torch

    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy also maps dst's pages: not a bandwidth

    def run() -> float:
        t = time.perf_counter()
        dst.copy_(src)
        return 2 * src.numel() * 4 / (time.perf_counter() - t) / 1e9

    return run


def decode_weight_bytes(model: Any, bytes_per_weight: float) -> float:
    """Bytes of weights one decode step reads: every 2-D weight except the position table and the token embedding
    (a step reads one row of each), with a tied embedding read once, as the LM head."""
    seen: set[int] = set()
    n = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or id(p) in seen or name.endswith(("wpe.weight",)):
            continue
        seen.add(id(p))
        n += p.numel()
    return n * bytes_per_weight


# --------------------------------------------------------------------------------------------------- main
def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# the 1-minute load before the benchmark starts its own threads: what says whether other work shared the CPU (the
# load at the end includes the benchmark's threads, up to the thread count)
_LOAD_BEFORE = [float("nan")]


def main() -> int:
    _LOAD_BEFORE[0] = _load_average()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="rows decoded together")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (random token ids)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per contestant (the median is reported)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="torch and llama.cpp thread counts to run")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp even when llama-cpp-python is installed")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 new tokens, 1 repeat, nothing written")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.no_write = 8, 1, True
    from owngpt.decode_kernels import prefer_huge_pages

    prefer_huge_pages()  # as owngpt's decode commands do, before torch's first allocation (every torch contestant)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from owngpt.decode_kernels import pack_for_decode
    from owngpt.generation import SamplingParams, generate_batch
    from owngpt.native_kernels import ENV as NATIVE_ENV
    from owngpt.quantize import quantize_model
    from owngpt.tokenizer import gpt2_tokenizer

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config()).eval()  # the `gpt2` preset size: 12 layers, 768 dims, vocab 50257
    ref.generation_config.eos_token_id = None  # never stop early: every contestant generates exactly new_tokens
    ref.generation_config.pad_token_id = 50256
    tok = gpt2_tokenizer()
    n_params = sum(p.numel() for p in ref.parameters())
    fp32_bytes = decode_weight_bytes(ref, 4)
    int8_bytes = decode_weight_bytes(ref, 1)  # + one fp32 scale per output channel: under 0.2%
    packed = copy.deepcopy(ref)
    pack_for_decode(packed)  # as load_for_generation prepares a model
    full_head = copy.deepcopy(ref)  # the same with the LM head read whole in fp32 at every step (no greedy screen)
    pack_for_decode(full_head)
    full_head.lm_head.greedy_screen = False
    torch_packed = copy.deepcopy(ref)  # the same without owngpt's native one-row kernel (OWNGPT_NATIVE_KERNELS=0)
    os.environ[NATIVE_ENV] = "0"
    try:
        pack_for_decode(torch_packed)
    finally:
        del os.environ[NATIVE_ENV]
    with torch.no_grad():
        int8 = quantize_model(ref)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)

    def engine(model: Any) -> Callable[[list[list[int]]], list[list[int]]]:
        return lambda p: [r.token_ids for r in generate_batch(model, tok, p, params, eos_token_ids=[])]

    def hf_generate(p: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(p)
        with torch.no_grad():
            out = ref.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False
            )
        return out[:, ids.shape[1] :].tolist()

    contestants: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {
        "owngpt fp32": engine(packed),
        "owngpt fp32, full fp32 head": engine(full_head),
        "owngpt fp32, torch kernels only": engine(torch_packed),
        "owngpt fp32, reference kernels": engine(ref),
        "owngpt int8": engine(int8),
        "transformers generate fp32": hf_generate,
    }
    llama_note = ""
    work = tempfile.TemporaryDirectory(prefix="bench_decode_")
    llamas: dict[int, dict[str, LlamaCpp]] = {}
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    if args.no_llamacpp or llama_version is None:
        llama_note = (
            "llama.cpp: not measured ("
            + ("--no-llamacpp" if args.no_llamacpp else "pip install llama-cpp-python")
            + ")."
        )
    else:
        files = gguf_files(ref, tok, Path(work.name), max(args.threads))
        for b in args.batch_sizes:
            per_seq = args.prompt_tokens + args.new_tokens + 16
            llamas[b] = {k: LlamaCpp(f, args.threads[0], b, per_seq) for k, f in files.items()}

    gen = torch.Generator().manual_seed(1)
    bandwidth = copy_bandwidth()
    bw_runs: dict[int, list[float]] = {}
    rows = []
    prompts = {b: torch.randint(0, VOCAB, (b, args.prompt_tokens), generator=gen).tolist() for b in args.batch_sizes}
    for th, b in [(th, b) for th in args.threads for b in args.batch_sizes]:
        torch.set_num_threads(th)
        for lc in llamas.get(b, {}).values():
            lc.set_threads(th)
        p = prompts[b]
        fns = dict(contestants)
        for k, lc in llamas.get(b, {}).items():
            fns[f"llama.cpp {k}"] = lambda p, lc=lc: lc.generate(p, args.new_tokens)
        outs = {k: f(p) for k, f in fns.items()}  # warm-up, and the token checks
        want = outs["transformers generate fp32"]
        assert outs["owngpt fp32"] == want, "owngpt's packed fp32 greedy tokens differ from transformers'"
        assert outs["owngpt fp32, reference kernels"] == want, "owngpt's greedy tokens differ from transformers'"
        assert outs["owngpt fp32, full fp32 head"] == want, "owngpt's full-head greedy tokens differ from transformers'"
        assert outs["owngpt fp32, torch kernels only"] == want, (
            "owngpt's oneDNN greedy tokens differ from transformers'"
        )
        agree = {k: _agreement(o, want) for k, o in outs.items()}
        times: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        for r in range(args.repeats):
            for k in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fns[k](p)
                times[k].append(time.perf_counter() - t0)
            bw_runs.setdefault(th, []).append(bandwidth())
        n = b * args.new_tokens
        for k, v in times.items():
            rows.append((th, b, k, n / statistics.median(v), agree[k], v))
            print(
                f"threads {th} batch {b} {k:32s} {rows[-1][3]:7.1f} tokens/s  tokens equal to transformers' {agree[k]:.0%}  "
                f"(s: {' '.join(f'{t:.2f}' for t in v)})",
                flush=True,
            )
    for d in llamas.values():
        for lc in d.values():
            lc.close()
    work.cleanup()
    bw = {th: statistics.median(v) for th, v in bw_runs.items()}
    for th, v in bw_runs.items():
        print(f"threads {th}: copy bandwidth {bw[th]:.1f} GB/s (runs: {' '.join(f'{x:.1f}' for x in v)})")
    print(f"weights read per step: fp32 {fp32_bytes / 1e6:.0f} MB, int8 {int8_bytes / 1e6:.0f} MB")
    if not args.no_write:
        head_bytes = ref.lm_head.weight.numel() * 4
        write_section(render(args, rows, n_params, bw, fp32_bytes, int8_bytes, llama_version, llama_note, head_bytes))
        print(f"updated {DOC.relative_to(ROOT)}")
    return 0


def _agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Share of rows' tokens equal to the reference's up to the first difference (greedy decoding diverges after)."""
    same = 0
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            if a != b:
                break
            same += 1
    return same / max(1, sum(len(w) for w in want))


def _bound(name: str, b: int, bw: float, fp32_bytes: float, int8_bytes: float) -> float:
    """Tokens/s the memory bandwidth allows for this contestant's weight bytes: batch x bandwidth / bytes per step."""
    nbytes = int8_bytes if ("int8" in name or "q8_0" in name) else fp32_bytes
    return b * bw * 1e9 / nbytes


def render(
    args: argparse.Namespace,
    rows: list[tuple[int, int, str, float, float, list[float]]],
    n_params: int,
    bw: dict[int, float],
    fp32_bytes: float,
    int8_bytes: float,
    llama_version: str | None,
    llama_note: str,
    head_bytes: float = 0.0,
) -> str:
    import torch
    import transformers

    load, before = _load_average(), _LOAD_BEFORE[0]
    cmd = "python bench/bench_decode.py"
    if args.repeats != 3 or args.new_tokens != 64 or args.batch_sizes != [1, 8] or args.prompt_tokens != 32:
        cmd += (
            f" --batch-sizes {' '.join(map(str, args.batch_sizes))} --new-tokens {args.new_tokens} "
            f"--prompt-tokens {args.prompt_tokens} --repeats {args.repeats}"
        )
    if args.threads != [2]:
        cmd += f" --threads {' '.join(map(str, args.threads))}"
    lines = [
        "## Decode speed: owngpt fp32 / int8 vs transformers `generate` vs llama.cpp f32 / q8_0",
        "",
        f"GPT-2 124M architecture (`GPT2LMHeadModel(GPT2Config())`, {n_params / 1e6:.0f}M parameters, random weights), "
        f"greedy, KV cache, {args.prompt_tokens}-token prompts (random ids), {args.new_tokens} new tokens per row, no "
        f"early stop, the same thread count for everyone; median of {args.repeats} alternating runs each. owngpt is "
        "`owngpt.generation.generate_batch`, the decode engine `owngpt.engine` behind `owngpt generate`, `chat`, the "
        "API and the server, on the model as `load_for_generation` prepares it (fp32 projections packed once for "
        "oneDNN, owngpt.decode_kernels, one-row products (and, on an AVX2 CPU, batches of up to 16 rows) through "
        "owngpt's own kernel, owngpt.native_kernels, each cached step through owngpt.decode_step, whose blocks are "
        "one native call each, `src/owngpt/native_block.cpp`, where the native kernel serves the batch, and the LM "
        "head of greedy steps read from an fp16 copy with only the tokens that can be the argmax recomputed in fp32, "
        "owngpt.greedy_head: the same tokens, "
        f"{(fp32_bytes - head_bytes / 2) / 1e6:.0f} of the {fp32_bytes / 1e6:.0f} MB per step); *full fp32 head* is "
        "that with the screen off (`OWNGPT_GREEDY_HEAD=0`: the head read whole in fp32, as every other contestant "
        "does); *torch "
        "kernels only* is that without owngpt's native library (`OWNGPT_NATIVE_KERNELS=0`: oneDNN for every "
        "product, the blocks in Python); *reference kernels* is the same "
        "engine on the unpacked model (transformers' forward); int8 is "
        "`owngpt export --to int8` of the same weights. llama.cpp runs `owngpt export --to gguf` f32 of the same "
        "weights and llama.cpp's own q8_0 quantization of that file, batched through its C API (one `llama_batch`, "
        "a sequence id per row). *Bound* is the tokens/s the memory bandwidth allows: batch x copy bandwidth "
        f"({', '.join(f'{v:.1f} GB/s on {th} thread(s)' for th, v in bw.items())}; bytes read + written, a 512 MiB "
        "tensor copy with torch on that many threads, measured between the repeats) / weight bytes "
        f"read per step ({fp32_bytes / 1e6:.0f} MB fp32, {int8_bytes / 1e6:.0f} MB int8 / q8_0, KV cache not "
        "counted); a kernel that only reads can beat a copy's rate, and owngpt fp32's screened head reads fewer bytes, "
        "so above 100% is possible. *Same tokens* is the "
        "share of greedy tokens equal to transformers' fp32 ones before the first difference (owngpt fp32 must be "
        "100%, with and without the screen: the benchmark stops otherwise; int8 and q8_0 round the weights, so their greedy paths may part, and "
        "early: random weights give nearly flat logits, where a small rounding changes the argmax).",
        "",
        "| threads | batch | contestant | tokens/s | vs transformers | vs llama.cpp same precision | % of bound "
        "| same tokens |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    by = {(th, b, k): tps for th, b, k, tps, _a, _t in rows}
    for th, b, k, tps, agree, _t in rows:
        hf = by.get((th, b, "transformers generate fp32"))
        ll = by.get((th, b, "llama.cpp q8_0" if "int8" in k or "q8_0" in k else "llama.cpp f32"))
        vs_ll = f"{tps / ll:.2f}x" if ll and not k.startswith("llama.cpp") else ""
        bound = _bound(k, b, bw[th], fp32_bytes, int8_bytes)
        lines.append(
            f"| {th} | {b} | {k} | {tps:.1f} | {tps / hf:.2f}x | {vs_ll} | {100 * tps / bound:.0f}% | {100 * agree:.0f}% |"
        )
    lines += [
        "",
        (llama_note + " " if llama_note else "")
        + f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {_doc.cpu_model()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}"
        + (f", llama-cpp-python {llama_version}" if llama_version else "")
        + f", Python {platform.python_version()}. Load average before the run {before:.1f}, at the end {load:.1f}"
        + (
            " (other work shared the CPU: absolute numbers are low and two-thread runs suffer most; compare ratios "
            "within the run, and rerun on a quiet machine for absolute numbers)."
            if before > 1.0 or load > max(args.threads) + 1.0  # other work came during the run
            else " (a quiet machine; the load at the end is the benchmark's own threads)."
            if before <= 1.0
            else "."  # not measured (no getloadavg, or render called without main)
        ),
        "",
        f"Reproduce: `{cmd}`",
    ]
    return "\n".join(lines)


def write_section(body: str) -> None:
    _doc.write_section(NAME, body)


if __name__ == "__main__":
    sys.exit(main())
