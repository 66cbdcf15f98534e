"""MMI backward model: learns P(history | reply) on reversed dialogues (reply, then the history latest turn first).

Examples come from the same `chat` data dir: every assistant reply with history before it becomes one example,
laid out by `owngpt.chat_format.render_mmi`; the loss covers the history part (what reranking scores), or every
token with train_on_prompt. `owngpt chat --mmi` uses the trained model to rerank candidate replies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

from owngpt.chat_format import mmi_pairs, render_mmi
from owngpt.errors import DataError
from owngpt.tasks.chat import ExampleTask


class MMITask(ExampleTask):
    name: ClassVar[str] = "mmi"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pairs: dict[str, list[tuple[str, list[str]]]] = {}

    def pairs(self, split: str) -> list[tuple[str, list[str]]]:

        if split not in self._pairs:
            f = self.data.path / f"{split}.jsonl"
            out: list[tuple[str, list[str]]] = []
            if f.exists():
                with open(f, encoding="utf-8") as fh:
                    for lineno, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            out.extend(mmi_pairs(json.loads(line)["messages"]))
                        except (ValueError, KeyError, TypeError) as e:
                            raise DataError(
                                f"{f}:{lineno}: not a conversation ({e}); run `owngpt prepare` again"
                            ) from e
            self._pairs[split] = out
        return self._pairs[split]

    def num_examples(self, split: str) -> int:
        return len(self.pairs(split))

    def render_example(self, split: str, i: int) -> tuple[Sequence[int], Sequence[int]]:

        reply, history = self.pairs(split)[i]
        return render_mmi(self.tokenizer, reply, history, max_tokens=self.block_size + 1)
