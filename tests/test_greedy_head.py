"""owngpt.greedy_head: a greedy step's LM head read from an fp16 copy, with the fp32 head's argmax exactly.

Oracles: the fp32 head's own kernel (the values at the candidates must be bitwise its values, the argmax its
argmax), the rounding bound checked against the real distance between the fp32 and the fp16 products (also on inputs
built to make the rounding errors add up), and through the engine the unpacked transformers model's greedy tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fixtures
from owngpt import decode_kernels, greedy_head, native_kernels
from owngpt.decode_kernels import _packed_linear_class, pack_for_decode
from owngpt.engine import Decoder, Row, RowSettings, run_to_end
from owngpt.greedy_head import GreedyHead, greedy_head_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

NATIVE = native_kernels.native_gemv()
needs_native = pytest.mark.skipif(
    NATIVE is None or not NATIVE.has_f16c, reason="owngpt's native kernel with F16C is not available here"
)


@pytest.fixture
def streamed(monkeypatch):
    """Every head counts as too large for the CPU's cache (the screen's condition), whatever its size."""
    monkeypatch.setattr(decode_kernels, "cache_resident_bytes", lambda: 0)


def packed_head(out, in_, bias=False, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_, generator=g) * scale
    b = torch.randn(out, generator=g) if bias else None
    return _packed_linear_class()(w, b, native=NATIVE), w, b


def candidates(logits):
    return [torch.isfinite(row).nonzero().squeeze(1) for row in logits]


@needs_native
@pytest.mark.parametrize("out,in_,bias", [(1000, 96, False), (1001, 147, True), (515, 20, False), (64, 3, True)])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_screened_heads_values_are_the_fp32_heads_at_its_candidates_with_the_same_argmax(
    streamed, out, in_, bias, rows
):
    module, _w, _b = packed_head(out, in_, bias)
    head = greedy_head_for(module)
    assert isinstance(head, GreedyHead)
    full = module.kernel(True)
    g = torch.Generator().manual_seed(1)
    counts = []
    for scale in (1e-3, 1.0, 1e3):
        for _ in range(10):
            x = torch.randn(rows, in_, generator=g) * scale
            want, got = full(x), head(x)
            assert torch.equal(got.argmax(dim=1), want.argmax(dim=1))
            for r, idx in enumerate(candidates(got)):
                assert want[r].argmax() in idx
                assert torch.equal(got[r, idx], want[r, idx])  # bitwise: the fp32 kernel's own arithmetic
                assert torch.isneginf(got[r]).sum() == out - idx.numel()
                counts.append(idx.numel())
    # it screens: a handful of candidates a row, not a disguised full product
    assert max(counts) <= max(8, out // 50), counts


@needs_native
@pytest.mark.parametrize("k", [1, 5])
def test_the_candidates_are_every_token_whose_upper_bound_reaches_the_kth_lower_bound(streamed, k):
    """The screen's rule (module doc), recomputed here from the fp16 product and the bound: the tokens kept are
    exactly those whose upper bound reaches the row's k-th largest lower bound (up to the bound's float rounding)."""
    module, _w, _b = packed_head(1000, 96, seed=5)
    head = greedy_head_for(module)
    g = torch.Generator().manual_seed(6)
    below_best_low = 0  # candidates whose fp16 value is under the best lower bound: kept only by their bound
    for _ in range(60):
        x = torch.randn(1, 96, generator=g)
        approx = NATIVE.gemv_f16(x, head.packed16, 1000)[0]
        err = head.scaled_norms * x.double().norm().float() + head.c2 * x.abs().sum()
        best_low = (approx - err).topk(k).values[-1]
        upper = approx + err
        tol = 1e-4 * float(err.min())
        got = set(candidates(head(x, k))[0].tolist())
        assert set((upper >= best_low + tol).nonzero().squeeze(1).tolist()) <= got
        assert got <= set((upper >= best_low - tol).nonzero().squeeze(1).tolist())
        below_best_low += sum(float(approx[j]) < float(best_low) for j in got)
    assert below_best_low > 0


@needs_native
def test_a_row_with_too_many_candidates_takes_the_full_head(streamed):
    """Hundreds of rows within the bound of each other (a row scaled by 1 - k 1e-6): more candidates than the screen
    recomputes one by one, so the whole fp32 head is taken, every logit finite."""
    base = torch.randn(64)
    w = torch.stack([base * (1 - k * 1e-6) for k in range(300)] + [torch.randn(64) * 0.01 for _ in range(100)])
    module = _packed_linear_class()(w, None, native=NATIVE)
    head = greedy_head_for(module)
    x = base.unsqueeze(0)
    assert torch.equal(head(x), module.kernel(True)(x))


@needs_native
@pytest.mark.parametrize("k", [2, 5, 40])
def test_top_k_screening_keeps_every_token_of_the_fp32_top_k_and_the_same_sampling_distribution(streamed, k):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    module, _w, _b = packed_head(1001, 147, bias=True, seed=7)
    head = greedy_head_for(module)
    full = module.kernel(True)
    g = torch.Generator().manual_seed(8)
    warp = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(k), TopPLogitsWarper(0.9)]
    for _ in range(20):
        x = torch.randn(2, 147, generator=g)
        want, got = full(x), head(x, k)
        for r, idx in enumerate(candidates(got)):
            kth = want[r].topk(k).values[-1]
            assert set((want[r] >= kth).nonzero().squeeze(1).tolist()) <= set(idx.tolist())
            assert torch.equal(got[r, idx], want[r, idx])
            assert idx.numel() < 3 * k + 8  # it screens
        a, b = want.clone(), got.clone()
        for p in warp:
            a, b = p(None, a), p(None, b)
        assert torch.equal(torch.softmax(a, -1), torch.softmax(b, -1))


@needs_native
def test_exact_and_near_ties_keep_torch_argmaxs_first_index(streamed):
    module, w, _ = packed_head(300, 64, seed=2)
    w = w.clone()
    w[40] = w[7]  # an exact tie with row 7
    w[20] = w[7] * (1 + 2**-20)  # nearer than fp16 can tell apart: only the fp32 values decide
    w[50] = w[7] * (1 - 2**-20)
    module = _packed_linear_class()(w, None, native=NATIVE)
    head = greedy_head_for(module)
    x = (w[7] * 10).unsqueeze(0)  # rows 7, 20, 40, 50 far above the others
    want, got = module.kernel(True)(x), head(x)
    idx = candidates(got)[0].tolist()
    assert {7, 20, 40, 50} <= set(idx)
    assert int(got.argmax()) == int(want.argmax())
    assert torch.equal(got[0, idx], want[0, idx])


@needs_native
@pytest.mark.parametrize("in_", [20, 768])
def test_the_rounding_bound_holds_even_where_the_rounding_errors_add_up(streamed, in_):
    """The bound (greedy_head's module doc) against the real |fp32 product - fp16 product|, on random inputs and on
    inputs whose signs follow each weight's rounding error, so that every term of the difference adds up."""
    module, w, _ = packed_head(256, in_, seed=3, scale=1.0)
    head = greedy_head_for(module)
    full = module.kernel(True)
    delta = w - w.half().float()  # the fp16 copy's rounding, per weight
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(1, in_, generator=g) for _ in range(20)]
    xs += [(torch.sign(delta[j]) * w[j].abs()).unsqueeze(0) for j in range(0, 256, 16)]  # aligned with row j's
    xs += [torch.sign(delta[j]).unsqueeze(0) for j in range(0, 256, 16)]
    worst = 0.0
    for x in xs:
        x = x.contiguous()
        approx = NATIVE.gemv_f16(x, head.packed16, 256)
        bound = head.scaled_norms * x.norm() + head.c2 * x.abs().sum()
        gap = (full(x) - approx).abs()
        assert bool((gap <= bound).all()), float((gap / bound).max())
        worst = max(worst, float((gap / bound).max()))
    assert worst > 0.05  # the bound is not so loose that everything becomes a candidate


@needs_native
def test_rows_the_screen_cannot_bound_take_the_full_head(streamed):
    module, _w, _b = packed_head(400, 32)
    head = greedy_head_for(module)
    full = module.kernel(True)
    zeros = torch.zeros(2, 32)  # every logit 0: every token a candidate, more than the screen takes
    assert torch.equal(head(zeros), full(zeros))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 32)
        x[1, 5] = bad
        got, want = head(x), full(x)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@needs_native
def test_heads_the_screen_does_not_serve(monkeypatch):
    small, _w, _b = packed_head(100, 16)
    assert greedy_head_for(small) is None  # in the CPU's cache: not bound by memory, nothing to gain
    monkeypatch.setattr(decode_kernels, "cache_resident_bytes", lambda: 0)
    w = torch.randn(64, 16)
    w[3, 4] = 7e4  # beyond fp16's range
    assert greedy_head_for(_packed_linear_class()(w, None, native=NATIVE)) is None
    assert greedy_head_for(_packed_linear_class()(torch.randn(64, 16), None, native=None)) is None  # no native kernel
    off = _packed_linear_class()(torch.randn(64, 16), None, native=NATIVE)
    off.greedy_screen = False
    assert greedy_head_for(off) is None
    monkeypatch.setenv(greedy_head.ENV, "0")
    assert greedy_head_for(_packed_linear_class()(torch.randn(64, 16), None, native=NATIVE)) is None
    monkeypatch.delenv(greedy_head.ENV)
    on = _packed_linear_class()(torch.randn(64, 16), None, native=NATIVE)
    assert greedy_head_for(on) is greedy_head_for(on)  # built once, kept on the module


PROMPTS = ["ROMEO:", "First Citizen:\nBefore we", "A", "KING " * 12]


@needs_native
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_and_top_k_rows_decode_through_the_screened_head_and_rows_reading_every_logit_do_not(
    streamed, arch, monkeypatch
):
    """Through the engine: greedy tokens and seeded top-k samples equal the unpacked model's (and the packed model's
    without the screen); the screen runs for batches of such rows with the batch's largest k, and not for a batch
    with a row that reads every logit (sampling without top-k, penalties) or keeps a trace of them."""
    monkeypatch.setattr(native_kernels, "BATCH_ROWS", {1: 16, 2: 16})
    tok = fixtures.char_tokenizer()
    make = fixtures.tiny_gpt2 if arch == "gpt2" else fixtures.tiny_llama
    ref = make(tok, n_positions=64, n_embd=64, n_head=4)
    fast, plain = copy.deepcopy(ref), copy.deepcopy(ref)
    pack_for_decode(fast)
    pack_for_decode(plain)
    plain.get_output_embeddings().greedy_screen = False
    calls = []
    real_call = GreedyHead.__call__
    monkeypatch.setattr(
        GreedyHead, "__call__", lambda self, x, k=1: calls.append((x.shape[0], k)) or real_call(self, x, k)
    )

    def run(model, settings, trace=False, prompts=PROMPTS, context=24):
        rows = [Row(tok.encode(p), RowSettings(max_tokens=30, **s)) for p, s in zip(prompts, settings)]
        for r in rows:
            r.trace = [] if trace else None
        run_to_end(Decoder(model, tok, context, shift=5), rows)
        return [r.token_ids for r in rows]

    greedy = [{"temperature": 0}] * len(PROMPTS)
    for prompts in (1, len(PROMPTS)):
        want = run(ref, greedy[:prompts])
        assert run(plain, greedy[:prompts]) == want and not calls
        assert run(fast, greedy[:prompts]) == want
        assert calls and max(calls) == (prompts, 1)
        calls.clear()
    # rows that stay in one batch to the end (no window moves: the context holds prompt and reply)
    together = {"prompts": PROMPTS[:3] + ["B"], "context": 64}
    top_k = {"temperature": 0.8, "top_k": 12, "top_p": 0.9, "seed": 3}
    for reads_all in (
        {"temperature": 0.8, "seed": 3},
        {**top_k, "repetition_penalty": 1.3},
        {"temperature": 0, "no_repeat_ngram_size": 2},
    ):
        mixed = [*greedy[:3], reads_all]
        assert run(fast, mixed, **together) == run(ref, mixed, **together)
        assert not calls  # a row reading the whole distribution: every step of its batch keeps the full head
    assert run(fast, greedy, trace=True, **together) == run(ref, greedy, **together)
    assert not calls  # a traced row records its logits whole
    assert run(fast, greedy, **together) == run(ref, greedy, **together)
    assert calls == [(4, 1)] * 29  # the first token of each row comes from its prefill
    calls.clear()
    mixed = [*greedy[:2], top_k, {**top_k, "top_k": 5, "seed": 4}]  # seeded top-k sampling: the same draws
    assert run(fast, mixed, **together) == run(ref, mixed, **together)
    assert calls == [(4, 12)] * 29  # the first token of each row comes from its prefill


@needs_native
def test_the_bound_is_the_one_the_module_documents(streamed):
    """The constants against the formula in owngpt.greedy_head's doc, derived here again: per output
    1.01 (2^-11 + gamma_m (2 + 2^-11)) ||w_j||_2 (times 1 + 2 gamma_m for the fp32 norms), and
    1.01 2^-25 (1 + gamma_m) per unit of ||x||_1, with gamma_m = m u / (1 - m u), u = 2^-24, m = in + 8."""
    for in_ in (20, 768):
        module, w, _ = packed_head(64, in_, seed=9)
        head = greedy_head_for(module)
        m, u = in_ + 8, 2.0**-24
        gamma = m * u / (1 - m * u)
        per_norm = 1.01 * (2.0**-11 + gamma * (2 + 2.0**-11)) * (1 + 2 * gamma)
        want = w.double().norm(dim=1) * per_norm
        assert torch.allclose(head.scaled_norms.double(), want, rtol=1e-6, atol=0)
        assert bool((head.scaled_norms.double() >= want * (1 - 1e-6)).all())
        assert head.c2 == pytest.approx(1.01 * 2.0**-25 * (1 + gamma), rel=1e-12)


@needs_native
def test_the_screen_takes_k_up_to_half_its_candidate_limit_and_refuses_other_inputs(streamed):
    module, _w, _b = packed_head(800, 32, seed=10)
    head = greedy_head_for(module)
    x = torch.randn(1, 32)
    assert head.max_candidates == 800 // 8  # MAX_CANDIDATE_SHARE, as documented: an eighth of the vocabulary
    top = head.max_candidates // 2  # 50 of 800
    assert bool(torch.isneginf(head(x, top)).any())  # screened
    assert bool(torch.isfinite(head(x, top + 1)).all())  # the whole fp32 head
    assert torch.equal(head(x, top + 1), module.kernel(True)(x))
    assert bool(torch.isfinite(head(x, 0)).all())
    for bad in (torch.randn(1, 31), torch.randn(32), torch.randn(1, 32, dtype=torch.float64)):
        with pytest.raises(ValueError, match="greedy head"):
            head(bad)


@needs_native
def test_a_head_is_screened_only_when_it_outgrows_the_cache(monkeypatch):
    for cache, screened in ((4095, True), (4096, False)):  # a 64 x 16 fp32 head: 4096 bytes
        monkeypatch.setattr(decode_kernels, "cache_resident_bytes", lambda cache=cache: cache)
        module = _packed_linear_class()(torch.randn(64, 16), None, native=NATIVE)
        assert (greedy_head_for(module) is not None) == screened


@needs_native
def test_the_full_head_a_row_falls_back_to_is_the_one_row_kernel_even_where_batches_go_to_onednn(streamed, monkeypatch):
    """On a CPU where owngpt's kernel takes one row only (BATCH_ROWS 1: batches go to oneDNN), a screened row that
    falls back to the full head still gets the one-row native kernel's values, bitwise: those of the step without
    the screen (greedy_head.py 123: the batch kernel there would give oneDNN's rounding instead)."""
    monkeypatch.setattr(native_kernels, "BATCH_ROWS", {level: 1 for level in native_kernels.BATCH_ROWS})
    module, _w, _b = packed_head(800, 256, seed=11)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(12))
    one_row, batch = module.kernel(True)(x), module.kernel(False)(x)
    assert not torch.equal(one_row, batch)  # oneDNN sums in another order: the check below can tell them apart
    head = greedy_head_for(module)
    assert torch.equal(head(x, head.max_candidates // 2 + 1), one_row)  # k too large for the screen: the full head
