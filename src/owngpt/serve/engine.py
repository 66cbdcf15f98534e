"""The serving engine: one loaded model, a bounded queue of rows, and a worker thread running the decode engine.

A *row* is one sequence to generate (a request with `n=3` is three rows): `owngpt.engine.Row`, the same row the CLI
and the Python API decode, with its own settings (temperature, top_p, max_tokens, stop strings, seed, whether its
window slides). Requests put rows on the queue; the worker thread owns one `owngpt.engine.Decoder` and loops:

- **continuous batching** (the default, vLLM's scheduling on a CPU): before every decode step, queued rows join the
  running batch (up to `max_batch_size`), prefilled alone and merged into the batched KV cache; a row leaves the
  batch the step it ends, and its stream closes at once. A request arriving mid-decode waits one step, not for the
  running batch to finish.
- `continuous=False` keeps the older **dynamic batching** for comparison (bench/bench_serve.py): rows join only when
  the batch is empty, after a short wait for the previous batch's clients to come back.

Generation runs in that thread, so the asyncio event loop that serves HTTP stays responsive. Text decoding, stop
strings, hold-back of incomplete characters and cancellation are the engine's (owngpt.engine).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt.checkpoint import DEFAULT_CONTEXT, open_checkpoint, position_table
from owngpt.conversation import is_chat_model
from owngpt.decode_kernels import pack_for_decode
from owngpt.engine import Decoder, EventCallback, Row, RowSettings, run_to_end
from owngpt.errors import CheckpointError
from owngpt.generation import context_length, quiet_loading

__all__ = ["Engine", "EventCallback", "Loaded", "QueueFull", "Row", "RowSettings", "load"]

log = logging.getLogger("owngpt.serve")
# After this long with an empty queue the previous batch's clients are not about to return: do not wait for them.
IDLE_RESET = 0.25


class QueueFull(Exception):
    """The queue holds `max_queue` rows already: the caller answers 429."""


@dataclass
class Stats:
    queued: int = 0  # rows waiting
    running: int = 0  # rows in the batch being generated
    batches: int = 0  # decode steps (continuous) or batches run to the end (dynamic)
    rows_done: int = 0
    rows_cancelled: int = 0
    max_batch_seen: int = 0
    tokens_generated: int = 0
    admitted_mid_decode: int = 0  # rows that joined a batch already decoding (continuous batching)
    started: float = field(default_factory=time.time)


class Engine:
    """Loaded causal LM + tokenizer, a bounded row queue and the worker thread that decodes them."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        batch_wait_ms: float = 20.0,
        continuous: bool = True,
        context: int | None = None,
    ) -> None:

        self.model, self.tokenizer = model, tokenizer
        self.context_length = context or context_length(model)
        self.max_batch_size, self.max_queue, self.batch_wait = max_batch_size, max_queue, batch_wait_ms / 1000
        self.continuous = continuous
        self._queue: collections.deque[Row] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._last_batch = 0  # rows in the previous batch (dynamic batching)
        self._decoder = Decoder(model, tokenizer, self.context_length)
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
        for row in list(self._decoder.rows):  # the batch in progress stops at its next step
            row.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the worker thread ------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move queued rows into the decoder (called with the lock held)."""
        d = self._decoder
        running = d.active
        while self._queue and d.active < self.max_batch_size:
            row = self._queue.popleft()
            if row.is_cancelled():  # its client left while it waited
                row.finish("cancelled")
                self.stats.rows_cancelled += 1
                continue
            d.add(row)
            if running:
                self.stats.admitted_mid_decode += 1
        self.stats.queued = len(self._queue)

    def _wait_for_batch(self) -> None:
        """Dynamic batching (continuous=False): wait, at most `batch_wait` after the first arrival, for the rows
        queued now plus as many as the last batch had (its clients tend to send their next request at once)."""
        target = min(self.max_batch_size, max(len(self._queue) + self._last_batch, 1))
        idle_since = time.monotonic()
        while not self._queue and not self._closed:
            self._cond.wait()
        if time.monotonic() - idle_since > IDLE_RESET:  # the last batch's clients are not coming back
            target = 1
        deadline = time.monotonic() + self.batch_wait
        while len(self._queue) < target and (left := deadline - time.monotonic()) > 0 and not self._closed:
            self._cond.wait(left)

    def _loop(self) -> None:
        d = self._decoder
        while True:
            with self._cond:
                if self._closed:
                    break
                if d.active == 0:
                    if self.continuous:
                        while not self._queue and not self._closed:
                            self._cond.wait()
                    else:
                        self._wait_for_batch()
                    if self._closed:
                        break
                    self._admit()
                    self._last_batch = d.active
                    if not self.continuous:
                        self.stats.batches += 1
                elif self.continuous:
                    self._admit()
            self._step()
        for r in d.rows + d._new:  # rows still decoding when the server shuts down
            r.finish("cancelled")

    def _step(self) -> None:
        d = self._decoder
        if not d.active:
            return
        self.stats.running = d.active
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, d.active)
        try:
            done = d.step()
        except Exception as e:  # report to the clients instead of killing the worker thread
            log.exception("generation failed")
            done = d.fail(f"generation failed: {type(e).__name__}: {e}")
        if self.continuous:
            self.stats.batches += 1
        self.stats.running = d.active
        self.stats.rows_done += len(done)
        self.stats.rows_cancelled += sum(r.finish_reason == "cancelled" for r in done)
        self.stats.tokens_generated += sum(len(r.token_ids) for r in done)

    def run_batch(self, rows: Sequence[Row]) -> None:
        """Decode `rows` to the end in the calling thread (tests, benchmarks); not while the worker runs."""
        try:
            run_to_end(Decoder(self.model, self.tokenizer, self.context_length), rows)
        except Exception as e:
            log.exception("generation failed")
            for r in rows:
                r.finish("error", error=f"generation failed: {type(e).__name__}: {e}")


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
        """Chat checkpoints (and Hugging Face dirs with a template) get the template; plain LMs get text
        (owngpt.conversation.is_chat_model: the rule every front end uses)."""

        return is_chat_model(self.meta, self.tokenizer)

    @property
    def mode(self) -> str:
        """What the web page offers: "chat", "completion" (a plain language model continues text) or "classify"."""
        if self.engine is None:
            return "classify"
        return "chat" if self.chat_template else "completion"


def load(
    ckpt: str | Path,
    *,
    max_batch_size: int = 16,
    max_queue: int = 256,
    batch_wait_ms: float = 20.0,
    continuous: bool = True,
    device: Any = None,
) -> Loaded:
    """Load a checkpoint dir (safetensors only) as an Engine (lm, chat, mmi) or a Classifier (classify), on `device`
    (a torch device; None = cpu).

    `ckpt` may also be a Hub id (cached, or fetched once; see owngpt.models.resolve_checkpoint)."""

    ckpt = open_checkpoint(str(ckpt))
    path, meta, task = ckpt.path, ckpt.meta, ckpt.task
    tokenizer = ckpt.tokenizer()  # with a pad id: batches are padded
    if task == "classify":
        model = ckpt.model("classify", device=device or "cpu").eval()
        if getattr(model.config, "pad_token_id", None) is None:  # GPT-2 classifiers pool at the last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id
        # texts are cut at the position table, as serving always did (owngpt predict cuts at the trained block)
        max_length = position_table(model.config) or DEFAULT_CONTEXT
        return Loaded(path, meta, task, tokenizer, classifier=Classifier(model, tokenizer, max_length))
    if task not in ("lm", "chat", "mmi"):
        raise CheckpointError(f"{path}/owngpt.json: task {task!r} cannot be served (expected lm, chat, mmi, classify)")
    quiet_loading()
    # the model carries its trained context (owngpt_context): the window every row reads (owngpt.engine)
    model = ckpt.model("lm", device=device or "cpu").eval()
    pack_for_decode(model)  # CPU fp32 weights laid out once for the decode kernels (owngpt.decode_kernels)
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        batch_wait_ms=batch_wait_ms,
        continuous=continuous,
    )
    return Loaded(path, meta, task, tokenizer, engine=engine)
