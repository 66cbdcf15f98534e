"""torch.optim.Muon with the precision of its Newton-Schulz iteration chosen per device.

torch's Muon (like Keller Jordan's reference) orthogonalises each momentum matrix in bf16, hard-coded
(`torch.optim._muon._zeropower_via_newtonschulz` casts to bfloat16). That is right on a GPU, where bf16 matmuls run
on tensor cores at twice the fp32 rate or more. On a CPU it is wrong twice over:

- speed: most laptop and server CPUs have no native bf16 matmul (no AVX512_BF16 / AMX), and there torch's bf16
  matmul is 20-44x slower than fp32 at owngpt's preset shapes (bench/bench_muon.py on an AVX2 AMD EPYC, one thread:
  a Muon step over llama-tiny's 28 block matrices 769 ms in bf16 vs 41 ms in fp32), which made Muon from scratch on
  such a CPU spend most of each step in Newton-Schulz. Where the CPU has native bf16 (an AVX-512 machine measured earlier) fp32
  costs 2x the iteration's time, about 9% of a llama-tiny step.
- exactness: bf16's 8-bit mantissa turns float-level noise in the gradient (the order in which DDP's all-reduce
  sums the processes' gradients) into visible weight differences: 2 processes vs 1 differed by 1.3e-3 after 20 steps
  with bf16, 2.5e-7 with fp32 (AdamW 2.1e-7), so "two processes train what one does" holds with Muon too.

So owngpt runs the iteration in fp32 on the CPU and in bf16 elsewhere (`ns_dtype_for`). The state (one momentum
buffer per matrix) and the param groups are torch's, so checkpoints resume across the two; with bf16 the step is
torch's own. The fp32 step repeats torch's `_single_tensor_muon` (momentum, Nesterov, decoupled weight decay, the
lr scaled by sqrt(max(1, rows/cols))) because torch offers no hook for the iteration's dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any


def ns_dtype_for(device_type: str) -> Any:
    """The Newton-Schulz precision for a run on `device_type`: fp32 on the CPU, bf16 on accelerators."""
    import torch

    return torch.float32 if device_type == "cpu" else torch.bfloat16


def newton_schulz(g: Any, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: Any) -> Any:
    """The quintic Newton-Schulz iteration of torch's Muon (an approximate U V^T of g = U S V^T), in `dtype`."""
    import torch

    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(0) > g.size(1):  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


def Muon(params: Any, *, ns_dtype: Any = None, **kwargs: Any) -> Any:  # noqa: N802 (reads as the class it builds)
    """torch.optim.Muon whose Newton-Schulz iteration runs in `ns_dtype` (default bf16: torch's own step)."""
    return muon_class()(params, ns_dtype=ns_dtype, **kwargs)


@functools.cache  # one class, so that isinstance works; built on first use so that importing owngpt needs no torch
def muon_class() -> Any:
    import torch

    class OwnMuon(torch.optim.Muon):
        """torch.optim.Muon whose Newton-Schulz iteration runs in `ns_dtype` (torch's own step when it is bf16)."""

        def __init__(self, params: Any, *, ns_dtype: Any = None, **kwargs: Any) -> None:
            super().__init__(params, **kwargs)
            self.ns_dtype = torch.bfloat16 if ns_dtype is None else ns_dtype

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            if self.ns_dtype == torch.bfloat16:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                params: list[Any] = []
                grads: list[Any] = []
                bufs: list[Any] = []
                self._init_group(group, params, grads, bufs)  # torch's: skips params without grad, makes buffers
                if group["adjust_lr_fn"] not in (None, "original"):
                    raise ValueError(
                        f"owngpt's fp32 Muon step supports adjust_lr_fn='original' only, not {group['adjust_lr_fn']!r}"
                    )
                lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
                for p, grad, buf in zip(params, grads, bufs, strict=True):
                    buf.lerp_(grad, 1 - momentum)
                    update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                    update = newton_schulz(
                        update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                    )
                    rows, cols = p.shape[:2]
                    p.mul_(1 - lr * decay)
                    p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1, rows / cols)))
            return loss

    return OwnMuon
