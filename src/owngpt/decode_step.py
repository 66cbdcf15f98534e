"""One decode step of a packed fp32 GPT-2 or LLaMA model on the CPU, without transformers' per-module Python.

What it is for: `owngpt.engine.Decoder` advances every row by one token per step; on a model that
`owngpt.decode_kernels.pack_for_decode` has packed (fp32, CPU, GPT-2 or LLaMA) it calls `DecodeStep` instead of the
model's forward. The step reads the same weights (the packed projections, the model's own embeddings and norms),
writes each layer's new key and value straight into the engine's preallocated KV buffers (`engine._SlotCache`) and
attends over them; the logits equal the model's forward up to the order of the sums (tests/test_decode_kernels.py:
greedy tokens equal the unpacked model's, per-step logits equal a fresh forward over the window).

Why by hand: at batch 1 a step is 49 matrix-vector products (gpt2 size) and, around them, transformers' forward:
per-layer modules, a Cache object per step, attention masks built for any shape, the attention dispatch and output
dataclasses, all Python per token. Measured on the 2-core target CPU (shared with other work: ratios of interleaved
runs, medians; one thread):
- the step alone (bench/bench_decode_step.py), this step vs transformers' forward on the same packed weights and
  cache: gpt2 size 14.6 vs 16.7 ms on one thread, 11.8 vs 13.6 on two (quiet machine; the products alone take 13.9
  and 11.1, llama.cpp's whole step 13.2 and 10.6: see owngpt.decode_kernels for that ceiling), `small` 2.1 vs
  3.3 ms, `tiny` (char vocabulary) 0.30 vs 1.98 ms;
- the engine end to end, greedy, 200 tokens, char vocabulary: `tiny` 3984 tokens/s vs 933 before this step (packed
  weights through transformers' forward) and 1209 on the unpacked model; batch 8: 11782 vs 5115; `small` 488 vs 304;
  gpt2 size (GPT-2 vocabulary, 64 tokens) 1.15x at batch 1, 1.06x at batch 8; LLaMA `tiny` 2965 vs 839 (1199
  unpacked), `small` about 1.5x (542 vs 369 before the RoPE table and fused RMSNorm, which gave 1.21x at `tiny`,
  1.03x at `small`).
int8 models (owngpt.quantize's `Int8Linear`) go through the same step: their projections offer the same `.kernel()`
callable, and the int8 embedding is looked up through its module. At gpt2 size, one thread, shared machine: 6.4 vs
9.1 ms a step at batch 1 against transformers' forward over the same int8 modules (bench/bench_int8_kernels.py
--decode); one row's logits equal that forward's exactly on fbgemm's op, and within a rounding step where the step
calls owngpt's one-row int8 kernel (owngpt.native_kernels; tests/test_decode_kernels.py bounds both).
Where owngpt's native library is built (owngpt.native_kernels), each block goes further: one call into
native_block.cpp (norms, the products on the native kernel, the KV writes, RoPE, attention, GELU / SiLU in C) for
the batches the native kernel serves (`_NativeGPT2Blocks`, `_NativeLlamaBlocks`; LLaMA only inside its RoPE table).
Measured beside other work (one thread, paired): gpt2 size, the step 1.17x at batch 1 and 1.11x at batch 8 over
the Python blocks; the engine end to end on 4-layer, 128-dim char models (greedy, 200 tokens): GPT-2 2.97x at
batch 1 and 1.99x at batch 8, LLaMA 3.77x and 2.07x (bench/bench_native_block.py, docs/benchmarks.md). int8
models too, at one row (their products through the int8 kernel; batches keep fbgemm): gpt2 size, the step 1.40x.
When every row of a step reads only its k largest logits (greedy: 1; top-k sampling without penalties: k; the
engine says so), the LM head is read from an fp16 copy and only the tokens that can be among them are recomputed in
fp32 (owngpt.greedy_head): bitwise the fp32 head's values there, for half the head's bytes (154 of the 494 MB a
`gpt2`-size step reads are the head).
What did not pay and is not here: torch.compile of the step (see owngpt.decode_kernels: 38 s to the first token, no
gain).

What it is not: prefill (a prompt, a window re-fill) stays on the model's forward, whose cache the engine copies
into its buffers; beam search stays with transformers' `generate`; other architectures, unpacked models and
GPT-2 options it does not implement (cross-attention, per-layer attention scaling, upcast attention)
keep the model's forward (`decode_step_for` returns None).
"""

from __future__ import annotations

from typing import Any

from owngpt.decode_kernels import PACKABLE_MODEL_TYPES
from owngpt.greedy_head import greedy_head_for
from owngpt.native_kernels import Product


def decode_step_for(model: Any) -> DecodeStep | None:
    """A `DecodeStep` over `model`'s weights, or None when the model keeps its own forward (see the module doc)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    base = getattr(model, "transformer" if kind == "gpt2" else "model", None)
    if kind not in PACKABLE_MODEL_TYPES or model.training or base is None or not hasattr(model, "lm_head"):
        return None  # not a causal LM of a known layout (a classifier, a wrapper) or not in eval mode
    # every projection packed (fp32 on the CPU, owngpt.decode_kernels) or int8 (owngpt.quantize's Int8Linear): both
    # give the step a plain callable per projection (`.kernel()`), nothing else is read by the step
    if not any(type(m).__name__ in STEP_KERNEL_MODULES for m in model.modules()):
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


# the projection modules whose `.kernel(one_row, post)` the step calls: owngpt.decode_kernels' packed fp32 ones and
# owngpt.quantize's int8 ones (the same contract)
STEP_KERNEL_MODULES = frozenset({"PackedLinear", "Int8Linear"})


def _embedding(module: Any) -> Any:
    """ids (B,) -> rows (B, C): F.embedding on an fp32 table (no module call per step), else the module itself (an
    int8 embedding has no fp32 `.weight`; its forward dequantizes the rows it looks up)."""
    import torch
    import torch.nn.functional as F

    if isinstance(module, torch.nn.Embedding):
        weight = module.weight
        return lambda ids: F.embedding(ids, weight)
    return module


def _plain_linears() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


class DecodeStep:
    """step(ids, pos, keys, values, rows, length, valid_from) -> logits (rows, V).

    ids, pos: (B,) the last token of each row and its position in the window. keys/values: per layer the engine's
    buffers (B_cap, H_kv, L_cap, D); columns [0, length) hold the rows' cached tokens, column `length` receives this
    step's. valid_from: None when every row's cache fills all `length` columns, else (B,) the first valid column of
    each row (its tokens are right-aligned; the columns on the left are padding and are masked). top_k: k >= 1 when
    every row reads only its k largest logits (1: greedy); the step may then return logits exact at the tokens that
    can be among them and -inf elsewhere (owngpt.greedy_head). 0: the whole logits.
    """

    def __call__(
        self,
        ids: Any,
        pos: Any,
        keys: list[Any],
        values: list[Any],
        rows: int,
        length: int,
        valid_from: Any,
        top_k: int = 0,
    ) -> Any:
        raise NotImplementedError

    head: dict[bool, Any]  # the LM head's kernel for one row (True) and for several (False)
    greedy_head: Any = None  # owngpt.greedy_head.GreedyHead over the same head, where it pays
    greedy_rows = 0  # the most rows it takes: as many as the native kernel takes for the full head

    def _set_head(self, module: Any) -> None:
        self.head = {False: module.kernel(False), True: module.kernel(True)}
        self.greedy_head = greedy_head_for(module)
        native = getattr(module, "native", None)
        self.greedy_rows = native.batch_rows if self.greedy_head is not None and native is not None else 0

    def _head(self, rows: int, top_k: int) -> Any:
        """The head for this step: the screened one for a batch reading only its top k that the native kernel
        serves (its values there are then bitwise the full head's, which uses that kernel for those rows too), else
        the full fp32 head."""
        if top_k >= 1 and rows <= self.greedy_rows:
            screened = self.greedy_head
            return lambda x: screened(x, top_k)
        return self.head[rows == 1]


def _attend(q: Any, k: Any, v: Any, mask: Any, scale: float) -> Any:
    """softmax(q k^T * scale + mask) v for one query row per sequence: q (B, H, 1, D), k and v (B, H_kv, L, D).

    Several rows with as many key heads as query heads: two matmuls and a softmax, measured faster here than SDPA's
    CPU kernel (8 rows, 12 heads of 64, one thread: 41 vs 48 us at 32 cached tokens, 241 vs 266 at 256, 3.3 vs 4.8 ms
    at 1024); one row, or grouped-query heads: SDPA (8 vs 13 us at 32 tokens, even at 1024)."""
    import torch
    import torch.nn.functional as F

    if q.shape[0] > 1 and k.shape[1] == q.shape[1]:
        w = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, 1, L)
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(w, dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class _GPT2Step(DecodeStep):
    def __init__(self, model: Any) -> None:
        import torch.nn.functional as F

        t = model.transformer
        cfg = model.config
        self.F = F
        self.tokens = _embedding(t.wte)  # fp32 table, or the int8 model's rows dequantized on lookup
        self.wpe = t.wpe.weight
        self.eps = cfg.layer_norm_epsilon
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.ln = [((b.ln_1.weight, b.ln_1.bias), (b.ln_2.weight, b.ln_2.bias)) for b in t.h]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        # gelu_new (GPT-2's) is the tanh approximation written as seven tensor ops; here the kernel applies the same
        # function to the c_fc product (oneDNN as a post-op, as it writes it), equal to ~1e-7 (the tests check the
        # logits against the model's forward)
        fused = {"gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}
        post = fused.get(cfg.activation_function)
        act = t.h[0].mlp.act

        def kernels(one_row: bool) -> list[tuple[Any, ...]]:
            out = []
            for b in t.h:
                if post is not None:
                    fc = b.mlp.c_fc.kernel(one_row, post)
                else:
                    fc = _then(b.mlp.c_fc.kernel(one_row), act)
                out.append(
                    (b.attn.c_attn.kernel(one_row), b.attn.c_proj.kernel(one_row), fc, b.mlp.c_proj.kernel(one_row))
                )
            return out

        # the kernels for one row and for several (owngpt.decode_kernels.PackedLinear.kernel)
        self.layers = {False: kernels(False), True: kernels(True)}
        self._set_head(model.lm_head)
        self.native_block = _NativeGPT2Blocks.of(model)  # each block in one native call, where it can be

    def __call__(self, ids, pos, keys, values, rows, length, valid_from, top_k=0):
        F = self.F
        B, H, D = rows, self.n_head, self.head_dim
        C = H * D
        eps = self.eps
        h = self.tokens(ids) + F.embedding(pos, self.wpe)  # (B, C)
        blocks = self.native_block
        if blocks is not None and B <= blocks.max_rows:
            blocks(h, keys, values, B, length, valid_from)
            return self._head(B, top_k)(F.layer_norm(h, (C,), self.ln_f[0], self.ln_f[1], eps))
        mask = _padding_mask(valid_from, length)
        for i, ((ln1, ln2), (c_attn, c_proj, c_fc, m_proj)) in enumerate(zip(self.ln, self.layers[B == 1])):
            qkv = c_attn(F.layer_norm(h, (C,), ln1[0], ln1[1], eps)).view(B, 3, H, 1, D)  # q, k, v of every head
            k_buf, v_buf = keys[i], values[i]
            k_buf[:B, :, length : length + 1] = qkv[:, 1]
            v_buf[:B, :, length : length + 1] = qkv[:, 2]
            o = _attend(qkv[:, 0], k_buf[:B, :, : length + 1], v_buf[:B, :, : length + 1], mask, self.scale)
            h = h + c_proj(o.view(B, C))
            h = h + m_proj(c_fc(F.layer_norm(h, (C,), ln2[0], ln2[1], eps)))
        return self._head(B, top_k)(F.layer_norm(h, (C,), self.ln_f[0], self.ln_f[1], eps))


class _NativeGPT2Blocks:
    """GPT-2's blocks through owngpt's native library, one call per block (native_block.cpp: the layer norms, the
    four products on the native kernel's packed weights, the KV writes, attention and GELU in C), for batches the
    native kernel serves (one row, or up to `NativeGemv.batch_rows`). Why: around its products the Python step made
    ~25 torch calls per block, dispatch time in which the memory bus idles (measured in docs/benchmarks.md, decode)."""

    @staticmethod
    def of(model: Any) -> _NativeGPT2Blocks | None:
        """The blocks of a packed GPT-2 whose every projection carries the native kernel's fp32 copy, else None
        (OWNGPT_NATIVE_KERNELS=0, no compiler, int8 models, an activation the C code does not have)."""
        t, cfg = model.transformer, model.config
        forms = {"gelu_new": 1, "gelu_pytorch_tanh": 1, "gelu": 0}
        if cfg.activation_function not in forms:
            return None
        projections = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in t.h]
        native = getattr(projections[0][0], "native", None)
        if native is None or not all(_native_product(m, native) for layer in projections for m in layer):
            return None
        return _NativeGPT2Blocks(model, native, forms[cfg.activation_function], projections)

    def __init__(self, model: Any, native: Any, gelu_tanh: int, projections: list[tuple[Any, ...]]) -> None:
        import torch

        t, cfg = model.transformer, model.config
        self.native, self.fn, self.torch = native, native.lib.owngpt_gpt2_block, torch
        self.C, self.H = cfg.n_embd, cfg.n_head
        self.inner = t.h[0].mlp.c_fc.out_features  # the MLP's width
        D = self.C // self.H
        self.scale = D**-0.5 if cfg.scale_attn_weights else 1.0
        self.eps, self.gelu_tanh = cfg.layer_norm_epsilon, gelu_tanh
        self.max_rows = _max_rows(native, projections)

        self.weights = []  # per block: what native_block.cpp reads, in its argument order
        self.keep_alive = []  # the tensors behind the pointers
        for b, mods in zip(t.h, projections):
            lns = [b.ln_1.weight, b.ln_1.bias, b.ln_2.weight, b.ln_2.bias]
            lns = [x.detach().float().contiguous() for x in lns]
            self.keep_alive.append(lns)
            self.weights.append(([_ptr(x) for x in lns], _products(native, mods)))

    def __call__(self, h: Any, keys: list[Any], values: list[Any], rows: int, length: int, valid_from: Any) -> None:
        """Every block, in place on h (rows, C) fp32 contiguous; keys/values: the engine's per-layer buffers."""
        torch = self.torch
        C, inner = self.C, self.inner
        threads = torch.get_num_threads()
        # the C code allocates nothing: its buffers, each thread's attention scores included, come from here
        scratch = torch.empty(rows * (5 * C + inner) + threads * (length + 1), dtype=torch.float32)
        valid_from = None if valid_from is None else valid_from.to(torch.int64).contiguous()  # alive for vf
        vf = _ptr(valid_from)
        level, level8 = self.native.level, self.native.int8_level
        hp, sp = h.data_ptr(), scratch.data_ptr()
        _check_buffers(keys, values, len(self.weights))
        for (lns, products), k, v in zip(self.weights, keys, values):
            self.fn(
                hp, rows, C, self.H, inner, *lns, self.eps, products, self.gelu_tanh,
                k.data_ptr(), v.data_ptr(), k.shape[2], length, vf, self.scale, sp, threads, level, level8,
            )  # fmt: skip


class _NativeLlamaBlocks:
    """LLaMA's blocks through owngpt's native library, one call per block (native_block.cpp: RMSNorm, the seven
    products on the native kernel, the rotary embedding from the step's table, grouped-query attention, SiLU, in C),
    for the batches the native kernel serves; as `_NativeGPT2Blocks` for GPT-2."""

    @staticmethod
    def of(model: Any, table: tuple[Any, Any]) -> _NativeLlamaBlocks | None:
        """The blocks of a packed LLaMA whose every projection carries the native kernel's fp32 copy, else None."""
        layers = model.model.layers
        if getattr(model.config, "hidden_act", None) != "silu":
            return None
        mods = [_llama_projections(b) for b in layers]
        native = getattr(mods[0][0], "native", None)
        if native is None or not all(_native_product(m, native) for layer in mods for m in layer):
            return None
        return _NativeLlamaBlocks(model, native, table, mods)

    def __init__(self, model: Any, native: Any, table: tuple[Any, Any], mods: list[tuple[Any, ...]]) -> None:
        import torch

        cfg, layers = model.config, model.model.layers
        self.native, self.fn, self.torch = native, native.lib.owngpt_llama_block, torch
        self.C = cfg.hidden_size
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or self.C // self.H
        self.inner = mods[0][4].out_features  # the MLP's width
        self.scale = self.D**-0.5
        self.max_rows = _max_rows(native, mods)
        self.table = tuple(t.detach().float().contiguous() for t in table)
        self.weights, self.keep_alive = [], []
        for b, projections in zip(layers, mods):
            n1, n2 = b.input_layernorm, b.post_attention_layernorm
            norms = [n1.weight.detach().float().contiguous(), n2.weight.detach().float().contiguous()]
            self.keep_alive.append(norms)
            eps = [float(n1.variance_epsilon), float(n2.variance_epsilon)]
            self.weights.append(([_ptr(x) for x in norms], eps, _products(native, projections)))

    def __call__(self, h: Any, keys: list[Any], values: list[Any], rows: int, length: int, valid_from: Any, pos: Any):
        """Every block, in place on h (rows, C) fp32; pos: (rows,) each row's position (inside the table)."""
        torch = self.torch
        C, qd, kvd, inner = self.C, self.H * self.D, self.Hkv * self.D, self.inner
        threads = torch.get_num_threads()
        # the C code allocates nothing: its buffers, each thread's attention scores included, come from here
        size = rows * (2 * C + 2 * qd + 2 * kvd + 2 * inner) + self.D + threads * (length + 1)
        scratch = torch.empty(size, dtype=torch.float32)
        pos = pos.to(torch.int64).contiguous()
        valid_from = None if valid_from is None else valid_from.to(torch.int64).contiguous()  # alive for vf
        vf = _ptr(valid_from)
        level, level8 = self.native.level, self.native.int8_level
        shape = (C, self.H, self.Hkv, self.D, inner)
        cos, sin = self.table[0].data_ptr(), self.table[1].data_ptr()
        hp, sp, pp = h.data_ptr(), scratch.data_ptr(), pos.data_ptr()
        _check_buffers(keys, values, len(self.weights))
        for (norms, eps, products), k, v in zip(self.weights, keys, values):
            self.fn(
                hp, rows, *shape, *norms, *eps, products, cos, sin, pp,
                k.data_ptr(), v.data_ptr(), k.shape[2], length, vf, self.scale, sp, threads, level, level8,
            )  # fmt: skip


def _llama_projections(block: Any) -> tuple[Any, ...]:
    a, m = block.self_attn, block.mlp
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)


def _native_product(module: Any, native: Any) -> tuple[Any, Any, Any] | None:
    """(packed weight, int8 scales or None, bias or None) of a projection carrying `native`'s copy of its weight:
    a packed fp32 one (owngpt.decode_kernels.PackedLinear) or an int8 one (owngpt.quantize.Int8Linear); else None."""
    if getattr(module, "native", None) is not native or getattr(module, "native_packed", None) is None:
        return None
    kind = type(module).__name__
    if kind == "PackedLinear":
        return module.native_packed, None, module.bias
    if kind == "Int8Linear":
        return module.native_packed, module.native_scale, module.native_bias
    return None


def _products(native: Any, projections: tuple[Any, ...]) -> Any:
    """The block's projections as native_block.cpp's array of OwngptProduct (it keeps the tensors alive)."""
    parts = [_native_product(m, native) for m in projections]
    array = (Product * len(parts))(*[Product(*(_ptr(x) for x in p)) for p in parts])
    array.keep_alive = parts  # the pointers are valid while these tensors live
    return array


def _max_rows(native: Any, projections: list[tuple[Any, ...]]) -> int:
    """The most rows the native blocks take: the fp32 kernel's batch rows; int8 projections, one row (their batches
    keep fbgemm: owngpt.quantize)."""
    int8 = any(type(m).__name__ == "Int8Linear" for layer in projections for m in layer)
    return 1 if int8 else max(1, native.batch_rows)


def _ptr(x: Any) -> int | None:
    return None if x is None else x.data_ptr()


def _check_buffers(keys: list[Any], values: list[Any], layers: int) -> None:
    """The C code indexes the KV buffers as contiguous fp32 (B_cap, heads, L_cap, D): the engine allocates every
    layer's alike (engine._SlotCache), so the first layer's stand for all (a check per layer cost ~1% of a step)."""
    import torch

    k, v = keys[0], values[0]
    if len(keys) != layers or len(values) != layers or k.shape != v.shape:
        raise ValueError(f"the native blocks need {layers} layers' KV buffers of one shape")
    if not (k.is_contiguous() and v.is_contiguous()) or k.dtype != torch.float32 or v.dtype != torch.float32:
        raise ValueError("the native blocks need the engine's contiguous fp32 KV buffers")


class _LlamaStep(DecodeStep):
    def __init__(self, model: Any) -> None:
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = model.model
        cfg = model.config
        self.F = F
        self.tokens = _embedding(m.embed_tokens)  # fp32 table, or the int8 model's rows dequantized on lookup
        self.rotary = m.rotary_emb  # the model's own rotary embedding (its RoPE scaling)
        self.rope = apply_rotary_pos_emb
        # Default RoPE depends on the position only: its cos/sin for every position computed once by the model's own
        # module (the same elementwise arithmetic as per step), and applied as x cos + roll(x, D/2) sin', where sin'
        # carries rotate_half's sign: 4 tensor ops a projection instead of transformers' 7 (rotate_half's slices,
        # negation and concatenation)
        self.table: tuple[Any, Any] | None = None
        if getattr(self.rotary, "rope_type", None) == "default":
            import torch

            n = int(cfg.max_position_embeddings)
            with torch.no_grad():
                cos, sin = self.rotary(
                    m.norm.weight[None, None], torch.arange(n).view(1, n)
                )  # (1, n, D); x for dtype, device
            half = sin.shape[-1] // 2
            self.table = (cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1))
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.norms = [
            (
                (b.input_layernorm.weight, b.input_layernorm.variance_epsilon),
                (b.post_attention_layernorm.weight, b.post_attention_layernorm.variance_epsilon),
            )
            for b in m.layers
        ]
        self.norm = (m.norm.weight, m.norm.variance_epsilon)
        # SiLU (LLaMA's) applied by the kernel to the gate product (oneDNN's "swish" post-op, equal to ~1e-6 relative)
        silu = getattr(cfg, "hidden_act", None) == "silu"
        act = m.layers[0].mlp.act_fn

        def kernels(one_row: bool) -> list[tuple[Any, ...]]:
            out = []
            for b in m.layers:
                a, p = b.self_attn, b.mlp
                gate = p.gate_proj.kernel(one_row, ("swish", "")) if silu else _then(p.gate_proj.kernel(one_row), act)
                projections = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
                out.append(
                    (
                        *(x.kernel(one_row) for x in projections),
                        gate,
                        p.up_proj.kernel(one_row),
                        p.down_proj.kernel(one_row),
                    )
                )
            return out

        self.layers = {False: kernels(False), True: kernels(True)}
        self._set_head(model.lm_head)
        # each block in one native call, where it can be (needs the default RoPE's table)
        self.native_block = _NativeLlamaBlocks.of(model, self.table) if self.table is not None else None

    def __call__(self, ids, pos, keys, values, rows, length, valid_from, top_k=0):
        B, H, Hkv, D = rows, self.n_head, self.n_kv, self.head_dim
        h = self.tokens(ids)  # (B, C)
        table = self.table if self.table is not None and length < len(self.table[0]) else None
        blocks = self.native_block
        if blocks is not None and table is not None and B <= blocks.max_rows:
            blocks(h, keys, values, B, length, valid_from, pos)
            return self._head(B, top_k)(_rms_norm(h, *self.norm))
        mask = _padding_mask(valid_from, length)
        if table is not None:  # positions <= length: inside the table
            cos, sin = table[0][pos].view(B, 1, 1, D), table[1][pos].view(B, 1, 1, D)
        else:
            cos, sin = self.rotary(h, pos.view(B, 1))  # (B, 1, D)
        for i, ((n1, n2), (q_proj, k_proj, v_proj, o_proj, gate, up, down)) in enumerate(
            zip(self.norms, self.layers[B == 1])
        ):
            a = _rms_norm(h, *n1)
            q, k = q_proj(a).view(B, H, 1, D), k_proj(a).view(B, Hkv, 1, D)
            if table is not None:
                q = q * cos + q.roll(D // 2, -1) * sin
                k = k * cos + k.roll(D // 2, -1) * sin
            else:
                q, k = self.rope(q, k, cos, sin)
            k_buf, v_buf = keys[i], values[i]
            k_buf[:B, :, length : length + 1] = k
            v_buf[:B, :, length : length + 1] = v_proj(a).view(B, Hkv, 1, D)
            o = _attend(q, k_buf[:B, :, : length + 1], v_buf[:B, :, : length + 1], mask, self.scale)
            h = h + o_proj(o.view(B, H * D))
            m = _rms_norm(h, *n2)
            h = h + down(gate(m) * up(m))
        return self._head(B, top_k)(_rms_norm(h, *self.norm))


def _then(kernel: Any, act: Any) -> Any:
    """kernel followed by an activation the kernels cannot fuse (the model's own module)."""
    return lambda x: act(kernel(x))


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """LlamaRMSNorm's arithmetic (fp32 throughout here) in torch's one fused op (bitwise equal to it here, 2x faster
    at these sizes)."""
    import torch.nn.functional as F

    return F.rms_norm(x, x.shape[-1:], weight, eps)


def _padding_mask(valid_from: Any, length: int) -> Any:
    """None, or a boolean (B, 1, 1, length + 1) mask: row b attends to columns valid_from[b] .. length."""
    if valid_from is None:
        return None
    import torch

    cols = torch.arange(length + 1, device=valid_from.device)
    return (cols.unsqueeze(0) >= valid_from.unsqueeze(1)).view(len(valid_from), 1, 1, length + 1)
