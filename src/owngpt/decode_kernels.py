"""Weights laid out once for the CPU kernels that read them while decoding (`owngpt generate`, `chat`, `serve`, the API).

Decoding one token reads every weight once and does little arithmetic with it, so its speed is how fast the matrix
kernel streams the weights. transformers calls torch's default kernel (MKL's sgemm/sgemv) on the weight as stored:
GPT-2's `Conv1D` as [in, out], `nn.Linear` (every LLaMA projection, every LM head) as [out, in]. Measured on the
2-core AVX-512 CPU we target (one thread, all 49 gpt2-size projections, bench/bench_decode.py has the end-to-end
numbers): MKL reads the [out, in] layout about 1.4x slower than [in, out] at one row, and at 8 rows (batch 8) it
runs 2.4x slower than oneDNN's inner product on a weight reordered once into oneDNN's blocked layout, which is as
fast at 8 rows as at one (the weights are read once either way). So `pack_for_decode` swaps each fp32 projection for
`PackedLinear`: the weight reordered once (torch's `mkldnn._reorder_linear_weight`, what torch.compile's CPU backend
does to frozen weights), multiplied by `mkldnn._linear_pointwise` with fp32 accumulation. The arithmetic is the same
as the reference path's up to the order of the sums (logits equal to ~1e-6; tests/test_decode_kernels.py checks
greedy tokens against the unpacked model).

Which kernel at one row (bench/bench_decode_step.py; same run, medians, shared machine): a model whose projections
fit in half the L3 cache (here 16 MiB: the `tiny` and `mini` presets; the LM head counted apart, see
pack_for_decode) is bound by per-call overhead, not memory,
and there MKL's sgemm on [in, out] (2-10 us a call) beats oneDNN's inner product (12-20 us): `tiny` with a char
vocabulary 0.10 vs 0.30 ms for all its products, `mini` 0.30 vs 0.54; such models keep an [in, out] copy as well
(a few MB) and `PackedLinear.kernel` picks it for one row. Bigger ones stream from memory, where oneDNN's layout
wins (`small` 1.81 vs 2.42 ms; `gpt2`, quiet machine, huge pages: 13.9 vs 21.1 ms on one thread, 11.1 vs 20.8 on
two: MKL's one-row product does not use the second thread), and batches keep oneDNN (`mini`, 8 rows: 0.72 vs 0.95).
Other kernels measured at gpt2 size and dropped: MKL's packed sgemm (`mkl._mkl_linear`, 20.8 ms), F.linear on
[out, in] (27.7 ms), numpy's BLAS (slower still), oneDNN reordered for a batch-size hint of 1 (slower than no hint).

The ceiling this sets: llama.cpp's whole f32 step on the same weights (its C API, same run) took 13.2 ms on one
thread and 10.6 ms on two, so oneDNN's 49 products alone, with nothing around them, run at 0.95x llama.cpp's step
on either thread count. No decode step built on torch's kernels reaches llama.cpp's batch-1 rate here; owngpt's
(owngpt.decode_step) is within 5% of the products alone. At 8 rows the products cost about what one row does and
owngpt is ahead (bench/bench_decode.py). Hence owngpt's own one-row kernel (owngpt.native_kernels, native_gemv.cpp):
where it builds, `PackedLinear` keeps its blocked copy of the weight too and `kernel(one_row=True)` calls it (for
every layer: it also beat MKL on cache-resident models, `mini` 0.28 vs 0.39 ms for all products, `tiny` with GPT-2's
vocabulary 0.92 vs 1.05, a char `tiny` a tie at 0.12, so the [in, out] copy is kept only where the native kernel is
not available). Measured on a shared machine (gpt2 size, the 49 products; medians of the ratio of two runs timed
next to each other, which see the same load): 1.05x oneDNN's speed on one thread and 1.10x on two, the whole step
1.14x and 1.06x (docs/benchmarks.md, decode-step). At 8 rows the native kernel ran 0.74-0.86x oneDNN's on that
AVX-512 CPU, so batches keep oneDNN there; on the AVX2 CPU (AMD EPYC) it ran 1.24x (one thread) and 1.33x (two) at
8 rows, so there a decode step's batch of up to 16 rows goes to it too (owngpt.native_kernels.BATCH_ROWS; the whole
batch-8 step 1.20x, one thread). Prompts keep oneDNN everywhere. The cost is that second copy of the weights (+0.5 GB at gpt2 size).

The tied LM head (GPT-2, owngpt's LLaMA presets) is packed as a second copy of the embedding (+154 MB at gpt2 size):
reading the embedding as stored ([V, C], MKL) costs 9.0 ms a step vs 3.9 ms packed (gpt2 size, one thread, out of
~14.6 ms for the whole step), and a [C, V] copy the embedding could be read from (as a strided view) 5.4 ms: the
copy pays.

Weights on 2 MiB pages (`prefer_huge_pages`, set by the decode commands): 1.09x more per step at gpt2 size.

Threads (gpt2 size, one row): on a quiet machine a second thread makes oneDNN's products 1.25x faster (13.9 ->
11.1 ms), as it does llama.cpp's step (13.2 -> 10.6 ms); MKL's one-row product does not use it (21.1 -> 20.8 ms).
When other work holds the cores, every two-thread step collapses (oneDNN's products 126 ms median vs 16 ms on one
thread; llama.cpp 149 vs 20 ms; the `small` preset 355 vs 2.8 ms): a step waits for its slowest thread. Hence the
rule already in owngpt.generation (small models decode on one thread) and `owngpt serve --threads`.

Written by hand because transformers has no such switch for eager CPU inference. Its CPU route to speed is
torch.compile with a static cache; measured here (gpt2 size, one thread, `generate(cache_implementation="static")` over
a forward compiled by inductor with freezing): 38 s before the first token, then 25 tokens/s, no faster than eager
(24), so the engine does not compile. Inductor's freezing does this very reorder internally, which is why these ops
are the ones chosen.

What is not touched: int8 models (their projections are owngpt.quantize's Int8Linear: fbgemm's dynamic int8 op, and
at one row owngpt's int8 kernel from owngpt.native_kernels),
non-fp32 weights, other devices, and architectures whose oracle test has not run here (only GPT-2 and LLaMA-style
models are packed: some transformers models read a projection's `.weight` directly, which a packed module no longer
has). The packed model is for inference only: no gradients flow through the reordered weights.
"""

from __future__ import annotations

from typing import Any

from owngpt.native_kernels import native_gemv

# model types whose forward only calls its projections (checked by tests/test_decode_kernels.py)
PACKABLE_MODEL_TYPES = frozenset({"gpt2", "llama"})


def _packing_available() -> bool:
    import torch

    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _packed_linear_class():
    import torch
    import torch.nn.functional as F

    lp = torch.ops.mkldnn._linear_pointwise
    # the post-ops a decode step fuses (oneDNN's names), and the same functions for MKL's path
    post_ops = {
        ("none", ""): lambda y: y,
        ("gelu", "tanh"): lambda y: F.gelu(y, approximate="tanh"),
        ("gelu", "none"): F.gelu,
        ("swish", ""): F.silu,
    }

    class PackedLinear(torch.nn.Module):
        """y = x @ W.T + b with W reordered once for oneDNN (inference only: no `.weight`, no gradients)."""

        def __init__(
            self, weight: Any, bias: Any, tied: bool = False, keep_rows_layout: bool = False, native: Any = None
        ) -> None:
            super().__init__()  # weight [out, in] (nn.Linear's layout)
            self.out_features, self.in_features = weight.shape
            # counted by parameter_count (the packed tensor is no parameter); a tied head's weight is still the
            # input embedding's parameter, counted there
            self.weight_numel = 0 if tied else weight.numel()
            # an opaque oneDNN tensor: kept as a plain attribute (not a parameter or buffer), so state_dict(),
            # .to() and parameter counts never see it
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), None)
            self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
            # owngpt's own one-row kernel (owngpt.native_kernels) on its own blocked copy of the weight; where it is
            # not available, [in, out] for MKL's sgemm, kept only for models that fit in the CPU's cache (see
            # pack_for_decode)
            self.native = native
            self.native_packed = native.pack(weight) if native is not None else None
            self.weight_io = weight.detach().float().t().contiguous() if keep_rows_layout and native is None else None

        def forward(self, x: Any) -> Any:  # (..., in) -> (..., out)
            return lp(x, self.packed, self.bias, "none", [], "")

        def kernel(self, one_row: bool, post: tuple[str, str] = ("none", "")) -> Any:
            """A callable (B, in) -> (B, out) computing post(x W^T + b) with the fastest kernel here: for one row
            owngpt's native kernel where it is available, else MKL's sgemm on [in, out] for a cache-resident model
            (no oneDNN call overhead); otherwise oneDNN on the packed weight with the post-op fused, except that a
            few rows go to the native kernel too on CPUs where it beats oneDNN there (`NativeGemv.batch_rows`)."""
            w, b = self.packed, self.bias
            attr, algorithm = post
            if self.native_packed is not None:
                native = self.native.kernel(self.native_packed, self.out_features, self.in_features, b, post)
                few = self.native.batch_rows
                if one_row:
                    return native
                if few > 1:
                    # the row count is known only per call (a batch shrinks as its rows finish)
                    return lambda x: native(x) if x.shape[0] <= few else lp(x, w, b, attr, [], algorithm)
            if one_row and self.weight_io is not None:
                w_io, act = self.weight_io, post_ops[post]
                if b is None:
                    return lambda x: act(torch.mm(x, w_io))
                return lambda x: act(torch.addmm(b, x, w_io))
            return lambda x: lp(x, w, b, attr, [], algorithm)

        def extra_repr(self) -> str:
            native = f" and owngpt's {self.native.isa} kernel" if self.native is not None else ""
            return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN{native}"

    return PackedLinear


def cache_resident_bytes() -> int:
    """Weight bytes below which a model's projections stay in the CPU's last-level cache between decode steps: half
    the L3 (the rest holds activations, the KV cache, other processes' data), 16 MiB when the size is not known."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()  # Linux: "32768K"
        unit = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        return int(text.rstrip("KM")) * unit // 2
    except (OSError, ValueError):
        return 16 * 2**20


def pack_for_decode(model: Any) -> int:
    """Swap every fp32 projection of a CPU model (GPT-2 `Conv1D`, `nn.Linear`, the LM head) for a `PackedLinear`, in
    place; returns how many were swapped (0 when the model, its device or this torch build does not qualify: the
    model is then left exactly as it was). Call it once after loading, before decoding; the model stays usable for
    any forward pass (beam search, scoring), not for training."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if getattr(model.config, "model_type", None) not in PACKABLE_MODEL_TYPES or not _packing_available():
        return 0
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" for p in params):
        return 0
    packed_cls = _packed_linear_class()
    embedding = model.get_input_embeddings()
    tied_weight = getattr(embedding, "weight", None)
    swaps = []
    for name, mod in model.named_modules():
        if isinstance(mod, Conv1D):
            weight = mod.weight.t()  # Conv1D stores [in, out]
        elif type(mod) is torch.nn.Linear:  # exactly nn.Linear: not int8 or LoRA subclasses
            weight = mod.weight
        else:
            continue
        if weight.dtype != torch.float32:
            continue
        swaps.append((name, weight, mod.bias))
    # Weights that stay in the cache between steps are bound by per-call overhead at one row, where MKL's sgemm
    # (~2-10 us a call here) beats oneDNN's (~12-20 us): without the native kernel (which beats both there) they keep
    # an [in, out] copy too (a few MB). The LM head is
    # counted apart: a large vocabulary's head streams from memory every step (oneDNN's), while the layers' small
    # projections still gain from MKL (`tiny` with GPT-2's vocabulary: 0.67 vs 0.81 ms for all products, `mini`
    # 1.32 vs 1.44; `small` 3.84 vs 3.52, so not there).
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    body = sum(w.numel() for n, w, _b in swaps if n != head_name) * 4
    whole = sum(w.numel() for _n, w, _b in swaps) * 4
    resident = cache_resident_bytes()
    # owngpt's own one-row kernel (built on first use; None where torch's kernels are used, owngpt.native_kernels)
    native = native_gemv() if swaps else None
    with torch.no_grad():
        for name, weight, bias in swaps:
            parent, _, child = name.rpartition(".")
            tied = weight is tied_weight
            small = (whole if name == head_name else body) <= resident
            module = packed_cls(weight, bias, tied, keep_rows_layout=small, native=native)
            module.train(model.training)  # a new module starts in training mode; the model's mode is the truth
            setattr(model.get_submodule(parent) if parent else model, child, module)
    return len(swaps)


def prefer_huge_pages() -> None:
    """Ask torch to back its large CPU tensors (the weights) with 2 MiB pages; call before torch's first allocation.

    A decode step streams every weight once, and on 4 KiB pages that is a TLB miss every 4 KiB. torch madvises its
    allocations of 2 MiB and more for transparent huge pages when THP_MEM_ALLOC_ENABLE=1 is set before its first
    allocation (it reads the variable once). Measured here (gpt2 size, one thread, the 49 packed weights alone,
    interleaved in one process): 14.39 ms a step on 4 KiB pages, 13.20 ms on huge pages (1.09x); in separate
    processes 1.09-1.13x (minima). Collapsing the pages after packing instead (madvise MADV_COLLAPSE) gave the same
    speed but cost ~2 s at load (the kernel copies 500 MB), so it is not done. Only a hint to the OS: where huge
    pages are off (THP `never`) or not free, the weights stay on small pages. The decode commands (generate, chat,
    serve) call it; API users may export the variable themselves. A value already set is kept."""
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def parameter_count(model: Any) -> int:
    """The model's parameter count, packed weights included (they are not torch parameters any more)."""
    n = sum(p.numel() for p in model.parameters())
    packed = ("PackedLinear", "Int8Linear")  # Int8Linear: owngpt.quantize's int8 projection, its weight packed too
    return n + sum(getattr(m, "weight_numel", 0) for m in model.modules() if type(m).__name__ in packed)
