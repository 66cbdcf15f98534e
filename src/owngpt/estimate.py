"""Before a run: how many parameters, how much memory, and how fast it will train on this machine.

Memory figures are estimates from the model's shape (the usual accounting: weights, gradients, AdamW's two moments,
activations per the Megatron-LM paper's count for GPT blocks, and the logits), not measurements. Speed comes from
a short matmul measured now: expected tokens/s = measured FLOP/s x an assumed utilisation / FLOPs per token
(6N + 12·L·d·T per training token, Kaplan et al.). NOTES: a gpt2-124M step reaches about 50% of the matmul rate here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from owngpt.checkpoint import open_checkpoint
from owngpt.models import PRESETS, gpt2_parameters, llama_parameters, preset_name, preset_parameters  # noqa: F401  (their home: models)

GiB = 1024**3


@dataclass
class Estimate:
    model: str
    kind: str
    parameters: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    context: int
    seq_len: int
    batch_size: int
    inference_fp32_bytes: int
    inference_bf16_bytes: int
    train_fp32_bytes: int
    train_bf16_bytes: int
    activations_fp32_bytes: int
    flops_per_token: float
    measured_gflops: float
    assumed_utilisation: float
    train_tokens_per_s: float
    inference_tokens_per_s: float
    arch: str = "gpt2"  # model_type: gpt2, llama, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape(spec: str, vocab_size: int | None) -> tuple[str, dict[str, int], int | None]:
    """(kind, {n_layer, n_embd, n_head, n_positions, vocab_size}, exact parameter count or None)."""

    name = None
    try:
        name = preset_name(spec)
    except Exception:
        name = None
    if name is None and spec in PRESETS:  # estimating needs no weights: bare gpt2 names are fine here
        name = spec
    if name is not None:
        shape = dict(PRESETS[name])
        shape["vocab_size"] = vocab_size or 50257
        return "preset", shape, preset_parameters(shape, shape["vocab_size"])

    cfg = open_checkpoint(spec).config
    get = lambda *names, default=None: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), default)  # noqa: E731
    shape = {
        "n_layer": int(get("n_layer", "num_hidden_layers")),
        "n_embd": int(get("n_embd", "hidden_size")),
        "n_head": int(get("n_head", "num_attention_heads")),
        "n_positions": int(get("n_positions", "max_position_embeddings", default=1024)),
        "vocab_size": int(vocab_size or cfg.vocab_size),
        "arch": getattr(cfg, "model_type", None) or "unknown",
    }
    exact = None
    try:  # count exactly on the meta device: no memory, no weights read
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        exact = sum(p.numel() for p in m.parameters())
    except Exception:
        exact = None
    return "local", shape, exact


def measure_matmul_gflops(seconds: float = 0.3, n: int = 1024) -> float:
    """fp32 matmul rate of this machine, measured now (median of short repeats)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        t = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    rates.sort()
    return rates[len(rates) // 2]


def estimate(
    spec: str,
    seq_len: int | None = None,
    batch_size: int = 8,
    vocab_size: int | None = None,
    utilisation: float = 0.5,
    gflops: float | None = None,
) -> Estimate:
    kind, s, exact = _shape(spec, vocab_size)
    L, d, h, V = s["n_layer"], s["n_embd"], s["n_head"], s["vocab_size"]
    T = min(seq_len or s["n_positions"], s["n_positions"]) if seq_len is None else seq_len
    B = batch_size
    N = exact or gpt2_parameters(L, d, V, s["n_positions"])
    # Activations (Korthikanti et al. 2022): per block T·B·d·(34 + 5·h·T/d) bytes at 16 bits; x2 for fp32.
    act16 = L * T * B * d * (34 + 5 * h * T / d) + 3 * T * B * V * 2  # + logits and their gradient
    act32 = int(2 * act16)
    kv_cache = 2 * L * T * B * d  # elements
    est = Estimate(
        model=spec,
        kind=kind,
        parameters=int(N),
        n_layer=L,
        n_embd=d,
        n_head=h,
        vocab_size=V,
        context=s["n_positions"],
        seq_len=T,
        batch_size=B,
        inference_fp32_bytes=int(4 * N + 4 * kv_cache),
        inference_bf16_bytes=int(2 * N + 2 * kv_cache),
        # fp32: weights 4 + grads 4 + AdamW moments 8 bytes/param; bf16 autocast keeps fp32 master weights and adds
        # bf16 copies (2 bytes/param) while activations halve.
        train_fp32_bytes=int(16 * N + act32),
        train_bf16_bytes=int(18 * N + act16),
        activations_fp32_bytes=act32,
        flops_per_token=float(6 * N + 12 * L * d * T),
        measured_gflops=0.0,
        assumed_utilisation=utilisation,
        train_tokens_per_s=0.0,
        inference_tokens_per_s=0.0,
        arch=s.get("arch", "gpt2"),
    )
    rate = gflops if gflops is not None else measure_matmul_gflops()
    est.measured_gflops = rate
    est.train_tokens_per_s = rate * 1e9 * utilisation / est.flops_per_token
    # Decoding one token reads every weight once: at batch 1 it is memory-bound; use 2N FLOPs at a lower
    # utilisation as a rough guide (NOTES: transformers decodes gpt2-124M at ~23 tokens/s here).
    est.inference_tokens_per_s = rate * 1e9 * 0.15 / (2 * N)
    return est


def _fmt_bytes(n: float) -> str:
    for unit, k in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_count(n: float) -> str:
    for unit, k in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(int(n))


def format_estimate(e: Estimate, total_tokens: int | None = None) -> str:
    lines = [
        f"model            {e.model} ({'from-scratch preset' if e.kind == 'preset' else 'local checkpoint'})",
        f"shape            {e.arch}, {e.n_layer} layers, {e.n_head} heads, {e.n_embd} dims, vocab {e.vocab_size}, "
        f"context {e.context}",
        f"parameters       {_fmt_count(e.parameters)} ({e.parameters:,})",
        f"batch            {e.batch_size} x {e.seq_len} tokens",
        "memory (estimated)",
        f"  inference fp32 {_fmt_bytes(e.inference_fp32_bytes)}   bf16 {_fmt_bytes(e.inference_bf16_bytes)}"
        "   (weights + KV cache for the batch)",
        f"  training  fp32 {_fmt_bytes(e.train_fp32_bytes)}   bf16 {_fmt_bytes(e.train_bf16_bytes)}"
        f"   (weights, grads, AdamW state, activations {_fmt_bytes(e.activations_fp32_bytes)} in fp32; "
        "Muon keeps one buffer per matrix instead of AdamW's two: less)",
        f"speed on this machine (matmul measured now: {e.measured_gflops:.0f} GFLOP/s fp32; "
        f"assuming {e.assumed_utilisation:.0%} utilisation)",
        f"  training       ~{e.train_tokens_per_s:,.0f} tokens/s  ({e.flops_per_token / 1e6:.1f} MFLOP per token)",
        f"  decoding       ~{e.inference_tokens_per_s:,.0f} tokens/s at batch 1 (rough; memory-bound)",
    ]
    if total_tokens:
        secs = total_tokens / max(e.train_tokens_per_s, 1e-9)
        lines.append(f"  {total_tokens:,} training tokens would take ~{secs / 3600:.2f} h")
    lines.append("Small models run below this utilisation: per-step overhead dominates them (see docs/benchmarks.md).")
    return "\n".join(lines)
