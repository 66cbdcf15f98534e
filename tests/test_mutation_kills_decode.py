"""The hand-written decode step (owngpt.decode_step) and the packed weights (owngpt.decode_kernels), written against
the mutants that survived their first mutation sample (#25): the kernel each batch size reads, activations the
kernels do not fuse, RoPE other than the default.

Oracles: the same weights unpacked, through transformers' forward (a one-token forward for a step over an empty
cache; the engine's greedy tokens for a whole decode).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fixtures
from owngpt import decode_kernels
from owngpt.decode_kernels import pack_for_decode
from owngpt.decode_step import decode_step_for
from owngpt.engine import Decoder, Row, RowSettings, run_to_end

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return fixtures.char_tokenizer()


def _reference(tok, arch: str, **config):
    """A tiny random model of `arch` with `config` set, in eval mode, random biases (a dropped bias shows)."""
    ref = (fixtures.tiny_gpt2 if arch == "gpt2" else fixtures.tiny_llama)(tok, n_positions=64, n_embd=64, n_head=4)
    if config:
        cfg = copy.deepcopy(ref.config)
        for k, v in config.items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        ref = type(ref)(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return ref


def _packed(ref):
    fast = copy.deepcopy(ref)
    assert pack_for_decode(fast) > 0
    return fast


def _one_step(step, model, ids: list[int]):
    """The step over an empty cache: each row's first token at position 0 (logits (B, V))."""
    cfg = model.config
    n_layer = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    b = len(ids)
    keys = [torch.zeros(b, heads, 4, d) for _ in range(n_layer)]
    values = [torch.zeros(b, heads, 4, d) for _ in range(n_layer)]
    with torch.no_grad():
        return step(torch.tensor(ids), torch.zeros(b, dtype=torch.long), keys, values, b, 0, None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_row_reads_the_cache_resident_copy_and_several_rows_the_packed_weights(tok, arch, monkeypatch):
    # pack_for_decode's kernel choice (owngpt.decode_kernels' measurements): for a model whose weights stay in the
    # CPU cache, one row is multiplied by MKL on the [in, out] copy (`weight_io`) and several rows by oneDNN on the
    # packed weight, for the layers and the LM head alike. Seen by zeroing the copies in place after the step was
    # built: the one-row step then changes, the several-row step does not. Oracle: a one-token forward of the
    # unpacked model (the step over an empty cache computes exactly that)
    # torch's kernels only: where owngpt's native one-row kernel builds, it takes the copies' place (test_native_kernels)
    monkeypatch.setenv("OWNGPT_NATIVE_KERNELS", "0")
    monkeypatch.setattr(decode_kernels, "cache_resident_bytes", lambda: 1 << 40)
    ref = _reference(tok, arch)
    ids = [5, 9]
    with torch.no_grad():
        want = ref(torch.tensor(ids).view(2, 1)).logits[:, -1]
    for part in ("layers", "head"):
        fast = _packed(ref)
        head = fast.get_output_embeddings()
        step = decode_step_for(fast)
        assert step is not None
        torch.testing.assert_close(_one_step(step, fast, ids[:1]), want[:1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_one_step(step, fast, ids), want, rtol=1e-4, atol=1e-4)
        copies = [
            m.weight_io
            for m in fast.modules()
            if type(m).__name__ == "PackedLinear" and (m is head) == (part == "head")
        ]
        assert copies and all(c is not None for c in copies)
        for c in copies:
            c.zero_()
        # several rows never read the copies
        torch.testing.assert_close(_one_step(step, fast, ids), want, rtol=1e-4, atol=1e-4)
        # one row reads them
        assert (_one_step(step, fast, ids[:1]) - want[:1]).abs().max() > 1e-2, part


def _decode(model, tok, prompts):
    rows = [Row(tok.encode(p), RowSettings(max_tokens=30, temperature=0)) for p in prompts]
    for r in rows:
        r.trace = []  # (window start, end, logits) of every step
    decoder = Decoder(model, tok, 24, shift=5)
    assert decoder._fast_step is not None  # the packed model decodes through the hand-written step
    run_to_end(decoder, rows)
    return rows


@pytest.mark.parametrize(
    "arch,config",
    [
        ("gpt2", {"activation_function": "relu"}),  # not one the kernels fuse: the model's own activation runs
        ("gpt2", {"activation_function": "gelu"}),  # fused as exact GELU (gelu_new is the tanh one)
        ("llama", {"hidden_act": "gelu"}),  # a LLaMA-style model whose MLP is not SiLU
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ],
    ids=["gpt2-relu", "gpt2-gelu", "llama-gelu", "llama-linear-rope"],
)
def test_activations_the_kernels_do_not_fuse_and_scaled_rope_decode_as_the_reference(tok, arch, config):
    # every step's logits equal a fresh forward of the unpacked model over the row's window; a row alone (the
    # one-row kernels), then rows together (several-row kernels, padding); the window moves (shift 5 in a context
    # of 24), so positions past the first window's are reached
    ref = _reference(tok, arch, **config)
    fast = _packed(ref)
    for prompts in (["ROMEO:"], ["ROMEO:", "First Citizen:\nBefore we", "A"]):
        for r in _decode(fast, tok, prompts):
            assert len({s for s, _e, _lg in r.trace}) >= 3  # the window moved
            for s, e, logits in r.trace:
                with torch.no_grad():
                    want = ref(torch.tensor([r.ids[s:e]])).logits[0, -1]
                torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


class _SysfsFile:
    def __init__(self, text: str) -> None:
        self.text = text

    def read(self) -> str:
        return self.text


@pytest.mark.parametrize(
    "text,want",
    [
        ("32768K\n", 16 * 2**20),  # half the L3 (what Linux writes for a 32 MiB cache)
        ("1024K", 512 * 2**10),
        ("8M", 4 * 2**20),
        ("4096", 2048),  # bytes, no unit
        ("", 16 * 2**20),  # unreadable: 16 MiB
        ("large", 16 * 2**20),
        (OSError("no such file"), 16 * 2**20),  # no sysfs (macOS, a container without it)
    ],
)
def test_the_cache_resident_bound_is_half_the_l3_or_16_mib_when_unknown(text, want, monkeypatch):
    def fake_open(path, *args, **kwargs):
        assert path == "/sys/devices/system/cpu/cpu0/cache/index3/size"
        if isinstance(text, Exception):
            raise text
        return _SysfsFile(text)

    monkeypatch.setattr(decode_kernels, "open", fake_open, raising=False)  # the module's `open`, not builtins'
    assert decode_kernels.cache_resident_bytes() == want


def test_packed_modules_hold_no_trainable_parameter(tok):
    # inference only (the module doc): the packed projections' biases are frozen copies, never trained
    fast = _packed(_reference(tok, "gpt2"))
    packed = [m for m in fast.modules() if type(m).__name__ == "PackedLinear"]
    assert packed and all(m.bias is not None for m in packed if m is not fast.get_output_embeddings())
    assert not any(p.requires_grad for m in packed for p in m.parameters())


def test_a_model_off_the_cpu_is_left_as_it_is(tok):
    # packing reorders weights for the CPU's kernels: a model on another device (here the meta device, no GPU
    # needed) keeps its own modules
    model = _reference(tok, "gpt2").to("meta")
    before = [type(m) for m in model.modules()]
    assert pack_for_decode(model) == 0
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_rows_decode_as_the_reference_from_a_one_token_prompt(tok, kv_heads):
    # a row that starts from one token attends over 2, 3, 4, ... cached columns, so every cache length up to the
    # window is reached, including those equal to the head count (4 query heads here); one row alone goes through
    # SDPA with grouped heads, rows together too. Oracle: every step's logits against a fresh forward
    ref = _reference(tok, "llama", num_key_value_heads=kv_heads)
    fast = _packed(ref)
    for prompts in (["A"], ["A", "B"]):
        for r in _decode(fast, tok, prompts):
            for s, e, logits in r.trace:
                with torch.no_grad():
                    want = ref(torch.tensor([r.ids[s:e]])).logits[0, -1]
                torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_the_layers_are_measured_without_the_head_and_the_head_with_everything(tok, monkeypatch):
    # pack_for_decode's rule: the layers keep an [in, out] copy when the layers' projections (the LM head left out)
    # fit the cache-resident bound, the head when every projection does. With the bound set between the head's own
    # bytes and the layers' bytes (the head of this tiny model is the smaller), nothing fits
    monkeypatch.setenv("OWNGPT_NATIVE_KERNELS", "0")  # the copies are kept only on torch's kernels
    ref = _reference(tok, "gpt2")
    from transformers.pytorch_utils import Conv1D

    head = ref.get_output_embeddings()
    head_bytes = head.weight.numel() * 4
    layer_bytes = sum(m.weight.numel() for m in ref.modules() if isinstance(m, Conv1D)) * 4
    assert head_bytes < layer_bytes
    for bound, layers_keep, head_keeps in [
        (head_bytes, False, False),
        (layer_bytes, True, False),
        (layer_bytes + head_bytes, True, True),
    ]:
        monkeypatch.setattr(decode_kernels, "cache_resident_bytes", lambda b=bound: b)
        fast = _packed(ref)
        packed_head = fast.get_output_embeddings()
        kept = {
            m.weight_io is not None
            for m in fast.modules()
            if type(m).__name__ == "PackedLinear" and m is not packed_head
        }
        assert kept == {layers_keep}, bound
        assert (packed_head.weight_io is not None) == head_keeps, bound
