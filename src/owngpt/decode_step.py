"""One decode step of a packed fp32 GPT-2 or LLaMA model on the CPU, without transformers' per-module Python.

What it is for: `owngpt.engine.Decoder` advances every row by one token per step; on a model that
`owngpt.decode_kernels.pack_for_decode` has packed (fp32, CPU, GPT-2 or LLaMA) it calls `DecodeStep` instead of the
model's forward. The step reads the same weights (the packed projections, the model's own embeddings and norms),
writes each layer's new key and value straight into the engine's preallocated KV buffers (`engine._SlotCache`) and
attends over them; the logits equal the model's forward up to the order of the sums (tests/test_decode_kernels.py:
greedy tokens equal the unpacked model's, per-step logits equal a fresh forward over the window).

Why by hand: at batch 1 a step is 49 matrix-vector products (gpt2 size) and, around them, transformers' forward:
per-layer modules, a Cache object per step, attention masks built for any shape, the attention dispatch and output
dataclasses. All of that is Python per token. Measured on the 2-core target CPU (shared with other work, so ratios of
interleaved runs, medians; /tmp-free reproduction: bench/bench_decode.py's fp32 rows), the engine with this step vs
the engine with transformers' forward on the same packed weights: gpt2 size 1.15x at batch 1 (one thread and two),
1.06x at batch 8; `small` preset 1.12x (batch 1) and 1.22x (batch 8); `tiny` 1.49x and 1.32x (one thread). At
`tiny` size the step is now 2/3 matrix products (the LM head most of it).

What it is not: prefill (a prompt, a window re-fill) stays on the model's forward, whose cache the engine copies
into its buffers; beam search stays with transformers' `generate`; other architectures, int8 models, unpacked
models and GPT-2 options it does not implement (cross-attention, per-layer attention scaling, upcast attention)
keep the model's forward (`decode_step_for` returns None).
"""

from __future__ import annotations

from typing import Any

from owngpt.decode_kernels import PACKABLE_MODEL_TYPES


def decode_step_for(model: Any) -> DecodeStep | None:
    """A `DecodeStep` over `model`'s weights, or None when the model keeps its own forward (see the module doc)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in PACKABLE_MODEL_TYPES or model.training:
        return None
    # every projection packed (fp32 on the CPU, owngpt.decode_kernels): nothing else is read by the step
    if not any(type(m).__name__ == "PackedLinear" for m in model.modules()):
        return None
    if any(isinstance(m, _plain_linears()) for m in model.modules()):
        return None
    if kind == "gpt2":
        if (
            getattr(cfg, "add_cross_attention", False)
            or getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
            or getattr(cfg, "reorder_and_upcast_attn", False)
        ):
            return None
        return _GPT2Step(model)
    return _LlamaStep(model)


def _plain_linears() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


class DecodeStep:
    """step(ids, pos, keys, values, rows, length, valid_from) -> logits (rows, V).

    ids, pos: (B,) the last token of each row and its position in the window. keys/values: per layer the engine's
    buffers (B_cap, H_kv, L_cap, D); columns [0, length) hold the rows' cached tokens, column `length` receives this
    step's. valid_from: None when every row's cache fills all `length` columns, else (B,) the first valid column of
    each row (its tokens are right-aligned; the columns on the left are padding and are masked).
    """

    def __call__(
        self, ids: Any, pos: Any, keys: list[Any], values: list[Any], rows: int, length: int, valid_from: Any
    ) -> Any:
        raise NotImplementedError


def _attend(q: Any, k: Any, v: Any, mask: Any, scale: float) -> Any:
    """softmax(q k^T * scale + mask) v for one query row per sequence: q (B, H, 1, D), k and v (B, H_kv, L, D)."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class _GPT2Step(DecodeStep):
    def __init__(self, model: Any) -> None:
        import torch.nn.functional as F

        t = model.transformer
        cfg = model.config
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.eps = cfg.layer_norm_epsilon
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.layers = [
            (
                (b.ln_1.weight, b.ln_1.bias),
                _linear(b.attn.c_attn),
                _linear(b.attn.c_proj),
                (b.ln_2.weight, b.ln_2.bias),
                _linear(b.mlp.c_fc),
                _linear(b.mlp.c_proj),
            )
            for b in t.h
        ]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        self.head = _linear(model.lm_head)
        act = cfg.activation_function
        # gelu_new (GPT-2's) is the tanh approximation written as seven tensor ops; oneDNN applies the same function
        # to the c_fc product as it writes it (a post-op: no second pass over the activations, no extra op call),
        # equal to ~1e-7 (checked against the model's forward by the tests)
        self.fused_act: tuple[str, str] | None = None
        if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            self.fused_act = ("gelu", "tanh")
        elif act == "gelu":
            self.fused_act = ("gelu", "none")
        self.act = t.h[0].mlp.act
        self.F, self.lp = F, _linear_pointwise()

    def __call__(self, ids, pos, keys, values, rows, length, valid_from):
        F, lp = self.F, self.lp
        B, H, D = rows, self.n_head, self.head_dim
        C = H * D
        eps, fused = self.eps, self.fused_act
        mask = _padding_mask(valid_from, length)
        h = F.embedding(ids, self.wte) + F.embedding(pos, self.wpe)  # (B, C)
        for i, (ln1, c_attn, c_proj, ln2, c_fc, m_proj) in enumerate(self.layers):
            a = F.layer_norm(h, (C,), ln1[0], ln1[1], eps)
            qkv = lp(a, *c_attn, "none", [], "").view(B, 3, H, 1, D)  # (B, 3C): q, k, v of every head
            k_buf, v_buf = keys[i], values[i]
            k_buf[:B, :, length : length + 1] = qkv[:, 1]
            v_buf[:B, :, length : length + 1] = qkv[:, 2]
            o = _attend(qkv[:, 0], k_buf[:B, :, : length + 1], v_buf[:B, :, : length + 1], mask, self.scale)
            h = h + lp(o.view(B, C), *c_proj, "none", [], "")
            m = F.layer_norm(h, (C,), ln2[0], ln2[1], eps)
            if fused is not None:
                m = lp(m, *c_fc, fused[0], [], fused[1])
            else:
                m = self.act(lp(m, *c_fc, "none", [], ""))
            h = h + lp(m, *m_proj, "none", [], "")
        h = F.layer_norm(h, (C,), self.ln_f[0], self.ln_f[1], eps)
        return lp(h, *self.head, "none", [], "")


def _linear(module: Any) -> tuple[Any, Any]:
    """A PackedLinear's (packed weight, bias), for calling the kernel without the module call around it."""
    return module.packed, module.bias


def _linear_pointwise() -> Any:
    """oneDNN's linear on a packed weight: y = post_op(x W^T + b) (what PackedLinear.forward calls)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise


class _LlamaStep(DecodeStep):
    def __init__(self, model: Any) -> None:
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = model.model
        cfg = model.config
        self.embed = m.embed_tokens.weight
        self.rotary = m.rotary_emb
        self.rope = apply_rotary_pos_emb
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.layers = [
            (
                (b.input_layernorm.weight, b.input_layernorm.variance_epsilon),
                _linear(b.self_attn.q_proj),
                _linear(b.self_attn.k_proj),
                _linear(b.self_attn.v_proj),
                _linear(b.self_attn.o_proj),
                (b.post_attention_layernorm.weight, b.post_attention_layernorm.variance_epsilon),
                _linear(b.mlp.gate_proj),
                _linear(b.mlp.up_proj),
                _linear(b.mlp.down_proj),
            )
            for b in m.layers
        ]
        self.norm = (m.norm.weight, m.norm.variance_epsilon)
        self.head = _linear(model.lm_head)
        # SiLU (LLaMA's) applied by oneDNN to the gate product as it writes it ("swish", equal to ~1e-6 relative)
        self.fused_act = getattr(cfg, "hidden_act", None) == "silu"
        self.act = m.layers[0].mlp.act_fn
        self.F, self.lp = F, _linear_pointwise()

    def __call__(self, ids, pos, keys, values, rows, length, valid_from):
        F, lp = self.F, self.lp
        B, H, Hkv, D = rows, self.n_head, self.n_kv, self.head_dim
        mask = _padding_mask(valid_from, length)
        h = F.embedding(ids, self.embed)  # (B, C)
        cos, sin = self.rotary(h, pos.view(B, 1))  # (B, 1, D): the model's own rotary table (its RoPE scaling)
        for i, (n1, q_proj, k_proj, v_proj, o_proj, n2, gate, up, down) in enumerate(self.layers):
            a = _rms_norm(h, *n1)
            q = lp(a, *q_proj, "none", [], "").view(B, H, 1, D)
            k = lp(a, *k_proj, "none", [], "").view(B, Hkv, 1, D)
            q, k = self.rope(q, k, cos, sin)
            k_buf, v_buf = keys[i], values[i]
            k_buf[:B, :, length : length + 1] = k
            v_buf[:B, :, length : length + 1] = lp(a, *v_proj, "none", [], "").view(B, Hkv, 1, D)
            o = _attend(q, k_buf[:B, :, : length + 1], v_buf[:B, :, : length + 1], mask, self.scale)
            h = h + lp(o.view(B, H * D), *o_proj, "none", [], "")
            m = _rms_norm(h, *n2)
            g = lp(m, *gate, "swish", [], "") if self.fused_act else self.act(lp(m, *gate, "none", [], ""))
            h = h + lp(g * lp(m, *up, "none", [], ""), *down, "none", [], "")
        return lp(_rms_norm(h, *self.norm), *self.head, "none", [], "")


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """LlamaRMSNorm's arithmetic (fp32 throughout here)."""
    import torch

    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _padding_mask(valid_from: Any, length: int) -> Any:
    """None, or a boolean (B, 1, 1, length + 1) mask: row b attends to columns valid_from[b] .. length."""
    if valid_from is None:
        return None
    import torch

    cols = torch.arange(length + 1, device=valid_from.device)
    return (cols.unsqueeze(0) >= valid_from.unsqueeze(1)).view(len(valid_from), 1, 1, length + 1)
