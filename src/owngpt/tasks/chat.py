"""Chat fine-tuning: conversations of a `chat` data dir, loss on the assistant's tokens (or all, train_on_prompt).

Each conversation is rendered by `owngpt.chat_format.render` (the single source of the template and loss mask).
`prepare` already stored every conversation rendered (`{split}.ids.bin` / `.mask.bin`); those are used as they are
when they fit in `block_size + 1` tokens, and the rare longer ones are rendered again from `{split}.jsonl` keeping
their latest turns. Batches are right-padded; labels are -100 on padding and untrained tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from owngpt.chat_format import render, stop_token_ids
from owngpt.errors import DataError
from owngpt.tasks.base import Batch, CausalLMTask, pad_examples


class ExampleTask(CausalLMTask):
    """A causal-LM task over a list of (ids, mask) examples per split, rendered lazily and cached."""

    data_tasks: ClassVar[tuple[str, ...]] = ("chat",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def render_example(self, split: str, i: int) -> tuple[Sequence[int], Sequence[int]]:
        raise NotImplementedError

    def example(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        key = (split, i)
        if key not in self._cache:
            ids, mask = self.render_example(split, i)
            if self.cfg.train_on_prompt:
                mask = np.ones(len(ids), dtype=np.uint8)
            self._cache[key] = (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8))
        return self._cache[key]

    def num_train_examples(self) -> int:
        n = self.num_examples("train")
        if n == 0:
            raise DataError(f"{self.data.path}: the train split has no examples for task '{self.name}'")
        return n

    def has_val(self) -> bool:
        return self.num_examples("val") > 0

    def eval_rows(self, split: str, max_rows: int) -> list[int]:
        n = self.num_examples(split)
        return list(range(min(n, max_rows) if max_rows else n))

    def collate(self, rows: Sequence[Any], split: str = "train") -> Batch:
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return pad_examples([self.example(split, int(i)) for i in rows], int(pad))


class ChatTask(ExampleTask):
    name: ClassVar[str] = "chat"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ragged: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self._records: dict[str, list[dict[str, Any]]] = {}

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if split not in self._ragged:
            if (self.data.path / f"{split}.idx.npy").exists():
                self._ragged[split] = self.data.ragged(split)
            else:
                self._ragged[split] = (np.zeros(0, np.int64), np.zeros(1, np.int64), None)
        return self._ragged[split]

    def _record(self, split: str, i: int) -> dict[str, Any]:
        if split not in self._records:
            f = self.data.path / f"{split}.jsonl"
            try:
                self._records[split] = [json.loads(line) for line in open(f, encoding="utf-8") if line.strip()]
            except (OSError, ValueError) as e:
                raise DataError(f"{f}: cannot read the conversations ({e}); run `owngpt prepare` again") from e
        return self._records[split][i]

    def num_examples(self, split: str) -> int:
        return len(self._split(split)[1]) - 1

    def render_example(self, split: str, i: int) -> tuple[Sequence[int], Sequence[int]]:

        ids, offsets, mask = self._split(split)
        a, b = int(offsets[i]), int(offsets[i + 1])
        limit = self.block_size + 1  # inputs are ids[:-1], so block_size + 1 ids make a full row
        if mask is not None and b - a <= limit and not self.cfg.train_on_prompt:
            return ids[a:b], mask[a:b]
        messages = self._record(split, i)["messages"]
        return render(self.tokenizer, messages, max_tokens=limit, train_on_prompt=self.cfg.train_on_prompt)

    def generation_eos_ids(self) -> list[int] | None:

        return stop_token_ids(self.tokenizer)  # <|im_end|> ends a reply; <|endoftext|> too
