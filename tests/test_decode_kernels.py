"""The fast fp32 decode path (owngpt.decode_kernels' packed weights, owngpt.decode_step's hand-written step) against
the reference path on the same weights.

Oracle: the same model unpacked, decoding with the engine through transformers' forward (greedy tokens must be
equal) and a fresh full forward over the window each step used (logits equal up to the order of the sums).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fixtures
from owngpt import decode_kernels, native_kernels
from owngpt.decode_kernels import pack_for_decode
from owngpt.decode_step import decode_step_for
from owngpt.engine import Decoder, Row, RowSettings, run_to_end

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we", "A", "KING " * 12]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return fixtures.char_tokenizer()


@pytest.fixture(params=["cache-resident", "streamed", "streamed head"])
def weights_size(request, monkeypatch):
    """The kernel choices of pack_for_decode: a model that fits in the CPU's cache keeps an [in, out] copy for MKL
    at one row (where the native kernel is off); a larger one (the cache size pretended to be 0 here) uses oneDNN's packed weights for every row; and
    small layers under a head too large for the cache (the cache pretended to hold the layers only)."""
    if request.param == "streamed":
        monkeypatch.setattr(decode_kernels, "cache_resident_bytes", lambda: 0)
    if request.param == "streamed head":  # models() sets the size to the layers' bytes
        monkeypatch.setattr(decode_kernels, "cache_resident_bytes", lambda: _LAYER_BYTES[0])
    return request.param


_LAYER_BYTES = [0]


@pytest.fixture(params=["native kernel", "torch kernels"])
def kernels(request, weights_size, monkeypatch):
    """One-row products: owngpt's own kernel (owngpt.native_kernels, where it builds here), or torch's (the user's
    OWNGPT_NATIVE_KERNELS=0, and every machine without a compiler): MKL's for a cache-resident model, oneDNN's
    otherwise."""
    if request.param == "torch kernels":
        monkeypatch.setenv(native_kernels.ENV, "0")
    else:  # batches of up to 16 rows through the native kernel too, as on an AVX2 CPU (whatever this CPU's default)
        monkeypatch.setattr(native_kernels, "BATCH_ROWS", {1: 16, 2: 16})
    return request.param


def native_in_use(model):
    """Whether the model's packed (or int8) layers carry owngpt's native kernel."""
    return any(getattr(m, "native_packed", None) is not None for m in model.modules())


def models(tok, arch, kv_heads=None):
    ref = (fixtures.tiny_gpt2 if arch == "gpt2" else fixtures.tiny_llama)(tok, n_positions=64, n_embd=64, n_head=4)
    if kv_heads is not None:  # grouped-query attention: fewer key/value heads than query heads, same random weights
        cfg = copy.deepcopy(ref.config)
        cfg.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        ref = type(ref)(cfg).eval()
    with torch.no_grad():  # GPT-2 initialises biases to zero: random ones, so a dropped bias shows
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    from transformers.pytorch_utils import Conv1D

    head = ref.get_output_embeddings()
    linears = [m for m in ref.modules() if isinstance(m, (Conv1D, torch.nn.Linear)) and m is not head]
    _LAYER_BYTES[0] = sum(m.weight.numel() for m in linears) * 4
    fast = copy.deepcopy(ref)
    return ref, fast, pack_for_decode(fast)


def greedy(model, tok, prompts, trace=False, **settings):
    rows = [Row(tok.encode(p), RowSettings(**{"max_tokens": 40, "temperature": 0, **settings})) for p in prompts]
    for r in rows:
        r.trace = [] if trace else None
    decoder = Decoder(model, tok, 24, shift=5)
    # the packed model decodes through the hand-written step, the reference through transformers' forward
    packed = any(type(m).__name__ == "PackedLinear" for m in model.modules())
    assert (decoder._fast_step is not None) == packed
    run_to_end(decoder, rows)
    return rows


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_projection_is_packed_and_greedy_tokens_equal_the_reference(tok, arch, weights_size, kernels):
    from transformers.pytorch_utils import Conv1D

    ref, fast, n = models(tok, arch)
    available = native_kernels.native_gemv() is not None
    assert native_in_use(fast) == (kernels == "native kernel" and available)
    assert n > 0 and not any(isinstance(m, (Conv1D, torch.nn.Linear)) for m in fast.modules())
    assert not any(m.training for m in fast.modules())  # packed modules take the eval model's mode
    head = fast.get_output_embeddings()
    kept = {m.weight_io is not None for m in fast.modules() if type(m).__name__ == "PackedLinear" and m is not head}
    mkl = not native_in_use(fast)  # MKL's [in, out] copy only where the native kernel does not serve one row
    assert kept == {weights_size != "streamed" and mkl}
    assert (head.weight_io is not None) == (weights_size == "cache-resident" and mkl)
    for prompts in (PROMPTS[:1], PROMPTS):  # batch 1 and a batch of rows of different lengths (padding, masks)
        a = [r.token_ids for r in greedy(ref, tok, prompts)]
        b = [r.token_ids for r in greedy(fast, tok, prompts)]
        assert a == b


@pytest.mark.parametrize("arch,kv_heads", [("gpt2", None), ("llama", None), ("llama", 2), ("llama", 1)])
def test_packed_logits_equal_a_fresh_reference_forward_over_each_window(tok, arch, kv_heads, weights_size, kernels):
    ref, fast, _ = models(tok, arch, kv_heads)
    # one row alone (the one-row kernels), then rows of different lengths together
    for r in greedy(fast, tok, PROMPTS[:1], trace=True) + greedy(fast, tok, PROMPTS, trace=True):
        assert len({s for s, _e, _lg in r.trace}) >= 3  # the window moved (re-fills went through the packed path)
        for s, e, logits in r.trace:
            with torch.no_grad():
                want = ref(torch.tensor([r.ids[s:e]])).logits[0, -1]
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_int8_and_unknown_models_are_left_as_they_are(tok):
    from owngpt.quantize import quantize_model

    int8 = quantize_model(fixtures.tiny_gpt2(tok))
    before = [type(m) for m in int8.modules()]
    assert pack_for_decode(int8) == 0 and [type(m) for m in int8.modules()] == before
    other = fixtures.tiny_gpt2(tok)
    other.config.model_type = "not-tested-here"
    assert pack_for_decode(other) == 0


def test_loading_for_generation_packs_on_the_cpu(tiny_ckpt):
    from owngpt.generation import load_for_generation

    lm = load_for_generation(str(tiny_ckpt))
    assert any(type(m).__name__ == "PackedLinear" for m in lm.model.modules())


def test_parameter_count_includes_packed_weights(tok):
    from owngpt.decode_kernels import parameter_count

    ref, fast, _ = models(tok, "gpt2")
    assert parameter_count(fast) == parameter_count(ref) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampled_rows_and_rows_joining_mid_batch_equal_the_reference(tok, arch, weights_size, kernels):
    """Seeded sampling with every logits processor, and continuous batching: rows join a running batch (their
    caches right-aligned, the fast step's padding mask) and leave it, as in the server."""
    ref, fast, _ = models(tok, arch)
    settings = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 3}

    def staggered(model):
        decoder = Decoder(model, tok, 24, shift=5)
        rows = [Row(tok.encode(p), RowSettings(max_tokens=12 + 5 * i, **settings)) for i, p in enumerate(PROMPTS)]
        for i, r in enumerate(rows):
            decoder.add(r)
            for _ in range(3 + i):
                decoder.step()
        while decoder.active:
            decoder.step()
        return [r.token_ids for r in rows]

    assert staggered(fast) == staggered(ref)
    assert [r.token_ids for r in greedy(fast, tok, PROMPTS, **settings)] == [
        r.token_ids for r in greedy(ref, tok, PROMPTS, **settings)
    ]


def test_the_hand_written_step_serves_only_models_it_implements(tok):
    ref, fast, _ = models(tok, "gpt2")
    assert decode_step_for(fast) is not None
    assert decode_step_for(ref) is None  # unpacked: transformers' forward
    odd = copy.deepcopy(ref)
    odd.config.scale_attn_by_inverse_layer_idx = True  # a GPT-2 option the step does not implement
    pack_for_decode(odd)
    assert decode_step_for(odd) is None
    assert Decoder(fast, tok, 24, use_cache=False)._fast_step is None  # no cache: every step a full forward
    classifier = fixtures.tiny_gpt2(tok, task="classify")  # packable, but no LM head to decode with
    assert pack_for_decode(classifier) > 0 and decode_step_for(classifier) is None


def _native_step_equals_python_step(step, blocks, ids, pos, keys, values, rows, L, valid_from):
    """One step with the native blocks and one with the Python blocks on copies of the same caches: equal logits and
    KV writes (1e-5: the order of the sums), this step's keys and values in column L only; above the native rows
    (3 in these tests) both are the Python step, bitwise."""
    outs = []
    for use_native in (True, False):
        step.native_block = blocks if use_native else None
        k, v = [x.clone() for x in keys], [x.clone() for x in values]
        with torch.no_grad():
            outs.append((step(ids, pos, k, v, rows, L, valid_from), k, v))
    step.native_block = blocks
    (got, gk, gv), (want, wk, wv) = outs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(gk + gv, wk + wv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a[:, :, :L], b[:, :, :L]) and torch.equal(a[:, :, L + 1 :], b[:, :, L + 1 :])
    if rows > blocks.max_rows:
        assert torch.equal(got, want)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
@pytest.mark.parametrize("scale_attn,n_embd", [(True, 64), (False, 36)])  # 36: rows and heads (9) off 8's multiples
def test_the_native_gpt2_block_equals_the_python_step(tok, activation, scale_attn, n_embd, monkeypatch):
    """GPT-2's blocks in one native call each (native_block.cpp) against the same step's Python blocks on the same
    packed weights and caches: one row, then rows of different lengths (padding columns masked), and a batch above
    the native kernel's rows (the Python step's, with oneDNN). Tolerance: the order of the sums, ~1e-6 here."""
    if native_kernels.native_gemv() is None:
        pytest.skip("owngpt's native kernel does not build here")
    monkeypatch.setattr(native_kernels, "BATCH_ROWS", {1: 3, 2: 3})
    cfg = copy.deepcopy(fixtures.tiny_gpt2(tok, n_positions=64, n_embd=n_embd, n_head=4).config)
    cfg.activation_function, cfg.scale_attn_weights = activation, scale_attn
    cfg.n_inner = None if n_embd == 64 else 147  # an MLP width off 8's multiples too
    torch.manual_seed(0)
    ref = type(fixtures.tiny_gpt2(tok))(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.5)  # random biases and norms: a dropped or swapped one shows
            if name.endswith("mlp.c_fc.weight"):
                p.mul_(20)  # GELU's inputs of a few units, where its tanh and erf forms part
    fast = copy.deepcopy(ref)
    pack_for_decode(fast)
    step = decode_step_for(fast)
    blocks = step.native_block
    assert blocks is not None and blocks.max_rows == 3 and blocks.gelu_tanh == (activation == "gelu_new")
    g = torch.Generator().manual_seed(0)
    L, cap = 9, 16
    for rows, valid_from in ((1, None), (3, torch.tensor([0, 4, 8])), (4, torch.tensor([2, 0, 5, 1]))):
        keys = [torch.randn(rows + 1, 4, cap, n_embd // 4, generator=g) for _ in fast.transformer.h]
        values = [torch.randn(rows + 1, 4, cap, n_embd // 4, generator=g) for _ in fast.transformer.h]
        ids, pos = torch.randint(0, len(tok), (rows,), generator=g), torch.arange(rows) + 3
        _native_step_equals_python_step(step, blocks, ids, pos, keys, values, rows, L, valid_from)


def test_the_native_blocks_attend_on_two_threads_as_on_one(tok):
    """A long cache splits the heads' attention over the threads (each with its own slice of the scores buffer):
    the logits and KV writes equal one thread's, and the Python step's."""
    if native_kernels.native_gemv() is None:
        pytest.skip("owngpt's native kernel does not build here")
    _, fast, _ = models(tok, "gpt2")
    step = decode_step_for(fast)
    blocks = step.native_block
    g = torch.Generator().manual_seed(2)
    rows, L, cap = 1, 400, 512  # 4 heads x 401 columns x 16 >= the C code's threshold for a second thread
    keys = [torch.randn(rows, 4, cap, 16, generator=g) for _ in fast.transformer.h]
    values = [torch.randn(rows, 4, cap, 16, generator=g) for _ in fast.transformer.h]
    ids, pos = torch.tensor([3]), torch.tensor([40])
    outs = []
    before = torch.get_num_threads()
    try:
        for threads, use_native in ((1, True), (2, True), (1, False)):
            torch.set_num_threads(threads)
            step.native_block = blocks if use_native else None
            k, v = [x.clone() for x in keys], [x.clone() for x in values]
            with torch.no_grad():
                outs.append((step(ids, pos, k, v, rows, L, None), k, v))
    finally:
        torch.set_num_threads(before)
    (one, k1, v1), (two, k2, v2), (py, _, _) = outs
    assert torch.equal(one, two) and all(torch.equal(a, b) for a, b in zip(k1 + v1, k2 + v2))
    torch.testing.assert_close(one, py, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "hidden,heads,kv_heads,inner,bias",
    # 36: rows and heads (18) off 8's multiples; grouped-query heads 2 of 4, 1 of 2, 1 of 4
    [(64, 4, 4, 88, False), (36, 2, 1, 90, True), (64, 4, 2, 88, False), (64, 4, 1, 88, True)],
)
def test_the_native_llama_block_equals_the_python_step(tok, hidden, heads, kv_heads, inner, bias, monkeypatch):
    """LLaMA's blocks in one native call each against the same step's Python blocks (as the GPT-2 test above):
    RMSNorm, the rotary embedding at each row's own position, grouped-query heads, SiLU, optional biases."""
    if native_kernels.native_gemv() is None:
        pytest.skip("owngpt's native kernel does not build here")
    monkeypatch.setattr(native_kernels, "BATCH_ROWS", {1: 3, 2: 3})
    cfg = copy.deepcopy(fixtures.tiny_llama(tok, n_positions=64, n_embd=hidden, n_head=heads).config)
    cfg.num_key_value_heads, cfg.intermediate_size = kv_heads, inner
    cfg.attention_bias = cfg.mlp_bias = bias
    torch.manual_seed(0)
    ref = type(fixtures.tiny_llama(tok))(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)  # a dropped or swapped norm or bias shows
    fast = copy.deepcopy(ref)
    pack_for_decode(fast)
    step = decode_step_for(fast)
    blocks = step.native_block
    assert blocks is not None and blocks.max_rows == 3
    g = torch.Generator().manual_seed(0)
    L, cap, D = 9, 16, hidden // heads
    for rows, valid_from in ((1, None), (3, torch.tensor([0, 4, 8])), (4, torch.tensor([2, 0, 5, 1]))):
        keys = [torch.randn(rows + 1, kv_heads, cap, D, generator=g) for _ in fast.model.layers]
        values = [torch.randn(rows + 1, kv_heads, cap, D, generator=g) for _ in fast.model.layers]
        ids, pos = torch.randint(0, len(tok), (rows,), generator=g), torch.tensor([9, 5, 1, 7])[:rows]
        _native_step_equals_python_step(step, blocks, ids, pos, keys, values, rows, L, valid_from)


def test_the_native_blocks_refuse_kv_buffers_they_cannot_index(tok):
    """The C code reads raw pointers: buffers that are not the engine's contiguous fp32 layout are refused, not read
    out of bounds."""
    if native_kernels.native_gemv() is None:
        pytest.skip("owngpt's native kernel does not build here")
    _, fast, _ = models(tok, "gpt2")
    blocks = decode_step_for(fast).native_block
    n = len(fast.transformer.h)

    def run(keys, values):
        blocks(torch.zeros(1, 64), keys, values, 1, 3, None)

    good = [torch.zeros(2, 4, 8, 16) for _ in range(n)]
    run(good, [x.clone() for x in good])
    for bad in (
        [x.transpose(2, 3) for x in good],  # not contiguous
        [x.double() for x in good],  # not fp32
        good[:1],  # a layer short
    ):
        with pytest.raises(ValueError, match="native blocks"):
            run(bad, [x.clone() for x in bad])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_torch_kernels_keep_the_python_blocks_and_int8_blocks_take_one_row(tok, arch, monkeypatch):
    from owngpt.quantize import quantize_model

    ref, fast, _ = models(tok, arch)
    native = native_kernels.native_gemv()
    assert (decode_step_for(fast).native_block is not None) == (native is not None)
    with torch.no_grad():
        int8_blocks = decode_step_for(quantize_model(copy.deepcopy(ref))).native_block
    if native is not None and native.int8_level > 0:  # int8 projections: the int8 kernel serves one row only
        assert int8_blocks is not None and int8_blocks.max_rows == 1
    monkeypatch.setenv(native_kernels.ENV, "0")
    off = copy.deepcopy(ref)
    pack_for_decode(off)
    assert decode_step_for(off).native_block is None
    with torch.no_grad():
        assert decode_step_for(quantize_model(copy.deepcopy(ref))).native_block is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_native_int8_block_equals_the_python_step_within_an_activation_rounding(tok, arch):
    """An int8 model's blocks in one native call (the int8 kernel for its products) against the same step's Python
    blocks at one row: the products are the same kernel's, so the logits differ only where the norms' order of sums
    moves an activation across an int8 rounding boundary (one step of a 127-level scale), and otherwise by ~1e-6."""
    ref, int8 = _int8_native_models(tok, arch)
    step = decode_step_for(int8)
    blocks = step.native_block
    assert blocks is not None
    calls, fn = [], blocks.fn
    blocks.fn = lambda *a: calls.append(1) or fn(*a)  # the C code really ran (an int8 head can hide small changes)
    layers = int8.transformer.h if arch == "gpt2" else int8.model.layers
    kv_heads, D = 4, 16
    g = torch.Generator().manual_seed(1)
    L, cap = 9, 16
    worst = []
    for _ in range(6):
        keys = [torch.randn(1, kv_heads, cap, D, generator=g) for _ in layers]
        values = [torch.randn(1, kv_heads, cap, D, generator=g) for _ in layers]
        ids, pos = torch.randint(0, len(tok), (1,), generator=g), torch.tensor([L])
        outs = []
        for use_native in (True, False):
            step.native_block = blocks if use_native else None
            k, v = [x.clone() for x in keys], [x.clone() for x in values]
            with torch.no_grad():
                outs.append(step(ids, pos, k, v, 1, L, None))
        worst.append(float((outs[0] - outs[1]).abs().max() / outs[1].abs().max()))
    assert len(calls) == 6 * len(layers)
    assert max(worst) <= 0.02 and sorted(worst)[len(worst) // 2] <= 1e-3, worst


@pytest.mark.parametrize("preset", [None, "0"])
def test_decode_commands_ask_torch_for_huge_pages_unless_the_user_chose(tiny_ckpt, monkeypatch, capsys, preset):
    from owngpt.cli import main

    if preset is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", preset)
    assert main(["generate", str(tiny_ckpt), "--prompt", "A", "--max-new-tokens", "2"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == (preset or "1")


def test_llama_positions_past_the_rope_table_use_the_models_rotary_module(tok):
    """The step's precomputed RoPE table covers max_position_embeddings; past it (a window beyond the table) the
    model's own rotary module computes cos/sin per step. Both paths against a fresh reference forward."""
    ref, fast, _ = models(tok, "llama")
    row = Row(tok.encode(PROMPTS[1]), RowSettings(max_tokens=30, temperature=0))
    row.trace = []
    decoder = Decoder(fast, tok, 24, shift=5)
    cos, sin = decoder._fast_step.table
    decoder._fast_step.table = (cos[:12], sin[:12])  # steps at cache lengths >= 12 go through the module
    run_to_end(decoder, [row])
    assert {e - s for s, e, _lg in row.trace} & {11, 13, 20}  # both sides of the cut
    for s, e, logits in row.trace:
        with torch.no_grad():
            want = ref(torch.tensor([row.ids[s:e]])).logits[0, -1]
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_models_decode_through_the_step_as_through_their_forward(tok, arch, monkeypatch):
    """An int8 model (owngpt.quantize's Int8Linear projections, int8 embedding looked up by its module) takes the
    hand-written step; oracle: the same int8 model decoding through transformers' forward (the step disabled), whose
    per-step logits it must equal (the same int8 op on the same rows) and so its greedy and sampled tokens. Here on
    fbgemm's op at every batch size (owngpt's one-row int8 kernel off: it rounds activations differently, see the
    next test)."""
    from owngpt.decode_kernels import parameter_count
    from owngpt.quantize import quantize_model

    monkeypatch.setenv(native_kernels.ENV, "0")
    ref, _fast, _ = models(tok, arch)
    int8 = quantize_model(copy.deepcopy(ref)).eval()
    assert not native_in_use(int8)
    assert abs(parameter_count(int8) - parameter_count(ref)) < 0.02 * parameter_count(ref)  # weights, not biases

    def run(step_on, prompts, **settings):
        rows = [Row(tok.encode(p), RowSettings(**{"max_tokens": 30, "temperature": 0, **settings})) for p in prompts]
        for r in rows:
            r.trace = []
        decoder = Decoder(int8, tok, 24, shift=5)
        assert decoder._fast_step is not None
        if not step_on:
            decoder._fast_step = None
        run_to_end(decoder, rows)
        return rows

    # One row: the same int8 op on the same fp32 inputs, so equal logits. Several rows: the step's fp32 attention
    # (matmuls where transformers calls SDPA) differs in the last bits, and an int8 activation (one scale per call,
    # over all rows) can round one step the other way: ~1e-3 on these logits, so the bound there is 1e-2 (a wrong
    # weight, position or mask moves them by ~1).
    cases = (
        (PROMPTS[:1], {}, 1e-6),
        (PROMPTS, {}, 1e-2),
        (PROMPTS, {"temperature": 0.8, "top_k": 20, "seed": 3}, 1e-2),
    )
    for prompts, settings, tol in cases:
        a, b = run(True, prompts, **settings), run(False, prompts, **settings)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        for ra, rb in zip(a, b):
            assert len(ra.trace) == len(rb.trace) > 10
            for (sa, ea, la), (sb, eb, lb) in zip(ra.trace, rb.trace):
                assert (sa, ea) == (sb, eb)
                torch.testing.assert_close(la, lb, rtol=0, atol=tol)


def test_a_failed_kernel_build_falls_back_to_torchs_kernels(tok, monkeypatch, tmp_path):
    """No usable compiler (here one that always fails): the model still packs, decodes through torch's kernels and
    gives the reference's tokens."""
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    ref, fast, n = models(tok, "gpt2")
    assert n > 0 and not native_in_use(fast)
    assert [r.token_ids for r in greedy(fast, tok, PROMPTS[:2])] == [r.token_ids for r in greedy(ref, tok, PROMPTS[:2])]


def _int8_native_models(tok, arch):
    from owngpt.quantize import quantize_model

    native = native_kernels.native_gemv()
    if native is None or native.int8_level == 0:
        pytest.skip("owngpt's native int8 kernel is not available here")
    ref, _fast, _ = models(tok, arch)
    int8 = quantize_model(copy.deepcopy(ref)).eval()
    assert native_in_use(int8) and all(m.native is native for m in int8.modules() if type(m).__name__ == "Int8Linear")
    return ref, int8


# owngpt's one-row int8 kernel against fbgemm's op, both on the same int8 weights: the two quantize each activation
# differently (one scale per block of 32 columns vs one per call, 7 or 8 bits), so their logits differ by about the
# two rounding errors together. Measured on these models over the four prompts (largest difference / largest |logit|):
# kernel vs fp32 1.3-2.9%, fbgemm vs fp32 1.3-2.9%, kernel vs fbgemm 1.6-2.4%. Stated bounds: each within int8's 5% of
# fp32 (tests/test_quantize.py, docs/deploy.md), the kernel no further from fp32 than 1.5x fbgemm's distance, and the
# two within 5% of each other; a wrong weight, scale or lane moves logits by tens of %.
INT8_KERNEL_VS_FBGEMM = 0.05


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_one_row_kernel_logits_stay_within_rounding_of_fbgemms_and_of_fp32(tok, arch):
    """Batch-1 decode of an int8 model goes through owngpt's int8 kernel (owngpt.native_kernels). Oracles, at every
    step of a greedy decode whose window moves: the fp32 model's forward and the same int8 model's forward (fbgemm)
    over the same window (bounds above). Tokens are not compared with fbgemm's: a different rounding may pick another
    near-tie."""
    ref, int8 = _int8_native_models(tok, arch)
    row = Row(tok.encode(PROMPTS[1]), RowSettings(max_tokens=40, temperature=0))
    row.trace = []
    decoder = Decoder(int8, tok, 24, shift=5)
    assert decoder._fast_step is not None
    run_to_end(decoder, [row])
    assert len({s for s, _e, _lg in row.trace}) >= 3
    kernel_fp32 = fbgemm_fp32 = kernel_fbgemm = 0.0
    for s, e, logits in row.trace:
        with torch.no_grad():
            fbgemm = int8(torch.tensor([row.ids[s:e]])).logits[0, -1]
            fp32 = ref(torch.tensor([row.ids[s:e]])).logits[0, -1]
        top = float(fp32.abs().max())
        kernel_fp32 = max(kernel_fp32, float((logits - fp32).abs().max()) / top)
        fbgemm_fp32 = max(fbgemm_fp32, float((fbgemm - fp32).abs().max()) / top)
        kernel_fbgemm = max(kernel_fbgemm, float((logits - fbgemm).abs().max() / fbgemm.abs().max()))
    assert kernel_fp32 <= 0.05 and kernel_fp32 <= 1.5 * fbgemm_fp32
    assert 0 < kernel_fbgemm <= INT8_KERNEL_VS_FBGEMM  # > 0: the kernel really ran (fbgemm's rounding would give 0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_one_row_kernel_keeps_perplexity_within_the_int8_bound(tok, arch, monkeypatch):
    """Every projection of every position through the one-row kernel (as batch-1 decoding sees them): perplexity on
    the fixture text within 1% of fp32's (test_quantize's bound for fbgemm's int8 on these models; the issue's is 2%)
    and of fbgemm's int8."""
    from owngpt.quantize import _int8_linear_class

    ref, int8 = _int8_native_models(tok, arch)
    ids = torch.tensor([tok.encode(fixtures.TEXT)[:64]])  # the models' whole context

    def ppl(model):
        with torch.no_grad():
            logits = model(ids).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp().item()

    fp32, fbgemm = ppl(ref), ppl(int8)

    def row_by_row(self, x):
        k, flat = self.kernel(True), x.reshape(-1, self.in_features)
        return torch.cat([k(flat[i : i + 1]) for i in range(len(flat))]).view(*x.shape[:-1], self.out_features)

    monkeypatch.setattr(_int8_linear_class(), "forward", row_by_row)
    native = ppl(int8)
    assert native != fbgemm  # the kernel ran
    assert abs(native / fp32 - 1) < 0.01 and abs(native / fbgemm - 1) < 0.01


def test_int8_models_keep_fbgemm_when_the_kernel_build_fails(tok, monkeypatch, tmp_path):
    """No usable compiler: Int8Linear has no native copy, and batch-1 int8 decoding equals its forward exactly."""
    from owngpt.quantize import quantize_model

    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    ref, _fast, _ = models(tok, "gpt2")
    int8 = quantize_model(copy.deepcopy(ref)).eval()
    assert not native_in_use(int8)

    def run(step_on):
        row = Row(tok.encode(PROMPTS[0]), RowSettings(max_tokens=12, temperature=0))
        row.trace = []
        decoder = Decoder(int8, tok, 24, shift=5)
        if not step_on:  # transformers' forward, one row a call like the step: fbgemm's op on the same rows
            decoder._fast_step = None
        run_to_end(decoder, [row])
        return row

    a, b = run(True), run(False)
    assert a.token_ids == b.token_ids and len(a.trace) == len(b.trace)
    for (_, _, la), (_, _, lb) in zip(a.trace, b.trace):
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
