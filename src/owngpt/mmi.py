"""MMI reranking: pick, among sampled replies, the one from which a backward model best predicts the history.

DialoGPT and GPT2-chitchat's idea (maximum mutual information): a forward model samples N candidate replies; a
backward model, trained by `owngpt train --task mmi` on `reply EOS latest-turn EOS previous-turn EOS ...`
(owngpt.chat_format.render_mmi), scores each candidate by its mean loss on the history tokens, i.e.
-log P(history | reply) per token. Generic replies ("I don't know") explain the history badly and score high; the
answer is the argmin. Scoring is one batched forward pass per `batch_size` candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from owngpt.chat_format import Message, render_mmi
from owngpt.generation import context_length


def history_latest_first(messages: Sequence[Message]) -> list[str]:
    """The contents of the conversation so far (system prompt excluded), latest turn first: what MMI scores."""
    return [m["content"] for m in messages if m["role"] != "system"][::-1]


def score_candidates(
    model: Any,
    tokenizer: Any,
    candidates: Sequence[str],
    history: Sequence[str],
    max_tokens: int | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Mean token loss of the backward model on the history, given each candidate reply (lower = better).

    `history` is latest turn first. `max_tokens` defaults to the backward model's context; older turns that do not
    fit are dropped, as in training. A candidate with no history token left to score gets +inf.
    """
    import torch

    if max_tokens is None:
        max_tokens = context_length(model)
    encoded = [render_mmi(tokenizer, c, list(history), max_tokens=max_tokens) for c in candidates]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        # Right padding: positions start at 0 for every row, as in training; pads are masked out of attention and loss.
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=device)
        attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
        mask = torch.tensor([m + [0] * (width - len(m)) for _, m in chunk], dtype=torch.float32, device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()  # (B, T, V)
        # token t is predicted from position t - 1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )  # (B, T-1)
        m = mask[:, 1:]
        n = m.sum(dim=1)
        mean = (nll * m).sum(dim=1) / n.clamp(min=1)
        scores += [float(s) if k > 0 else float("inf") for s, k in zip(mean.tolist(), n.tolist(), strict=True)]
    return scores


@dataclass
class Reranked:
    best: int  # index of the chosen candidate
    candidates: list[str]
    scores: list[float]  # mean backward loss per candidate (lower = better)

    @property
    def text(self) -> str:
        return self.candidates[self.best]


def rerank(
    model: Any,
    tokenizer: Any,
    candidates: Sequence[str],
    history: Sequence[str],
    max_tokens: int | None = None,
    skip_empty: bool = True,
) -> Reranked:
    """Score candidates and pick the argmin. Empty (whitespace) candidates are passed over unless all are empty:
    a backward model can find the history quite likely after an empty reply, which is never a good answer."""
    scores = score_candidates(model, tokenizer, candidates, history, max_tokens=max_tokens)
    pool = [i for i, c in enumerate(candidates) if c.strip()] if skip_empty else []
    pool = pool or list(range(len(candidates)))
    best = min(pool, key=lambda i: scores[i])
    return Reranked(best=best, candidates=list(candidates), scores=scores)
