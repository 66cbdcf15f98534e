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
reuse them, e.g. `LMTask(data, tok, cfg, block_size).eval_loss(model, "val")`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

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

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-unit losses, number of units) of a batch: tokens for lm/chat/mmi, examples for classify.

        The loop divides by the units of the whole global batch, so masked tokens and ranks weigh correctly.
        """
        raise NotImplementedError

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, model: Any, max_batches: int = 0, batch_size: int = 8) -> dict[str, float]:
        """Metrics on the validation split (keys include `self.metric`); `max_batches=0` means the whole split."""
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


def better(task: type[Task] | Task, new: float, best: float | None) -> bool:
    """Whether `new` improves on `best` for the task's metric direction."""
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return not math.isnan(new)
    return new > best if task.greater_is_better else new < best


def get_task(name: str) -> type[Task]:
    """The Task class of a task name (imports lazily, so a missing optional task cannot break the others)."""
    import importlib

    from owngpt.errors import ConfigError

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
