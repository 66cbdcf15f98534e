"""`owngpt eval`: how good is a checkpoint on held-out data.

- language-model data (a data dir or a plain text file): loss, perplexity and bits per byte. Bits per byte divide the
  total negative log-likelihood by the UTF-8 size of the text, so models with different tokenizers compare fairly.
- chat data: assistant-token loss and perplexity (only the tokens the model would have to write), and distinct-1/2
  of answers sampled for validation prompts (optionally reranked with an MMI model).
- classification data: accuracy, macro-F1, per-class precision/recall and a confusion matrix (owngpt.classify_eval).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from owngpt.chat_format import prompt_ids, render, stop_token_ids
from owngpt.checkpoint import open_checkpoint
from owngpt.classify_eval import evaluate_checkpoint, format_report
from owngpt.data.datadir import META, open_data_dir
from owngpt.errors import DataError
from owngpt.mmi import history_latest_first, rerank

LN2 = math.log(2)


def check_same_tokenizer(ckpt_tok, data_tok, ckpt: Path, data: Path) -> None:
    """Refuse data tokenized with another vocabulary than the checkpoint's: the numbers would be meaningless."""
    if ckpt_tok.get_vocab() != data_tok.get_vocab():
        raise DataError(
            f"{data} was tokenized with another tokenizer than {ckpt}'s: prepare the data with "
            f"`owngpt prepare ... --tokenizer {ckpt}` or evaluate on a plain text file instead"
        )


def lm_stream_loss(
    model, tokens, block_size: int, batch_size: int = 8, max_tokens: int | None = None, progress: bool = True
) -> tuple[float, int]:
    """(total NLL in nats, tokens predicted) over a token stream, in windows of `block_size` predicting each token once.

    Windows overlap by one token so that every token but the first is predicted exactly once.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    starts = list(range(0, max(n - 1, 0), block_size))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in tqdm(range(0, len(starts), batch_size), desc="eval", unit="batch", disable=not progress, leave=False):
            chunk = starts[i : i + batch_size]
            xs = [np.asarray(tokens[s : min(s + block_size, n - 1)], dtype=np.int64) for s in chunk]
            ys = [np.asarray(tokens[s + 1 : min(s + block_size, n - 1) + 1], dtype=np.int64) for s in chunk]
            width = max(len(x) for x in xs)
            x = torch.zeros(len(xs), width, dtype=torch.long)
            y = torch.full((len(xs), width), -100, dtype=torch.long)
            att = torch.zeros(len(xs), width, dtype=torch.long)
            for r, (xa, ya) in enumerate(zip(xs, ys)):
                x[r, : len(xa)], y[r, : len(ya)], att[r, : len(xa)] = torch.from_numpy(xa), torch.from_numpy(ya), 1
            x, y, att = _on_model_device(model, x, y, att)
            logits = model(input_ids=x, attention_mask=att, use_cache=False).logits.float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((y != -100).sum())
    return total, count


def _on_model_device(model: Any, *tensors: Any) -> tuple[Any, ...]:
    device = next(model.parameters()).device
    return tuple(t.to(device) for t in tensors)


def masked_loss(model, examples: Sequence[tuple[list[int], list[int]]], batch_size: int = 8) -> tuple[float, int]:
    """(total NLL, tokens) over the masked positions of (ids, mask) examples: mask[t]=1 means token t is scored."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            width = max(len(ids) for ids, _ in batch)
            x = torch.zeros(len(batch), width, dtype=torch.long)
            y = torch.full((len(batch), width), -100, dtype=torch.long)
            att = torch.zeros(len(batch), width, dtype=torch.long)
            for r, (ids, mask) in enumerate(batch):
                t = torch.tensor(ids)
                x[r, : len(ids)], att[r, : len(ids)] = t, 1
                lab = torch.where(torch.tensor(mask, dtype=torch.bool), t, torch.tensor(-100))
                y[r, : len(ids) - 1] = lab[1:]  # position t predicts token t+1
            x, y, att = _on_model_device(model, x, y, att)
            logits = model(input_ids=x, attention_mask=att, use_cache=False).logits.float()
            total += F.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((y != -100).sum())
    return total, count


_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|\w+|[^\w\s]")


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over the answers; CJK counted per character."""
    grams, total = set(), 0
    for t in texts:
        words = _WORD.findall(t.lower())
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i : i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def _metrics(nll: float, count: int, n_bytes: int | None, total_tokens: int | None) -> dict[str, float]:
    if count == 0:
        raise DataError("nothing to evaluate: the split has no scored tokens")
    loss = nll / count
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count}
    if n_bytes:
        scaled = nll * (total_tokens / count if total_tokens else 1.0)  # all tokens when a sample was scored
        out["bits_per_byte"] = scaled / LN2 / n_bytes
    return out


def evaluate(
    ckpt: str,
    data: str,
    split: str = "val",
    block_size: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    samples: int = 32,
    max_new_tokens: int = 40,
    seed: int = 0,
    mmi: str | None = None,
    candidates: int = 5,
    out_dir: str | None = None,
    progress: bool = True,
    device: Any = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a data dir (lm, chat, classify) or a plain text file (lm); `device` (a torch
    device, None = cpu) is where the model runs (see owngpt.device.inference_device)."""

    c = open_checkpoint(ckpt)
    ckpt_path = c.path
    data_path = Path(data)
    if not data_path.exists():
        raise DataError(f"--data {data}: no such data dir or file")
    if data_path.is_dir() and (data_path / META).exists():
        d = open_data_dir(data_path)
        if d.task == "classify":
            return evaluate_checkpoint(c, str(data_path), out_dir=out_dir, split=split, device=device)
        tok = c.tokenizer()
        check_same_tokenizer(tok, d.load_tokenizer(), ckpt_path, data_path)
        if not d.has_split(split):
            raise DataError(
                f"{data_path} has no '{split}' split: prepare with --val-fraction > 0 or pass --split train"
            )
        model = c.model(device=device or "cpu").eval()
        ctx = c.context(block_size)
        if d.task == "lm":
            tokens = d.tokens(split)
            nll, count = lm_stream_loss(model, tokens, ctx, batch_size, max_tokens, progress)
            m = _metrics(nll, count, d.split_meta(split).get("bytes"), max(len(tokens) - 1, 1))
            return {"task": "lm", "split": split, **m}
        # chat

        records = list(d.records(split))
        examples = [render(tok, r["messages"], max_tokens=ctx) for r in records]
        nll, count = masked_loss(model, examples, batch_size)
        m = _metrics(nll, count, None, None)
        out = {
            "task": "chat",
            "split": split,
            "assistant_loss": m["loss"],
            "assistant_perplexity": m["perplexity"],
            "assistant_tokens": m["tokens"],
        }
        if samples > 0:
            out.update(_sample_distinct(model, tok, records, samples, max_new_tokens, seed, ctx, mmi, candidates))
        return out
    # a plain text file: tokenize it with the checkpoint's tokenizer
    tok = c.tokenizer()
    try:
        text = data_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{data_path}: not UTF-8 text at byte {e.start}; convert it or prepare it with "
            "`owngpt prepare --encoding ...`"
        ) from e
    ids = tok(text, add_special_tokens=False)["input_ids"]
    model = c.model("lm", device=device or "cpu").eval()
    ctx = c.context(block_size)
    nll, count = lm_stream_loss(model, ids, ctx, batch_size, max_tokens, progress)
    return {
        "task": "lm",
        "file": str(data_path),
        **_metrics(nll, count, len(text.encode("utf-8")), max(len(ids) - 1, 1)),
    }


def _sample_distinct(model, tok, records, samples, max_new_tokens, seed, ctx, mmi, candidates) -> dict[str, Any]:
    """Sample an answer for each of the first `samples` validation prompts; report distinct-1/2 (and with MMI)."""
    import torch

    prompts = []
    for r in records:
        msgs = r["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last:
            prompts.append(msgs[:last])
        if len(prompts) >= samples:
            break
    stops = stop_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]

    def sample(msgs, n):
        ids = prompt_ids(tok, msgs, max_tokens=ctx - max_new_tokens)
        torch.manual_seed(seed)
        out = model.generate(
            torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            do_sample=True,
            top_p=0.9,
            temperature=0.8,
            max_new_tokens=max_new_tokens,
            max_length=None,  # the checkpoint's max_length (its trained context) is respected by the prompt budget
            num_return_sequences=n,
            eos_token_id=stops,
            pad_token_id=pad,
        )
        return [tok.decode(o[len(ids) :], skip_special_tokens=True).strip() for o in out]

    answers = [sample(p, 1)[0] for p in prompts]
    out: dict[str, Any] = {
        "samples": len(answers),
        "distinct_1": distinct_n(answers, 1),
        "distinct_2": distinct_n(answers, 2),
        "examples": [{"prompt": p[-1]["content"], "answer": a} for p, a in zip(prompts[:5], answers[:5])],
    }
    if mmi:
        backward = open_checkpoint(mmi).model("lm", device=model.device).eval()
        chosen = []
        for p in prompts:
            cands = sample(p, candidates)
            chosen.append(rerank(backward, tok, cands, history_latest_first(p), max_tokens=ctx).text)
        out.update(
            {
                "mmi_distinct_1": distinct_n(chosen, 1),
                "mmi_distinct_2": distinct_n(chosen, 2),
                "mmi_examples": [{"prompt": p[-1]["content"], "answer": a} for p, a in zip(prompts[:5], chosen[:5])],
            }
        )
    return out


def format_metrics(m: dict[str, Any]) -> str:
    if m.get("task") == "classify":
        return format_report(m)  # accuracy, macro-F1 and the per-class table
    lines = []
    for k, v in m.items():
        if isinstance(v, float):
            lines.append(f"{k:22s} {v:.4f}")
        elif isinstance(v, (int, str)):
            lines.append(f"{k:22s} {v}")
    for k in ("examples", "mmi_examples"):
        for ex in m.get(k, []):
            lines.append(f"[{k}] > {ex['prompt']}\n    {ex['answer']}")
    return "\n".join(lines)
