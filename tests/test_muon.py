"""owngpt.muon: torch's Muon with the Newton-Schulz iteration in fp32 on the CPU (bf16, torch's own step, elsewhere)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

import fixtures
from owngpt.muon import Muon, muon_class, ns_dtype_for
from owngpt.optim import build_optimizer, describe

BF16, FP32 = torch.bfloat16, torch.float32
A, B, C = 3.4445, -4.7750, 2.0315  # torch's (and Keller Jordan's) quintic coefficients


def reference_step(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, momentum: float, wd: float):
    """Muon written out from its definition in float64 (Keller Jordan's post; torch's docs): Nesterov momentum,
    5 quintic Newton-Schulz iterations on the wide orientation after scaling to unit Frobenius norm, decoupled weight
    decay, lr times sqrt(max(1, rows / cols)). Returns the new (p, buf)."""
    p, grad, buf = p.double(), grad.double(), buf.double()
    buf = momentum * buf + (1 - momentum) * grad
    u = (1 - momentum) * grad + momentum * buf  # Nesterov: grad.lerp(buf, momentum)
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / max(x.norm().item(), 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    x = x.T if u.shape[0] > u.shape[1] else x
    p = p * (1 - lr * wd) - lr * math.sqrt(max(1, p.shape[0] / p.shape[1])) * x
    return p.float(), buf.float()


@pytest.mark.parametrize("shape", [(24, 16), (16, 40), (32, 32)])
def test_fp32_step_equals_muon_written_out_in_float64(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape) * 0.1)
    opt = Muon([w], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, ns_dtype=FP32)
    ref, buf = w.detach().clone(), torch.zeros(shape)
    for step in range(3):
        w.grad = torch.randn(*shape)
        ref, buf = reference_step(ref, w.grad, buf, lr=0.02, momentum=0.95, wd=0.1)
        opt.step()
        moved = (ref - w.detach()).abs().max().item()
        assert moved < 2e-6, (step, moved)  # fp32 rounding; bf16's iteration is ~1e-3 off here (next test)
    assert torch.allclose(opt.state[w]["momentum_buffer"], buf, atol=1e-6)


def test_bf16_is_torchs_own_step_and_further_from_the_definition_than_fp32():
    torch.manual_seed(1)
    start, grads = torch.randn(24, 16) * 0.1, [torch.randn(24, 16) for _ in range(3)]
    ours, theirs, fp32 = (torch.nn.Parameter(start.clone()) for _ in range(3))
    opts = [
        Muon([ours], lr=0.02, ns_dtype=BF16),
        torch.optim.Muon([theirs], lr=0.02),
        Muon([fp32], lr=0.02, ns_dtype=FP32),
    ]
    ref, buf = start.clone(), torch.zeros(24, 16)
    for g in grads:
        for p, o in zip((ours, theirs, fp32), opts, strict=True):
            p.grad = g.clone()
            o.step()
        ref, buf = reference_step(ref, g, buf, lr=0.02, momentum=0.95, wd=0.1)
    assert torch.equal(ours, theirs)
    assert (ours - ref).abs().max() > 50 * (fp32 - ref).abs().max()


def test_state_is_torchs_so_runs_resume_across_the_two():
    """The saved state is torch.optim.Muon's (momentum buffers, param groups): a state saved by one loads in the
    other and the next steps match a run that never switched."""
    torch.manual_seed(2)
    start, grads = torch.randn(16, 24), [torch.randn(16, 24) for _ in range(4)]
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    straight = Muon([a], lr=0.01, ns_dtype=FP32)
    first = torch.optim.Muon([b], lr=0.01)
    for g in grads[:2]:
        a.grad, b.grad = g.clone(), g.clone()
        straight.step()
        first.step()
    b.data.copy_(a.data)  # the weights as the fp32 run left them, then its state through torch's optimizer
    # deep copies, as a save and a load give: torch's state_dict() hands out the live momentum buffers
    first.load_state_dict(copy.deepcopy(straight.state_dict()))
    resumed = Muon([b], lr=0.01, ns_dtype=FP32)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for g in grads[2:]:
        a.grad, b.grad = g.clone(), g.clone()
        straight.step()
        resumed.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize(("device_type", "dtype"), [("cpu", FP32), ("cuda", BF16), ("mps", BF16)])
def test_the_run_picks_fp32_on_the_cpu_and_bf16_on_accelerators(device_type, dtype, capsys):
    assert ns_dtype_for(device_type) == dtype
    tok = fixtures.char_tokenizer()
    model = fixtures.tiny_llama(tok)
    cfg = SimpleNamespace(
        optimizer="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0, weight_decay=0.1,
        beta1=0.9, beta2=0.99,
    )  # fmt: skip
    opt, _, _ = build_optimizer(model, cfg, device_type, sharded=False)
    assert isinstance(opt.muon, muon_class()) and opt.muon.ns_dtype == dtype
    assert describe(cfg, opt).endswith("Newton-Schulz in " + ("fp32" if dtype == FP32 else "bf16"))
