"""`owngpt prune`: magnitude (unstructured) or structured (MLP neurons) pruning, with an optional recovery fine-tune.

- Unstructured: the smallest-magnitude weights of the projection matrices (attention and MLP; not the embeddings or
  the tied LM head) are set to zero, either globally (one threshold over all of them, torch.nn.utils.prune's
  `global_unstructured`) or per layer (each matrix loses the same fraction, `l1_unstructured`); the masks are then
  made permanent (`prune.remove`). The checkpoint keeps its dense shape and size on disk: the zeros help only a
  sparse-aware runtime or a compressor. Sparsity is reported as zeros / parameters of the pruned matrices.
- Structured `mlp`: in every block the intermediate neurons with the lowest importance (||input weights|| x
  ||output weights||, the product because a neuron with either side near zero contributes nothing) are removed, so
  c_fc and c_proj really shrink and `config.n_inner` records the new width; the same count per layer, since GPT-2's
  config has one n_inner. The result is a plain GPT-2 checkpoint that transformers loads from config.json alone.
  LLaMA-style models (SwiGLU: gate, up and down projections) shrink the same way; `intermediate_size` records it.
- Structured `heads`: refused. transformers 5 dropped `prune_heads` and `config.pruned_heads`, and GPT-2's attention
  needs n_head x head_dim == n_embd, so a model with fewer heads cannot be described by config.json without custom
  code.
- Recovery fine-tune (`--finetune-steps N --data DATA`): owngpt's own training loop (owngpt.train.train) on the
  pruned checkpoint; for unstructured pruning the zero pattern is re-applied afterwards (the loop has no masks, so
  pruned weights may regrow during the few steps: re-masking keeps the asked sparsity exactly).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from owngpt.checkpoint import load_model, run_relative, save_checkpoint
from owngpt.config import TrainConfig
from owngpt.console import quiet, say
from owngpt.errors import CheckpointError, ConfigError
from owngpt.measure import eval_tokens, load_fp32, measure, output_inputs, write_report
from owngpt.outdir import CHECKPOINT, check_out, replacing
from owngpt.train import train

STRUCTURED = ("heads", "mlp")
SCOPES = ("global", "layer")

HEADS_UNSUPPORTED = (
    "--structured heads: transformers 5 removed `prune_heads` and `config.pruned_heads`, and GPT-2's attention "
    "requires n_head x head_dim == n_embd, so a model with heads removed cannot be loaded from config.json without "
    "custom code; use --structured mlp (really smaller) or unstructured pruning (no --structured)"
)


def prunable(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of the projection matrices pruned: Linear and GPT-2 Conv1D, without the LM head / classifier."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and not n.endswith(("score", "classifier"))
    ]


def sparsity(model: Any) -> dict[str, float | int]:
    """Zeros among the prunable matrices' weights, and among all parameters."""
    zeros = total = 0
    for _, m in prunable(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "prunable_sparsity": zeros / max(total, 1),
        "prunable_weights": total,
        "overall_sparsity": all_zeros / max(all_params, 1),
        "parameters": all_params,
    }


def magnitude_prune(model: Any, amount: float, scope: str = "global") -> Any:
    """Zero the `amount` fraction of smallest-|w| prunable weights (global threshold or per matrix), permanently."""
    from torch.nn.utils import prune as tprune

    if scope not in SCOPES:
        raise ConfigError(f"--scope {scope}: choose one of {', '.join(SCOPES)}")
    params = [(m, "weight") for _, m in prunable(model)]
    if scope == "global":
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
    else:
        for m, name in params:
            tprune.l1_unstructured(m, name=name, amount=amount)
    for m, name in params:
        tprune.remove(m, name)  # fold weight_orig * weight_mask into a plain `weight` parameter
    return model


def prune_mlp(model: Any, amount: float) -> int:
    """Remove the `amount` fraction of least important MLP neurons in every block (GPT-2 or LLaMA-style); returns the
    new MLP width (config.n_inner for GPT-2, config.intermediate_size for LLaMA)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) == "llama":
        return _prune_swiglu(model, amount)
    if getattr(cfg, "model_type", None) != "gpt2":
        raise ConfigError(
            f"--structured mlp supports the GPT-2 and LLaMA architectures (this checkpoint is {cfg.model_type!r}); "
            "use unstructured pruning (no --structured) for other models"
        )
    import torch
    from transformers.pytorch_utils import Conv1D

    blocks = model.transformer.h
    inner = blocks[0].mlp.c_fc.weight.shape[1]
    keep_n = max(1, round(inner * (1 - amount)))
    for block in blocks:
        fc, proj = block.mlp.c_fc, block.mlp.c_proj  # Conv1D: fc.weight (C, inner), proj.weight (inner, C)
        importance = fc.weight.detach().norm(dim=0) * proj.weight.detach().norm(dim=1)  # (inner,)
        keep = importance.topk(keep_n).indices.sort().values  # keep the original order of the survivors
        new_fc, new_proj = Conv1D(keep_n, fc.weight.shape[0]), Conv1D(proj.weight.shape[1], keep_n)
        with torch.no_grad():
            new_fc.weight.copy_(fc.weight[:, keep])
            new_fc.bias.copy_(fc.bias[keep])
            new_proj.weight.copy_(proj.weight[keep, :])
            new_proj.bias.copy_(proj.bias)
        block.mlp.c_fc, block.mlp.c_proj = new_fc, new_proj
    cfg.n_inner = keep_n
    return keep_n


def _prune_swiglu(model: Any, amount: float) -> int:
    """LLaMA's SwiGLU MLP, down(silu(gate(x)) * up(x)): a neuron is a row of gate and up and a column of down;
    its importance is the product of the three norms (any one near zero silences it)."""
    import torch

    layers = model.model.layers
    inner = layers[0].mlp.gate_proj.weight.shape[0]
    keep_n = max(1, round(inner * (1 - amount)))
    for layer in layers:
        mlp = layer.mlp  # nn.Linear: gate/up.weight (inner, C), down.weight (C, inner); no biases in LLaMA presets
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        importance = (
            gate.weight.detach().norm(dim=1) * up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0)
        )
        keep = importance.topk(keep_n).indices.sort().values
        for name, old, rows in (("gate_proj", gate, True), ("up_proj", up, True), ("down_proj", down, False)):
            w = old.weight.detach()[keep] if rows else old.weight.detach()[:, keep]
            new = torch.nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, dtype=w.dtype)
            with torch.no_grad():
                new.weight.copy_(w)
                if old.bias is not None:
                    new.bias.copy_(old.bias.detach()[keep] if rows else old.bias.detach())
            setattr(mlp, name, new)
    model.config.intermediate_size = keep_n
    return keep_n


def _finetune(pruned_dir: Path, data: str, steps: int, lr: float, work: Path, block_size: int | None = None) -> Path:
    """A short run of owngpt's training loop starting from the pruned checkpoint; returns its last checkpoint."""

    cfg = TrainConfig(
        task="lm",
        data=str(data),
        out=str(work / "run"),
        model=str(pruned_dir),
        max_steps=steps,
        block_size=block_size,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=min(10, max(1, steps // 10)),
        eval_every=max(1, steps),
        eval_batches=4,
        log_every=max(1, steps // 5),
    ).validate()
    res = train(cfg)
    if res.last_checkpoint is None:
        raise CheckpointError(f"the recovery fine-tune in {work / 'run'} wrote no checkpoint")
    return Path(res.last_checkpoint)


def prune(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    amount: float,
    *,
    structured: str | None = None,
    scope: str = "global",
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
    finetune_block_size: int | None = None,
    data: str | None = None,
    eval_file: str | None = None,
    eval_tokens_max: int = 8192,
    decode_tokens: int = 32,
    measure_result: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prune `ckpt` into `out` (a checkpoint dir that loads and generates); returns (and writes) the report.

    Built beside `out` and swapped in at the end, under owngpt.outdir's rules (see export.export)."""

    if not 0 < amount < 1:
        raise ConfigError(f"--sparsity {amount}: must be between 0 and 1 (e.g. 0.5 removes half)")
    if structured not in (None, *STRUCTURED):
        raise ConfigError(f"--structured {structured}: choose one of {', '.join(STRUCTURED)}")
    if structured == "heads":
        raise ConfigError(HEADS_UNSUPPORTED)
    if finetune_steps < 0:
        raise ConfigError("--finetune-steps must be at least 0")
    if finetune_steps and not data:
        raise ConfigError(
            "--finetune-steps needs --data DATA_DIR (a data dir prepared with the checkpoint's tokenizer)"
        )
    inputs = output_inputs(ckpt, data, eval_file)
    with replacing(out, kind=CHECKPOINT, overwrite=overwrite, inputs=inputs, suggest="pruned") as stage:
        return _prune(
            ckpt,
            Path(out),
            stage,
            amount,
            structured,
            scope,
            finetune_steps,
            finetune_lr,
            finetune_block_size,
            data,
            eval_file,
            eval_tokens_max,
            decode_tokens,
            measure_result,
        )


def _prune(
    ckpt: str | os.PathLike,
    out: Path,
    stage: Path,
    amount: float,
    structured: str | None,
    scope: str,
    finetune_steps: int,
    finetune_lr: float,
    finetune_block_size: int | None,
    data: str | None,
    eval_file: str | None,
    eval_tokens_max: int,
    decode_tokens: int,
    measure_result: bool,
) -> dict[str, Any]:
    """prune()'s work, written into `stage` (the new `out` until it is swapped in)."""

    original, tok, meta, src = load_fp32(ckpt)
    check_out(out, [("checkpoint", src)], suggest="pruned")  # a run dir given as CKPT resolves to one inside
    tokens = None
    if measure_result:
        found = eval_tokens(tok, data, eval_file, eval_tokens_max, src)
        tokens = found[0] if found else None
    model, *_ = load_fp32(src)  # a second copy to cut; the original stays for the comparison
    info: dict[str, Any] = {"sparsity": amount, "structured": structured, "scope": None if structured else scope}
    if structured == "mlp":
        before = sum(p.numel() for p in model.parameters())
        c = original.config
        width = c.intermediate_size if c.model_type == "llama" else (c.n_inner or 4 * c.n_embd)
        info["n_inner"] = {"before": width, "after": prune_mlp(model, amount)}  # the MLP width, either architecture
        info["parameters"] = {"before": before, "after": sum(p.numel() for p in model.parameters())}
    else:
        magnitude_prune(model, amount, scope)
        info.update(sparsity(model))
    new_meta = {**meta, "pruned_from": run_relative(src, out), "pruning": info}  # relative, or none: shared
    notes: list[str] = []
    if finetune_steps:
        import torch

        masks = None if structured else {n: (m.weight == 0) for n, m in prunable(model)}
        with tempfile.TemporaryDirectory(prefix=".prune-ft-", dir=stage.parent) as work:
            pruned = save_checkpoint(Path(work) / "pruned", model, tok, new_meta)
            say(f"recovery fine-tune: {finetune_steps} steps on {data}")
            model = load_model(
                _finetune(pruned, data, finetune_steps, finetune_lr, Path(work), finetune_block_size)
            ).eval()
        if masks is not None:
            with torch.no_grad():
                for n, m in prunable(model):
                    m.weight[masks[n]] = 0
            info.update(sparsity(model))
        info["finetune"] = {
            "steps": finetune_steps,
            "lr": finetune_lr,
            "block_size": finetune_block_size,
            "data": str(data),
        }
        new_meta["pruning"] = info
    if not structured:
        notes.append("unstructured zeros keep the dense shape: size on disk and dense decode speed do not change")
    save_checkpoint(stage, model, tok, new_meta)
    if measure_result:
        say("measuring size, decode speed and perplexity against the original...")
        with quiet():
            result = load_model(stage).eval()  # what the user will load
            rep = measure(
                original,
                src,
                stage,
                tok,
                tokens,
                result_model=result,
                decode_tokens=decode_tokens,
                notes=notes,
                block_size=meta.get("block_size"),
            )
    else:
        rep = {"notes": notes + ["measurement skipped (--no-measure)"]}
    rep = {
        "command": "prune",
        "checkpoint": run_relative(src, out),
        "output": ".",
        "eval_data": data or eval_file,
        "pruning": info,
        **rep,
    }
    write_report(stage, rep)
    return rep
