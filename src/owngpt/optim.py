"""The optimizer of a training run: AdamW alone, or Muon on the hidden matrices with AdamW on everything else.

    optimizer=adamw  torch's AdamW (fused kernel), weight decay on 2-D weights only (nanoGPT's groups).
    optimizer=muon   torch.optim.Muon (owngpt.muon: its Newton-Schulz iteration in fp32 on the CPU) on the 2-D
                     matrices inside the transformer blocks (attention and MLP projections), at `muon_lr`; AdamW at `lr` on the embeddings, the LM/classifier head, norms and
                     biases. Muon orthogonalises each matrix's momentum (Newton-Schulz), which is defined for whole
                     hidden-layer matrices only; torch's Muon refuses anything not 2-D, and embeddings and heads are
                     better served by AdamW (Keller Jordan's Muon post; modded-nanogpt).
    optimizer=auto   muon for a from-scratch preset, adamw for a pretrained checkpoint (docs/training.md says why),
                     and adamw wherever muon is refused (LoRA, FSDP).

Both follow the same schedule shape (warmup, then cosine/linear decay to min_lr/lr of the peak): each group's lr is
the step's lr times that group's fixed scale (1 for AdamW, muon_lr/lr for Muon), so the schedule stays a pure
function of the step and resume needs no scheduler state.

`HybridOptimizer` makes the pair look like one torch optimizer to the loop (step, zero_grad, param_groups) and to the
checkpoint (state_dict / load_state_dict with indexes over both, each group tagged with its optimizer), so the trainer
state format and exact resume are those of a plain AdamW run.

Not here: the learning-rate function itself (train.lr_at) and the step loop (train.py).
"""

from __future__ import annotations

import math
from typing import Any

from owngpt.config import FSDP_REFUSAL
from owngpt.errors import CheckpointError, ConfigError
from owngpt.model_init import blocks
from owngpt.muon import Muon, ns_dtype_for

OPTIMIZERS = ("auto", "adamw", "muon")


def resolve_optimizer(cfg: Any, pretrained: bool) -> str:
    """'adamw' or 'muon' for a run: `auto` picks Muon from scratch and AdamW for fine-tuning a pretrained model."""
    if cfg.optimizer == "auto":
        return "adamw" if pretrained or cfg.lora or cfg.fsdp else "muon"
    return cfg.optimizer


def decay_groups(named: list[tuple[str, Any]], weight_decay: float) -> tuple[list[dict[str, Any]], list[str]]:
    """AdamW groups: weight decay on 2-D weights (matmuls, embeddings) only, none on biases and norms (nanoGPT).

    Returns the groups and the parameter names in optimizer order (the key of the saved optimizer state).
    """
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    no_decay = [(n, p) for n, p in named if p.dim() < 2]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return groups, [n for n, _ in decay] + [n for n, _ in no_decay]


def hidden_matrices(model: Any) -> list[str]:
    """Names of the trainable 2-D weights inside the transformer blocks: what Muon trains.

    Embeddings, the LM head (tied to them) and a classifier head sit outside the blocks; norms and biases are 1-D.
    """

    inside = {id(p) for p in blocks(model).parameters()}
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and id(p) in inside]


def muon_shape_correction(model: Any, name: str) -> float:
    """lr factor that makes torch's Muon scale a transposed (Conv1D) weight as it scales an nn.Linear one.

    torch.optim.Muon multiplies the lr by sqrt(max(1, rows / cols)) of the stored tensor (Keller Jordan's rule, meant
    for nn.Linear's [out, in]: sqrt(max(1, fan_out / fan_in))). GPT-2's Conv1D stores [in, out], so the factor would
    come out inverted (e.g. 2 for the MLP's down projection instead of 1); this returns right / torch's.
    """
    from transformers.pytorch_utils import Conv1D

    module = model.get_submodule(name.rsplit(".", 1)[0])
    if not isinstance(module, Conv1D):
        return 1.0
    rows, cols = module.weight.shape  # [in, out]
    return math.sqrt(max(1.0, cols / rows)) / math.sqrt(max(1.0, rows / cols))


class HybridOptimizer:
    """torch.optim.Muon on the hidden matrices + torch.optim.AdamW on the rest, stepped together as one optimizer.

    state_dict() numbers AdamW's parameters first, then Muon's (the order of `names`), and tags each param group
    with the optimizer it belongs to, so a checkpoint written by one kind of run is never loaded into the other.
    """

    def __init__(self, adamw: Any, muon: Any):
        self.adamw, self.muon = adamw, muon

    @property
    def optimizers(self) -> tuple[Any, Any]:
        return self.adamw, self.muon

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        a, m = self.adamw.state_dict(), self.muon.state_dict()
        offset = sum(len(g["params"]) for g in a["param_groups"])
        return {
            "state": {**a["state"], **{i + offset: s for i, s in m["state"].items()}},
            "param_groups": [dict(g, optimizer="adamw") for g in a["param_groups"]]
            + [dict(g, optimizer="muon", params=[i + offset for i in g["params"]]) for g in m["param_groups"]],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        groups = {"adamw": [], "muon": []}
        for g in sd["param_groups"]:
            kind = g.get("optimizer")
            if kind not in groups:
                raise CheckpointError(
                    "the checkpoint's optimizer state is not a Muon + AdamW state: resume with the run's optimizer"
                )
            groups[kind].append({k: v for k, v in g.items() if k != "optimizer"})
        offset = sum(len(g["params"]) for g in groups["adamw"])
        a_ids = {i for g in groups["adamw"] for i in g["params"]}
        self.adamw.load_state_dict(
            {"state": {i: s for i, s in sd["state"].items() if i in a_ids}, "param_groups": groups["adamw"]}
        )
        muon_groups = []
        for g in groups["muon"]:
            g = dict(g, params=[i - offset for i in g["params"]])
            if "ns_coefficients" in g:  # JSON turned the tuple into a list
                g["ns_coefficients"] = tuple(g["ns_coefficients"])
            muon_groups.append(g)
        self.muon.load_state_dict(
            {"state": {i - offset: s for i, s in sd["state"].items() if i not in a_ids}, "param_groups": muon_groups}
        )


def build_optimizer(model: Any, cfg: Any, device_type: str, sharded: bool) -> tuple[Any, list[str], list[float]]:
    """(optimizer, parameter names in state order, lr scale of each param group) for `cfg.optimizer`.

    `cfg.optimizer` must be resolved already (adamw | muon). The scales multiply the step's lr (see set_lr).
    """
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # the fused kernel (one pass over each tensor) on CPU too: 5-10% of a small model's step; FSDP's sharded
    # DTensor parameters take the default (foreach) implementation
    fused = device_type in ("cuda", "cpu") and not sharded
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        groups, names = decay_groups(named, cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused), names, [1.0] * len(groups)
    if cfg.optimizer != "muon":
        raise ConfigError(f"optimizer={cfg.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if sharded:  # also refused by TrainConfig.validate; kept here for callers that build their own config
        raise ConfigError(FSDP_REFUSAL)
    hidden = set(hidden_matrices(model))
    if not hidden:
        raise ConfigError("optimizer=muon: no trainable matrix inside the transformer blocks; use optimizer=adamw")
    rest = [(n, p) for n, p in named if n not in hidden]
    a_groups, a_names = decay_groups(rest, cfg.weight_decay)
    adamw = torch.optim.AdamW(a_groups, lr=cfg.lr, betas=betas, fused=fused)
    # one Muon group per shape correction (1 for nn.Linear; Conv1D's transposed weights get theirs)
    by_factor: dict[float, list[tuple[str, Any]]] = {}
    for n, p in named:
        if n in hidden:
            by_factor.setdefault(muon_shape_correction(model, n), []).append((n, p))
    m_groups = [{"params": [p for _, p in group]} for group in by_factor.values()]

    muon = Muon(
        m_groups,
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum,
        weight_decay=cfg.muon_weight_decay,
        nesterov=True,
        ns_dtype=ns_dtype_for(device_type),  # fp32 on the CPU: faster there and exact across processes (muon.py)
    )
    names = a_names + [n for group in by_factor.values() for n, _ in group]
    scales = [1.0] * len(a_groups) + [cfg.muon_lr / cfg.lr * f for f in by_factor]
    return HybridOptimizer(adamw, muon), names, scales


def describe(cfg: Any, optimizer: Any) -> str:
    """One log line: which optimizer trains how many tensors at which peak lr."""
    import torch

    if isinstance(optimizer, HybridOptimizer):
        n_muon = sum(len(g["params"]) for g in optimizer.muon.param_groups)
        n_adamw = sum(len(g["params"]) for g in optimizer.adamw.param_groups)
        return (
            f"optimizer: Muon (lr {cfg.muon_lr:g}) on {n_muon} block matrices, AdamW (lr {cfg.lr:g}) on the "
            f"{n_adamw} other tensors (embeddings, head, norms, biases); Newton-Schulz in "
            f"{'fp32' if optimizer.muon.ns_dtype == torch.float32 else 'bf16'}"
        )
    return f"optimizer: AdamW (lr {cfg.lr:g}, weight decay {cfg.weight_decay:g} on matrices and embeddings)"


def torch_optimizers(optimizer: Any) -> Any:
    """What torch.distributed.checkpoint's get/set_optimizer_state_dict take: one torch optimizer, or the pair inside
    a HybridOptimizer (torch keys their state by parameter name, so the two share one saved state)."""
    return optimizer.optimizers if isinstance(optimizer, HybridOptimizer) else optimizer


def set_lr(optimizer: Any, lr: float, scales: list[float]) -> None:
    """The step's learning rate on every param group, times the group's scale (Muon's lr ratio and shape factor)."""
    for g, s in zip(optimizer.param_groups, scales, strict=True):
        g["lr"] = lr * s


def check_saved_optimizer(saved_config: dict[str, Any], optimizer: str) -> None:
    """Refuse to resume a run with another optimizer than the one whose state the checkpoint holds."""
    saved = saved_config.get("optimizer", "adamw")  # runs from before the setting existed used AdamW
    if saved != optimizer:
        raise CheckpointError(
            f"the checkpoint was trained with optimizer={saved} and this run asks for optimizer={optimizer}: "
            f"resume with optimizer={saved}, or fine-tune from the checkpoint with --model (a new run)"
        )
