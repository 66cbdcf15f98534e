"""The Task interface: what one kind of training (lm, chat, mmi, classify) contributes to the shared loop.

`owngpt.train` owns the loop (optimizer, schedule, accumulation, checkpoints, resume, distributed); a task owns
only what differs between kinds of training:

  - which data it reads and how examples become tensors (`global_rows`, `collate`);
  - the loss (`loss`, returning a *sum* and the number of units it sums over, so that the loop can normalise by
    the number of units in the whole global batch: every rank, every accumulation step);
  - the evaluation metrics and which one decides "best" / early stopping (`evaluate`, `metric`,
    `greater_is_better`);
  - how the model is built (`model_kind`, `model_config_overrides`) and what goes into the checkpoint
    (`checkpoint_meta`, `generation_eos_ids`).

Determinism contract (what makes resume exact and N processes equal to one): `global_rows(step, n)` must be a pure
function of (seed, step, n): the rows of the whole global batch of optimizer step `step`. The loop slices that
list per rank and per micro-batch, so the data position needs no state besides the step.

Tasks are built by `owngpt.tasks.get_task(name)(data, tokenizer, cfg, block_size)`; other commands (eval, bench)
reuse them, e.g. `LMTask(data, tok, cfg, block_size).evaluate(model, split="val")["val_loss"]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from owngpt.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from owngpt.config import TrainConfig
    from owngpt.data.datadir import DataDir

Batch = dict[str, "torch.Tensor"]


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, *keys): the basis of every resumable sampler."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in keys]])


def epoch_rows(n_examples: int, seed: int, step: int, n: int) -> list[int]:
    """Rows `step*n .. step*n+n-1` of an endless stream of epochs, each a fresh permutation of the examples.

    A pure function of its arguments, so resuming at any step (or sharding over ranks) sees exactly the same rows.
    """
    if n_examples <= 0:
        raise ValueError("no training examples")
    start = step * n
    out: list[int] = []
    while len(out) < n:
        pos = start + len(out)
        epoch, offset = divmod(pos, n_examples)
        perm = rng_for(seed, 0x5EED, epoch).permutation(n_examples)
        take = min(n - len(out), n_examples - offset)
        out.extend(int(i) for i in perm[offset : offset + take])
    return out


class Task:
    """Base class of the training tasks. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = "base"
    # data dir tasks this task can train on (chat and mmi both read chat data)
    data_tasks: ClassVar[tuple[str, ...]] = ()
    # "causal_lm" (AutoModelForCausalLM) or "sequence_classification" (AutoModelForSequenceClassification)
    model_kind: ClassVar[str] = "causal_lm"
    # the metric that picks checkpoints/best and drives early stopping, and its direction
    metric: ClassVar[str] = "val_loss"
    greater_is_better: ClassVar[bool] = False

    def __init__(self, data: DataDir, tokenizer: Any, cfg: TrainConfig, block_size: int):
        self.data, self.tokenizer, self.cfg, self.block_size = data, tokenizer, cfg, block_size

    # --- sizes ------------------------------------------------------------------------------------------
    def num_train_examples(self) -> int:
        """Examples in one epoch of the train split (lm: blocks' worth of tokens). Used for --epochs."""
        raise NotImplementedError

    def steps_for_epochs(self, epochs: float, global_batch: int) -> int:
        return max(1, math.ceil(epochs * self.num_train_examples() / global_batch))

    # --- training batches ---------------------------------------------------------------------------------
    def global_rows(self, step: int, n: int) -> list[Any]:
        """The `n` rows (example ids, or window offsets for lm) of optimizer step `step`'s global batch.

        Default: epochs of shuffled examples (see `epoch_rows`). Must depend only on (cfg.seed, step, n).
        """
        return epoch_rows(self.num_train_examples(), self.cfg.seed, step, n)

    def collate(self, rows: Sequence[Any], split: str = "train") -> Batch:
        """Tensors for the model and the loss from some rows of `split` (CPU tensors; the loop moves them)."""
        raise NotImplementedError

    def batch_units(self, batch: Batch) -> float:
        """How many loss units a batch holds (trained tokens for lm/chat/mmi, examples for classify).

        Called before the forward pass: the loop sums it over every micro-batch of every rank and divides each
        micro-batch's loss sum by that total, so masked tokens, accumulation and ranks all weigh correctly.
        """
        return float((batch["labels"] != -100).sum())

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        """The *sum* of per-unit losses of a batch (the loop normalises by `batch_units` of the global batch)."""
        raise NotImplementedError

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, model: Any, max_batches: int = 0, batch_size: int = 8, split: str = "val") -> dict[str, float]:
        """Metrics on a split (keys include `self.metric`); `max_batches=0` means the whole split.

        Called on every rank with the same arguments (an FSDP model needs all ranks in its forward), in eval mode
        under `torch.no_grad()`; the loop switches modes. The train split is used when there is no val split.
        """
        raise NotImplementedError

    def has_val(self) -> bool:
        return self.data.has_split("val")

    # --- model and checkpoint ---------------------------------------------------------------------------------
    def model_config_overrides(self) -> dict[str, Any]:
        """Extra config fields for a from-scratch model or a loaded one (classify: num_labels, id2label...)."""
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:
        """Task-specific fields of the checkpoint's owngpt.json (e.g. labels)."""
        return {}

    def generation_eos_ids(self) -> list[int] | None:
        """eos_token_id(s) for generation_config.json; None for models that do not generate."""
        eos = self.tokenizer.eos_token_id
        return None if eos is None else [int(eos)]


class CausalLMTask(Task):
    """Shared by lm, chat and mmi: next-token cross-entropy on `labels` (-100 = not trained on)."""

    model_kind: ClassVar[str] = "causal_lm"

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        import torch.nn.functional as F

        # Batches are right-padded, so in a causal model no real token attends to padding and the mask changes no
        # trained logit; it is passed anyway where there is padding, as transformers expects (and warns otherwise).
        # use_cache=False: transformers otherwise builds a KV cache on every training forward, which nothing reads
        # (about 15% of a small model's step here)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).logits  # (B, T, V)
        labels = batch["labels"]  # (B, T), already shifted: labels[:, t] is the token after input_ids[:, t]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")

    def eval_rows(self, split: str, max_rows: int) -> list[Any]:
        """The rows an evaluation of `split` reads: deterministic (no RNG), at most `max_rows` (0 = all)."""
        raise NotImplementedError

    def evaluate(self, model: Any, max_batches: int = 0, batch_size: int = 8, split: str = "val") -> dict[str, float]:
        import torch

        rows = self.eval_rows(split, max_batches * batch_size if max_batches else 0)
        device = next(model.parameters()).device
        total, units = 0.0, 0.0
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                batch = {k: v.to(device) for k, v in self.collate(rows[i : i + batch_size], split).items()}
                units += self.batch_units(batch)
                total += float(self.loss(model, batch))
        loss = total / units if units else float("nan")
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": units}


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> Batch:
    """Right-padded (input_ids, attention_mask, labels) from (ids, mask) pairs; labels are shifted by one.

    input_ids[t] = ids[t] and labels[t] = ids[t+1] where mask[t+1] is 1, else -100 (padding included).
    """
    import torch

    width = max(1, max(len(ids) - 1 for ids, _ in examples))
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        mask_t = torch.as_tensor(np.asarray(mask, dtype=np.bool_))
        t = len(ids_t) - 1
        if t < 1:
            attention[b, 0] = 1  # an empty row still attends to something (no all-masked softmax)
            continue
        input_ids[b, :t] = ids_t[:-1]
        attention[b, :t] = 1
        labels[b, :t] = torch.where(mask_t[1:], ids_t[1:], torch.tensor(-100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def get_task(name: str) -> type[Task]:
    """The Task class of a task name (imports lazily, so a missing optional task cannot break the others)."""
    import importlib

    modules = {
        "lm": ("owngpt.tasks.lm", "LMTask"),
        "chat": ("owngpt.tasks.chat", "ChatTask"),
        "mmi": ("owngpt.tasks.mmi", "MMITask"),
        "classify": ("owngpt.tasks.classify", "ClassifyTask"),
    }
    if name not in modules:
        raise ConfigError(f"task={name!r}: expected one of {', '.join(modules)}")
    module, cls = modules[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"task '{name}' is not available in this install ({e})") from e
