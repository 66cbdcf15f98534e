"""The serving engine: one loaded model, a bounded queue of rows, and a worker thread that batches them.

A *row* is one sequence to generate (a request with `n=3` is three rows). Requests put rows on the queue; the worker
thread waits (a few milliseconds at most) for the clients of the previous batch to come back, takes up to
`max_batch_size` rows and runs them through
one `model.generate` call (left-padded, KV cache), streaming each row's text back as it is produced. Generation runs
in that thread, so the asyncio event loop that serves HTTP stays responsive.

Why this does not call `owngpt.generation.generate_batch`: that function runs one `SamplingParams` per batch and
reports each row's end when the whole batch ends, which suits the CLI. A server wants to batch requests whose
settings differ (every web-chat user picks a temperature, max_tokens, stop strings, seed) and to close each stream
the moment its row ends. So here every row carries its own settings:

- `_PerRowSampler`, a transformers `LogitsProcessor`, draws each row's next token with that row's temperature and
  top_p and its own `torch.Generator` (a seeded request gives the same text whatever else shares its batch), and
  masks every other token to -inf, so `generate`'s greedy step selects exactly that token. transformers'
  sampling uses one temperature/top_p and the global RNG for the whole batch, hence this small hand-written part.
- `_RowObserver`, a `StoppingCriteria`, feeds each row its newest token, applies its end tokens, stop strings,
  max_tokens and cancellation (a client that disconnected), and tells transformers which rows are done.
Any mix of rows is therefore compatible and shares a batch. Text decoding reuses
`owngpt.generation.IncrementalDecoder` (no character is ever split across two stream chunks).
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt.errors import CheckpointError

log = logging.getLogger("owngpt.serve")
# After this long with an empty queue the previous batch's clients are not about to return: do not wait for them.
IDLE_RESET = 0.25


class QueueFull(Exception):
    """The queue holds `max_queue` rows already: the caller answers 429."""


@dataclass(frozen=True)
class RowSettings:
    """How one row is generated (the server maps the OpenAI request fields onto this)."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_ids: frozenset[int] = frozenset()  # token ids that end the row (end-of-text, end-of-turn)
    seed: int | None = None


# on_event(row, text_piece, finished): called from the worker thread as text arrives and once when the row ends.
EventCallback = Callable[["Row", str, bool], None]


class Row:
    """One sequence being generated: its prompt, settings, the tokens and text so far, and why it ended."""

    def __init__(self, prompt_ids: Sequence[int], settings: RowSettings, on_event: EventCallback | None = None):
        import torch

        self.prompt_ids = list(prompt_ids)
        self.settings = settings
        self.on_event = on_event
        seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.token_ids: list[int] = []
        self.text = ""
        self._pending = ""  # decoded text held back because it may be the start of a stop string
        self._decoder: Any = None
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.error: str | None = None
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the worker to drop this row (a plain attribute write, safe from any thread)."""
        self.cancelled = True

    # --- called from the worker thread only -------------------------------------------------------------------
    def start(self, tokenizer: Any) -> None:
        from owngpt.generation import IncrementalDecoder

        self._decoder = IncrementalDecoder(tokenizer, self.prompt_ids)

    def feed(self, token_id: int) -> None:
        if self.finished:
            return
        if self.cancelled:
            self.finish("cancelled")
            return
        if token_id in self.settings.stop_ids:
            self.finish("stop")
            return
        self.token_ids.append(token_id)
        self._add(self._decoder.push(token_id))
        if not self.finished and len(self.token_ids) >= self.settings.max_tokens:
            self.finish("length")

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finished:
            return
        if self._decoder is not None and reason != "error":
            self._add(self._decoder.flush(), final=True)
        if self.finish_reason is None:  # _add may have ended the row on a stop string already
            self.finish_reason, self.error = reason, error
            self._notify("", True)

    def _notify(self, piece: str, finished: bool) -> None:
        if self.on_event is not None:
            try:
                self.on_event(self, piece, finished)
            except Exception:  # a broken consumer must never take the batch down with it
                log.exception("row event callback failed")

    def _add(self, piece: str, final: bool = False) -> None:
        buf = self._pending + piece
        stops = self.settings.stop
        hits = [p for p in (buf.find(s) for s in stops) if p >= 0]
        if hits:
            self._pending = ""
            self._emit(buf[: min(hits)])
            self.finish_reason = "stop"
            self._notify("", True)
            return
        keep = 0 if final else _held_back(buf, stops)
        self._pending = buf[len(buf) - keep :]
        self._emit(buf[: len(buf) - keep])

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            self._notify(piece, False)


def _held_back(buf: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a stop string (it may still become one)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), best, -1):
            if buf.endswith(s[:k]):
                best = k
                break
    return best


def _per_row_sampler(rows: Sequence[Row]):
    import torch
    from transformers import LogitsProcessor

    temps = torch.tensor([max(r.settings.temperature, 1e-6) for r in rows]).unsqueeze(1)  # (B, 1)
    top_p = torch.tensor([r.settings.top_p for r in rows]).unsqueeze(1)  # (B, 1)
    sampled = [i for i, r in enumerate(rows) if r.settings.temperature > 0]

    class _PerRowSampler(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            chosen = scores.argmax(dim=-1)  # (B,) greedy rows keep this
            if sampled:
                idx = torch.tensor(sampled)
                probs = torch.softmax(scores[idx] / temps[idx], dim=-1)  # (S, V)
                # nucleus: keep the smallest set of most likely tokens whose probabilities reach top_p
                sorted_p, order = probs.sort(dim=-1, descending=True)
                drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p[idx]  # the top token is always kept
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                for j, i in enumerate(sampled):
                    k = torch.multinomial(sorted_p[j], 1, generator=rows[i].generator)
                    chosen[i] = order[j, k]
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, chosen.unsqueeze(1), 0.0)

    return _PerRowSampler()


def _row_observer(rows: Sequence[Row]):
    import torch
    from transformers import StoppingCriteria

    class _RowObserver(StoppingCriteria):
        # transformers calls the stopping criteria right after appending each step's tokens (before its
        # streamer), so a row's stop string or cancel ends it in the same step, without leaking a token.
        def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
            last = input_ids[:, -1].tolist()
            for row, tok in zip(rows, last, strict=True):
                row.feed(tok)
            return torch.tensor([r.finished for r in rows], dtype=torch.bool, device=input_ids.device)

    return _RowObserver()


@dataclass
class Stats:
    queued: int = 0  # rows waiting
    running: int = 0  # rows in the batch being generated
    batches: int = 0
    rows_done: int = 0
    rows_cancelled: int = 0
    max_batch_seen: int = 0
    tokens_generated: int = 0
    started: float = field(default_factory=time.time)


class Engine:
    """Loaded causal LM + tokenizer, a bounded row queue and the batching worker thread."""

    def __init__(
        self, model: Any, tokenizer: Any, *, max_batch_size: int = 16, max_queue: int = 256, batch_wait_ms: float = 20.0
    ) -> None:
        from owngpt.generation import context_length

        self.model, self.tokenizer = model, tokenizer
        self.context_length = context_length(model)
        self.max_batch_size, self.max_queue, self.batch_wait = max_batch_size, max_queue, batch_wait_ms / 1000
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self._queue: collections.deque[Row] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._last_batch = 0  # rows in the previous batch
        self._running: list[Row] = []  # rows of the batch being generated
        self.stats = Stats()

    # --- the request side (event-loop thread) ---------------------------------------------------------------
    def submit(self, rows: Sequence[Row]) -> None:
        """Queue rows for generation, all or none; raise QueueFull when they do not fit."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._queue) + len(rows) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} sequences are already waiting (--max-queue {self.max_queue})")
            self._queue.extend(rows)
            self.stats.queued = len(self._queue)
            self._cond.notify()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="owngpt-generate", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for row in pending:
            row.finish("cancelled")
        for row in self._running:  # the batch in progress stops at its next token
            row.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the worker thread ------------------------------------------------------------------------------------
    def _next_batch(self) -> list[Row]:
        with self._cond:
            # Dynamic batching. Clients whose rows just finished tend to send their next request at once; starting
            # without them, 8 clients split into two alternating batches of 4 for good (measured: mean batch 4.0
            # with 8 closed-loop clients, while one batch runs the other half queues). So wait, at most
            # `batch_wait` after the first arrival, for the rows queued now plus as many as the last batch had.
            # A lone client never waits, nor does the first request after an idle spell.
            target = min(self.max_batch_size, max(len(self._queue) + self._last_batch, 1))
            idle_since = time.monotonic()
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            if time.monotonic() - idle_since > IDLE_RESET:  # the last batch's clients are not coming back
                target = 1
            deadline = time.monotonic() + self.batch_wait
            while len(self._queue) < target and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch: list[Row] = []
            while self._queue and len(batch) < self.max_batch_size:
                row = self._queue.popleft()
                if row.cancelled:  # its client left while it waited
                    row.finish("cancelled")
                    self.stats.rows_cancelled += 1
                else:
                    batch.append(row)
            self.stats.queued = len(self._queue)
            self._last_batch = len(batch)
            return batch

    def _loop(self) -> None:
        while not self._closed:
            batch = self._next_batch()
            if batch:
                self.run_batch(batch)

    def run_batch(self, rows: Sequence[Row]) -> None:
        """Generate every row of `rows` with one `model.generate` call (also usable without the thread, in tests)."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        self.stats.running = len(rows)
        self._running = list(rows)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(rows))
        try:
            for r in rows:
                r.start(self.tokenizer)
            width = max(len(r.prompt_ids) for r in rows)
            # Left padding: each row predicts from the last column; the attention mask hides the pads and
            # transformers derives position ids from it, so a padded row computes what it would alone.
            input_ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
            mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])
            cfg = GenerationConfig(
                max_new_tokens=max(r.settings.max_tokens for r in rows),
                do_sample=False,  # _PerRowSampler has already picked each row's token; greedy selects it
                eos_token_id=[],  # rows end in _RowObserver (None would fall back to the checkpoint's eos)
                pad_token_id=self.pad_id,
                use_cache=True,
            )
            device = next(self.model.parameters()).device
            with torch.no_grad():
                self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=cfg,
                    logits_processor=LogitsProcessorList([_per_row_sampler(rows)]),
                    stopping_criteria=StoppingCriteriaList([_row_observer(rows)]),
                )
            for r in rows:
                r.finish("length")  # no-op for rows that already ended
        except Exception as e:  # report to the clients instead of killing the worker thread
            log.exception("generation failed")
            for r in rows:
                r.finish("error", error=f"generation failed: {type(e).__name__}: {e}")
        finally:
            self._running = []
            self.stats.running = 0
            self.stats.batches += 1
            self.stats.rows_done += len(rows)
            self.stats.rows_cancelled += sum(r.finish_reason == "cancelled" for r in rows)
            self.stats.tokens_generated += sum(len(r.token_ids) for r in rows)


class Classifier:
    """A sequence-classification checkpoint: texts -> label and probabilities per label (config.id2label)."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int) -> None:
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.labels = [str(model.config.id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]
        self._lock = threading.Lock()  # one forward at a time: torch already uses every core for one

    def classify(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        import torch

        with self._lock, torch.no_grad():
            ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
            # an empty text has no token to pool: it is classified as the end-of-text token alone
            ids = [x or [self.tokenizer.eos_token_id] for x in ids]
            enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.model.device)
            probs = torch.softmax(self.model(**enc).logits.float(), dim=-1)  # (N, num_labels)
        out = []
        for p in probs.tolist():
            best = max(range(len(p)), key=p.__getitem__)
            out.append({"label": self.labels[best], "probabilities": dict(zip(self.labels, p))})
        return out


@dataclass
class Loaded:
    """What `load` gives the app: a generation engine or a classifier, and facts about the checkpoint."""

    path: Path
    meta: dict[str, Any]
    task: str
    tokenizer: Any
    engine: Engine | None = None
    classifier: Classifier | None = None

    @property
    def chat_template(self) -> bool:
        """Chat checkpoints (and Hugging Face dirs with a template) get the template; plain LMs get text."""
        if self.task in ("chat", "mmi"):
            return True
        return not self.meta and bool(getattr(self.tokenizer, "chat_template", None))


def load(
    ckpt: str | Path, *, max_batch_size: int = 16, max_queue: int = 256, batch_wait_ms: float = 20.0, device: Any = None
) -> Loaded:
    """Load a checkpoint dir (safetensors only) as an Engine (lm, chat, mmi) or a Classifier (classify), on `device`
    (a torch device; None = cpu).

    `ckpt` may also be a Hub id (cached, or fetched once; see owngpt.models.resolve_checkpoint)."""
    from owngpt.checkpoint import load_model, read_meta
    from owngpt.generation import context_length
    from owngpt.models import resolve_checkpoint
    from owngpt.tokenizer import load_tokenizer

    path = resolve_checkpoint(str(ckpt))
    meta = read_meta(path)
    task = meta.get("task", "lm")
    tokenizer = load_tokenizer(path)
    if task == "classify":
        model = load_model(path, task="classify").eval().to(device or "cpu")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:  # GPT-2 classifiers pool at the last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id
        return Loaded(path, meta, task, tokenizer, classifier=Classifier(model, tokenizer, context_length(model)))
    if task not in ("lm", "chat", "mmi"):
        raise CheckpointError(f"{path}/owngpt.json: task {task!r} cannot be served (expected lm, chat, mmi, classify)")
    model = load_model(path, task="lm").eval().to(device or "cpu")
    if tokenizer.pad_token_id is None:  # masked out of every batch, so any id works
        tokenizer.pad_token = tokenizer.eos_token
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, batch_wait_ms=batch_wait_ms)
    return Loaded(path, meta, task, tokenizer, engine=engine)
