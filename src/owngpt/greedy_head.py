"""The LM head of a greedy (or top-k) decode step read at half the bytes, with the fp32 head's choice exactly.

What it is for: at batch 1 a decode step is bound by how fast it streams the weights, and the LM head is a large
part of them (GPT-2's 50257 x 768 fp32 head: 154 MB of the 494 MB a `gpt2`-size step reads). A greedy row reads only
the argmax of its logits, a top-k sampled row only its k largest (temperature, top-k and top-p never look below
them), and most of the vocabulary is nowhere near them. So the step reads an fp16 copy of the head instead (half
the bytes, fp32 accumulation: owngpt.native_kernels' `gemv_f16`), bounds how far each approximate logit can be from
the fp32 kernel's, and recomputes in fp32 only the tokens whose upper bound reaches the k-th largest lower bound (by
the fp32 kernel's own arithmetic, so bitwise its values: `owngpt_greedy_head` in native_gemv.cpp). Every other
token's fp32 logit is provably below k tokens' logits, so it is not among the k largest (ties included): the argmax
(ties to the lowest index, as `torch.argmax`) and the top-k filter's survivors, with their values, are those of the
full fp32 head, and so is a seeded sample drawn from them. On random `gpt2` weights 1-3 candidates a greedy step.

The bound, per output j, for x one row (in = n values) and the head's rows w_j (fp32) and h_j (fp16, round to
nearest): fp16 rounding |w - h| <= 2^-11 |w| + 2^-25 (the second term for subnormal halves; a weight that rounds to inf
turns the screen off), and each of the two
fp32 dot products (the fp32 kernel's and the fp16 copy's) is within gamma_m * sum|x_i||w_ij| of its exact value, where
gamma_m = m u / (1 - m u), u = 2^-24, m = n + 8 covers the kernel's per-lane chains plus its horizontal sum. With
sum|x_i||w_ij| <= ||x||_2 ||w_j||_2 (Cauchy-Schwarz):

    |fp32 logit_j - fp16 logit_j| <= (2^-11 + gamma_m (2 + 2^-11)) ||x||_2 ||w_j||_2 + 2^-25 (1 + gamma_m) ||x||_1

taken 1% larger, which also covers the rounding of the bound's own arithmetic and of the comparisons (a bias adds
2^-20 (|logit| + |bias|) for its addition's rounding). Rows whose norms are not finite fall back to the full fp32
head, as do rows with more than an eighth of the vocabulary as candidates (a degenerate input, e.g. all zeros).

What it is not: for sampling without a top-k limit, penalties (they change logits anywhere in the vocabulary), or
any consumer of the whole logits vector (the engine's traces) the step keeps the full fp32 head:
`owngpt.engine.Decoder` asks for this head only when every row of the step reads at most its top k
(`RowSettings.logits_read`), with the batch's largest k. The logits returned are exact at the candidates and -inf
elsewhere.

Measured: bench/bench_decode.py ("owngpt fp32" against "owngpt fp32, full fp32 head", docs/benchmarks.md).
Turned off with OWNGPT_GREEDY_HEAD=0, or per module with `module.greedy_screen = False` before the first step.
"""

from __future__ import annotations

import os
from typing import Any

from owngpt import decode_kernels

ENV = "OWNGPT_GREEDY_HEAD"  # "0" turns the screen off
# above this share of the vocabulary as candidates, one full fp32 product is cheaper than the rows one by one
MAX_CANDIDATE_SHARE = 1 / 8


def enabled_by_user() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class GreedyHead:
    """x (B, in) fp32 -> logits (B, out): the fp32 head's values at each row's candidates for the argmax, -inf
    elsewhere (see the module doc). `full` is the fp32 head's own one-row kernel, used where the screen cannot."""

    def __init__(self, native: Any, packed: Any, out: int, in_: int, bias: Any, full: Any) -> None:
        import torch

        self.native, self.packed, self.full = native, packed, full
        self.out_features, self.in_features = out, in_
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.packed16 = native.pack_f16(packed)  # the same blocked layout (owngpt.native_kernels.pack), in fp16
        u = 2.0**-24
        m = in_ + 8
        gamma = m * u / (1 - m * u)
        c1 = 1.01 * (2.0**-11 + gamma * (2 + 2.0**-11))
        self.c2 = 1.01 * 2.0**-25 * (1 + gamma)
        # the rows' norms in fp32 are within (1 + gamma) of the exact ones: taken that much larger, and rounded up
        norms = native.row_norms(packed, out, in_) * (c1 * (1 + 2 * gamma))
        self.scaled_norms = torch.nextafter(norms, torch.tensor(float("inf")))
        self.max_candidates = max(1, int(self.out_features * MAX_CANDIDATE_SHARE))

    def __call__(self, x: Any, k: int = 1) -> Any:
        """Logits (B, out) exact at every token that can be among each row's k largest, -inf elsewhere."""
        import torch

        x = x.contiguous()
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"greedy head: expected (rows, {self.in_features}) fp32, got {tuple(x.shape)} {x.dtype}")
        if not 1 <= k <= self.max_candidates // 2:  # the screen would keep too much of the vocabulary to pay
            return self.full(x)
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        scratch = torch.empty(self.out_features if k > 1 else 0, dtype=torch.float32)
        failed = self.native.lib.owngpt_greedy_head(
            x.data_ptr(),
            x.shape[0],
            self.packed16.data_ptr(),
            self.packed.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
            self.scaled_norms.data_ptr(),
            self.c2,
            y.data_ptr(),
            self.out_features,
            self.in_features,
            torch.get_num_threads(),
            self.native.level,
            k,
            scratch.data_ptr() if k > 1 else None,
            self.max_candidates,
        )
        return self.full(x) if failed else y


def greedy_head_for(module: Any) -> GreedyHead | None:
    """The screened head for a packed LM head (owngpt.decode_kernels.PackedLinear with owngpt's native kernel), built
    once and kept on the module; None where it does not pay or cannot run: a head that stays in the CPU's cache
    (it is not bound by memory there), no native kernel or no F16C, weights beyond fp16's range, or turned off."""
    import torch

    if not enabled_by_user() or not getattr(module, "greedy_screen", True):
        return None
    cached = getattr(module, "_greedy_head", None)
    if cached is not None:
        return cached
    native, packed = getattr(module, "native", None), getattr(module, "native_packed", None)
    # owngpt.decode_kernels' PackedLinear only: an int8 head (owngpt.quantize) has an int8 packed copy
    if type(module).__name__ != "PackedLinear" or native is None or packed is None or not native.has_f16c:
        return None
    out, in_ = module.out_features, module.in_features
    if out * in_ * 4 <= decode_kernels.cache_resident_bytes():
        return None
    head = GreedyHead(native, packed, out, in_, module.bias, module.kernel(True))
    # a weight beyond fp16's range (|w| >= 65520) rounds to inf there: the bound would not hold
    if bool(torch.isinf(head.packed16).any()):
        module.greedy_screen = False
        return None
    module._greedy_head = head
    return head
