"""Int8 quantization of a causal LM for CPU inference: the `int8` export and how such a checkpoint loads back.

What is quantized: every projection (transformers' GPT-2 `Conv1D` and every `nn.Linear`, the LM head included) gets
int8 weights with one fp32 scale per output channel (symmetric, round-to-nearest); at run time the activations are
quantized to int8 per call (dynamic quantization), so the matrix products run in int8 with int32 accumulation.
Embeddings, layer norms and biases stay fp32, except that a *tied* token embedding is stored once as the LM head's
int8 matrix and its rows are dequantized on lookup (the tie survives, the file is ~4x smaller).

Why this kernel (`Int8Linear`: torch's `quantized::linear_dynamic` op, fbgemm, called directly): measured on the
2-core CPU we target (AMD EPYC with AVX512-VNNI and AVX512-BF16, no AMX), one thread, on a shared machine, so ratios
within one run. `python bench/bench_int8_kernels.py` times the 49 projections of one gpt2-size decode step (48 layer
matrices + the 50257 x 768 LM head) with every int8 kernel torch 2.13's CPU build offers, on the same int8 weights: at
batch 1 the fbgemm op took 4.69 ms (fastest of 41 runs) where merely reading every int8 weight once took 3.89 (83% of
that ceiling; DynamicLinear's module 4.83); against DynamicLinear (median of 15), the onednn quantized engine ran at
0.67x, `onednn.qlinear_pointwise` with a prepacked weight (inductor's op) 0.59x, `_weight_int8pack_mm` 0.56x with bf16
activations and 0.06x with fp32 ones, `torch._int_mm` with activations quantized by hand 0.39x, fp32 oneDNN (owngpt's
fp32 kernel) 0.29x; at batch 8 the fbgemm op was again fastest (onednn 0.78x, qlinear 0.84x, the rest 0.55x or less).
The LM head, the largest matrix (31% of the int8 bytes), runs at about 80% of its read ceiling (1.25-1.35 ms vs
1.03-1.08); the tied embedding costs one dequantized row per token. torchao 0.18's eager int8 configs were 3-4x
*slower* than fp32 (fast only under torch.compile, minutes per start). End to end (the engine, `generate_batch`, same
run): calling the op directly instead of DynamicLinear's module decoded 1.02-1.06x faster at batch 1 and 1.03-1.22x at
batch 8 (two runs, one on a quieter machine). Activations are quantized to 8 bits where the CPU has VNNI
(`_reduce_range`; DynamicLinear always uses 7), which halves their rounding error; perplexity on the bundled Tiny
Shakespeare (bench/bench_optimize.py's small model, 300 steps) moved +0.061% from fp32 with 8 bits and +0.074% with 7
(the bound is +2%).
Where batch-1 time goes: in a profile of the engine's int8 decode the int8 op is about 70% of the time spent in torch
ops, and transformers' per-module Python adds more around them. Without it (`python bench/bench_int8_kernels.py
--decode`: a GPT-2 step written by hand over the same `Int8Linear.kernel()` callables, static KV buffers) batch-1 int8
decoded 1.28-1.54x faster than through the model's forward, at 0.97-1.25x llama.cpp q8_0's tokens/s in the same runs
(the forward: 0.71-0.81x; on the quietest run 1.02x vs 0.77x, and at batch 8 2.67x vs 2.54x). `kernel(one_row, post)`
keeps the contract of owngpt.decode_kernels' `PackedLinear.kernel`, so a decode step written for packed fp32 models
(owngpt.decode_step) can call the int8 projections as they are; the int8 embedding has no fp32 `.weight` and is looked
up through its module (`wte(ids)`).
`torch.ao.quantization` is marked deprecated in favour of torchao, so the kernel choice lives in one function
(`_int8_linear`): when torchao's eager CPU path is fast, swap it there.
The GPT-2 `Conv1D` -> `nn.Linear` transposition is what lets every projection, not only the LM head, be quantized.

Format of an int8 checkpoint dir (no pickles; owngpt loads it through `owngpt.checkpoint.load_model`):

    config.json generation_config.json tokenizer files [chat_template.jinja]   as in any checkpoint
    model.safetensors   for each quantized module M: `M.weight` int8 [out, in] (nn.Linear layout, Conv1D transposed),
                        `M.weight_scale` fp32 [out], `M.bias` fp32 (if any); every other tensor fp32 under its usual
                        name; a tied embedding E is stored as `E.weight` int8 + `E.weight_scale`
    owngpt.json         {"quantization": {"method": "int8-dynamic", "modules": [...], "tied_embedding": E | null, ...}}

Plain transformers cannot load this directory (its weights are int8 + scales); `owngpt export --to hf` gives fp32.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

from owngpt.checkpoint_files import load_config, write_meta
from owngpt.errors import CheckpointError
from owngpt.native_kernels import native_gemv
from owngpt.outdir import CHECKPOINT, replacing

METHOD = "int8-dynamic"
FORMAT_VERSION = 1
SCALE_SUFFIX = "_scale"


def _is_projection(module: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _linear_weight(module: Any):
    """The weight in nn.Linear layout [out, in]; GPT-2's Conv1D stores [in, out]."""
    from transformers.pytorch_utils import Conv1D

    w = module.weight.detach()
    return w.t().contiguous() if isinstance(module, Conv1D) else w


def quantize_weight(w) -> tuple[Any, Any]:
    """Symmetric per-output-channel int8: (int8 [out, in], fp32 scale [out]); w ~= q * scale[:, None]."""
    import torch

    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _tied_embedding(model: Any) -> tuple[str, Any] | None:
    """(name, module) of the input embedding when the output head shares its weight, else None."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    name = next(n for n, m in model.named_modules() if m is inp)
    return name, inp


def quantize_state_dict(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors of the int8 checkpoint format (see module docstring) and the owngpt.json `quantization` entry."""
    tensors: dict[str, Any] = {}
    modules: list[str] = []
    tied = _tied_embedding(model)
    head = model.get_output_embeddings()
    handled: set[str] = set()
    for name, mod in model.named_modules():
        if not _is_projection(mod):
            continue
        if tied is not None and mod is head:
            continue  # stored once, under the embedding's name
        q, s = quantize_weight(_linear_weight(mod))
        tensors[f"{name}.weight"], tensors[f"{name}.weight{SCALE_SUFFIX}"] = q, s
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().float().contiguous()
        modules.append(name)
        handled.update({f"{name}.weight", f"{name}.bias"})
    if tied is not None:
        ename, emb = tied
        q, s = quantize_weight(emb.weight)
        tensors[f"{ename}.weight"], tensors[f"{ename}.weight{SCALE_SUFFIX}"] = q, s
        handled.add(f"{ename}.weight")
    head_name = None if head is None else next(n for n, m in model.named_modules() if m is head)
    for k, v in model.state_dict().items():
        if k in handled or (tied is not None and head_name and k.startswith(head_name + ".")):
            continue
        tensors[k] = v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
    info = {
        "method": METHOD,
        "version": FORMAT_VERSION,
        "weights": "int8, symmetric, one scale per output channel",
        "activations": "int8, dynamic (quantized per call at run time)",
        "kernel": "torch dynamic quantized linear (fbgemm/x86)",
        "modules": modules,
        "tied_embedding": tied[0] if tied else None,
        "output_head": head_name,
    }
    return tensors, info


def _embedding_class():
    import torch

    class _Int8Embedding(torch.nn.Module):
        """Token embedding whose rows are int8 + per-row scale (shared with the int8 LM head); dequantized on lookup."""

        def __init__(self, q, scale):
            super().__init__()
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", scale)
            self.num_embeddings, self.embedding_dim = q.shape

        def forward(self, ids):  # (B, T) -> (B, T, C)
            return self.weight_int8[ids].float() * self.weight_scale[ids].unsqueeze(-1)

    return _Int8Embedding


@functools.cache  # one class, so that isinstance works across models
def _int8_linear_class():
    import torch

    class Int8Linear(torch.nn.Module):
        """y = x @ (q * scale).T + bias through torch's dynamic int8 linear op, called directly (see module doc), and
        at one row of a decode step through owngpt's own int8 kernel where it builds.

        The weights live packed for fbgemm in `packed` (torch's LinearPackedParams object, a plain attribute: not a
        parameter or buffer, so state_dict() and .to() never see it; int8 models are for inference). `kernel()` gives
        the bare op as a plain callable, for a hand-written decode step.

        One row (`kernel(one_row=True)` called with one row: owngpt.decode_step at batch 1): owngpt's int8
        matrix-vector kernel (owngpt.native_kernels, native_gemv_int8.cpp) on its own blocked copy of q (+1 byte a
        weight, +124 MB at gpt2 size), with the activation quantized per block of 32 columns (llama.cpp's q8_0
        activations; fbgemm's one scale per call is coarser where a few channels are outliers). Measured against
        fbgemm's op at one row (gpt2 size, bench/bench_decode_step.py --int8, paired ratios on a shared 2-core AVX2
        machine): the 49 products 1.21x as fast on one thread, 1.98x on two; the whole decode step 1.11x / 1.12x.
        Perplexity on the bundled Tiny Shakespeare's validation split (8192 tokens; the `tiny` shape trained 300
        steps, char vocabulary), every row of every projection through the kernel: +0.002% from fp32, as fbgemm's.
        Everything else (the module's forward: prompts, batches, evaluation and perplexity; a machine without the
        kernel, OWNGPT_NATIVE_KERNELS=0) keeps fbgemm's op, so evaluation numbers do not depend on the kernel."""

        def __init__(self, q: Any, scale: Any, bias: Any) -> None:
            super().__init__()
            self.out_features, self.in_features = q.shape
            # the packed weight is no torch parameter, so parameter counts miss it: its size, under the name
            # PackedLinear uses for the same purpose (owngpt.decode_kernels.parameter_count)
            self.weight_numel = q.numel()
            self.packed = _prepack(q, scale, bias)
            self.reduce_range = _reduce_range()
            # owngpt's one-row int8 kernel with its copies (plain attributes, as `packed`), or None where it is off
            native = _native_int8()
            self.native = native
            self.native_packed = native.pack_int8(q) if native is not None else None
            self.native_scale = scale.detach().float().contiguous() if native is not None else None
            self.native_bias = None if native is None or bias is None else bias.detach().float().contiguous()

        def forward(self, x: Any) -> Any:  # (..., in) -> (..., out)
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)

        def kernel(self, one_row: bool = False, post: tuple[str, str] = ("none", "")) -> Any:
            """A callable (B, in) -> (B, out) computing post(x @ (q * scale).T + b), for a hand-written decode step:
            the same contract as owngpt.decode_kernels' PackedLinear.kernel (post is a oneDNN post-op name: none,
            gelu with "tanh" or "none", swish). With `one_row` and owngpt's int8 kernel available, a call with one
            row goes through that kernel, one with several through fbgemm's op (the module's forward)."""
            op, packed, rr = torch.ops.quantized.linear_dynamic, self.packed, self.reduce_range
            act = _post_op(post)
            if act is None:
                batch = lambda x: op(x, packed, rr)  # noqa: E731
            else:
                batch = lambda x: act(op(x, packed, rr))  # noqa: E731
            if not one_row or self.native_packed is None:
                return batch
            row = self.native.kernel_int8(
                self.native_packed, self.native_scale, self.out_features, self.in_features, self.native_bias, post
            )
            return lambda x: row(x) if x.shape[0] == 1 else batch(x)

        def weight(self) -> Any:
            """The int8 weight as a quantized per-channel tensor [out, in] (what DynamicLinear.weight() gives)."""
            return self.packed.unpack()[0]

        def extra_repr(self) -> str:
            native = f", owngpt's {self.native.isa_int8} kernel at one row" if self.native is not None else ""
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 (fbgemm, dynamic){native}"

    return Int8Linear


def _native_int8() -> Any:
    """owngpt's native kernels (owngpt.native_kernels) where their int8 product runs on this CPU, else None."""

    native = native_gemv()
    return native if native is not None and native.int8_level > 0 else None


def _post_op(post: tuple[str, str]) -> Any:
    """The activation a decode step asks a kernel to apply to its product (None: nothing)."""
    import torch.nn.functional as F

    ops = {
        ("none", ""): None,
        ("gelu", "tanh"): lambda y: F.gelu(y, approximate="tanh"),
        ("gelu", "none"): F.gelu,
        ("swish", ""): F.silu,
    }
    if post not in ops:
        raise ValueError(f"post-op {post!r} is not one of {sorted(ops)}")
    return ops[post]


def _reduce_range() -> bool:
    """Whether activations must be quantized to 7 bits instead of 8: on a CPU without AVX512-VNNI fbgemm multiplies
    uint8 x int8 pairs with vpmaddubsw, whose 16-bit sums saturate (255 * 127 * 2 > 32767); with AVX512-VNNI
    (vpdpbusd, 32-bit sums) all 8 bits are safe and halve the activation rounding error (measured by
    bench/bench_int8_kernels.py: largest error 1.0e-2 vs 2.5e-2 of the largest output; tests/test_quantize.py checks
    the full-range case). DynamicLinear always reduces."""
    import torch

    # torch's helper checks AVX512-VNNI only (its note says so); private, so absent means "do not assume VNNI"
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return not (vnni is not None and vnni() and torch.backends.quantized.engine in ("x86", "fbgemm"))


def _prepack(q: Any, scale: Any, bias: Any) -> Any:
    """fbgemm's packed form of int8 weights q [out, in] with per-row fp32 scales (and an fp32 bias or None)."""
    import torch

    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (see module doc)
        warnings.simplefilter("ignore")
        # torch's public constructor quantizes floats: q * scale divided by scale rounds back to q exactly (the error
        # is far below half a step); checked, since a changed weight would be silent
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch.quantize_per_channel(q.float() * scale.float()[:, None], scale.double(), zero, 0, torch.qint8)
        if not torch.equal(qw.int_repr(), q.to(torch.int8)):  # pragma: no cover - a guard, never seen
            raise RuntimeError("int8 weights changed when quantized again: please report this")
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float().contiguous())


def _int8_linear(q, scale, bias):
    """A module computing x @ (q * scale).T + bias with int8 matmuls (the one place the kernel is chosen)."""
    return _int8_linear_class()(q, scale, bias)


def _set_module(model: Any, name: str, new: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def build_quantized_model(config: Any, tensors: dict[str, Any], info: dict[str, Any], task: str = "lm"):
    """Rebuild the int8 model from the checkpoint tensors: the architecture from config, then int8 modules swapped in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    with torch.device("meta"):  # no time or memory spent on a random init that is overwritten anyway
        model = cls.from_config(config, dtype=torch.float32)
    model.eval()
    tensors = dict(tensors)
    quantized: dict[str, Any] = {}
    for name in info["modules"]:
        try:
            quantized[name] = (
                tensors.pop(f"{name}.weight"),
                tensors.pop(f"{name}.weight{SCALE_SUFFIX}"),
                tensors.pop(f"{name}.bias", None),
            )
        except KeyError as e:
            raise CheckpointError(f"int8 checkpoint lacks tensor {e} listed in owngpt.json: it is incomplete") from e
    ename = info.get("tied_embedding")
    if ename:
        tied = tensors.pop(f"{ename}.weight"), tensors.pop(f"{ename}.weight{SCALE_SUFFIX}")
    # fp32 tensors first, while every module is still the original class (the int8 modules load differently)
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"int8 checkpoint has tensors the model does not: {unexpected[:5]}")
    for name, (q, s, b) in quantized.items():
        _set_module(model, name, _int8_linear(q, s, b))
    if ename:
        _set_module(model, ename, _embedding_class()(*tied))
        head = info.get("output_head")
        if head:  # the head reuses the same int8 matrix (the tie), as a dynamic int8 linear
            _set_module(model, head, _int8_linear(*tied, None))
    # buffers computed at init and never saved (LLaMA's rotary `inv_freq`) are still on the meta device: build
    # those modules again from the config, on the CPU
    for mname, mod in list(model.named_modules()):
        if any(b.is_meta and n in mod._non_persistent_buffers_set for n, b in mod.named_buffers(recurse=False)):
            _set_module(model, mname, type(mod)(config=config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"int8 checkpoint lacks tensors {left[:5]}: it is incomplete or from another model")
    return model


def quantize_model(model: Any):
    """In-memory int8 copy of a loaded fp32 model (same result as saving and loading the int8 checkpoint)."""
    tensors, info = quantize_state_dict(model)
    return build_quantized_model(model.config, tensors, info)


def load_quantized(path: str | os.PathLike, info: dict[str, Any], task: str = "lm", config: Any = None):
    """Load an int8 checkpoint dir (called by owngpt.checkpoint.Checkpoint.model when owngpt.json says so);
    `config`: its config.json as transformers read it (read here when not given)."""
    from safetensors.torch import load_file

    p = Path(path)
    if info.get("method") != METHOD:
        raise CheckpointError(
            f"{p}/owngpt.json: quantization method {info.get('method')!r} is not supported (owngpt writes {METHOD!r})"
        )
    if config is None:
        config = load_config(p)
    try:
        tensors = load_file(str(p / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}/model.safetensors cannot be read: {e}") from e
    return build_quantized_model(config, tensors, info, task=task)


def save_quantized(model: Any, tokenizer: Any, out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write the int8 checkpoint dir atomically (aside, then swapped in) from a loaded fp32 model. An existing
    `out_dir` is replaced only when it is an owngpt checkpoint (owngpt.outdir): never a user's folder."""
    from safetensors.torch import save_file

    tensors, info = quantize_state_dict(model)
    meta = {**meta, "quantization": info}
    with replacing(out_dir, kind=CHECKPOINT, overwrite=True, create=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "owngpt": METHOD})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_meta(tmp, meta)
    return Path(out_dir)
