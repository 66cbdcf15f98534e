"""Language modelling: next-token prediction over the flat token stream of a prepared `lm` data dir.

Documents were joined by `prepare` with an end-of-text token after each, so a training row is simply a window of
`block_size + 1` tokens starting at a random offset (nanoGPT's sampler): packing with no padding and no waste.
The offsets of step `s` come from a generator seeded by (seed, s), so resuming or sharding replays them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from owngpt.errors import DataError
from owngpt.tasks.base import Batch, CausalLMTask, rng_for


class LMTask(CausalLMTask):
    name: ClassVar[str] = "lm"
    data_tasks: ClassVar[tuple[str, ...]] = ("lm",)

    def _tokens(self, split: str) -> np.ndarray:
        tokens = self.data.tokens(split)
        if len(tokens) < self.block_size + 1:
            raise DataError(
                f"{self.data.path}/{split}.bin holds {len(tokens)} tokens, fewer than block_size + 1 = "
                f"{self.block_size + 1}: use a smaller --block-size or more data"
            )
        return tokens

    def num_train_examples(self) -> int:
        # one epoch = as many windows as it takes to cover the train tokens once
        return max(1, len(self.data.tokens("train")) // self.block_size)

    def global_rows(self, step: int, n: int) -> list[int]:
        high = len(self._tokens("train")) - self.block_size  # offsets 0 .. len - T - 1 (x and y both fit)
        return [int(i) for i in rng_for(self.cfg.seed, 0x1A, step).integers(0, high, size=n)]

    def eval_rows(self, split: str, max_rows: int) -> list[int]:
        # Non-overlapping blocks from the start; when capped, evenly spread over the split. No randomness, so
        # every evaluation of every run reads the same tokens and val losses are comparable.
        n_blocks = (len(self._tokens(split)) - 1) // self.block_size
        starts = np.arange(n_blocks, dtype=np.int64) * self.block_size
        if max_rows and n_blocks > max_rows:
            starts = starts[np.linspace(0, n_blocks - 1, max_rows).round().astype(np.int64)]
        return [int(s) for s in starts]

    def collate(self, rows: Sequence[Any], split: str = "train") -> Batch:
        import torch

        tokens = self._tokens(split)
        T = self.block_size
        chunk = np.stack([np.asarray(tokens[i : i + T + 1], dtype=np.int64) for i in rows])  # (B, T+1)
        x = torch.from_numpy(chunk[:, :-1].copy())  # (B, T)
        y = torch.from_numpy(chunk[:, 1:].copy())  # (B, T) the next token of every position
        return {"input_ids": x, "labels": y}

    def batch_units(self, batch: Batch) -> float:
        return float(batch["labels"].numel())  # every token is trained on
