"""The one decode engine behind `owngpt generate`, `owngpt chat`, the Python API and `owngpt serve`.

A *row* is one sequence being generated, with its own sampling settings, stop strings, end tokens, length limit,
random generator and cancel flag. A `Decoder` holds the rows decoding together and advances all of them by one token
per `step()`; rows can join (`add`) and leave between any two steps, which is what continuous batching in the
server is built on, and what `run_to_end` (the CLI, the API) uses with a fixed set of rows.

The window. A model sees at most `context` tokens: the context it was *trained* for (owngpt.json `trained_context`,
see docs/architecture.md), not the size of its position table. Past it, the window slides as in nanoGPT's
`generate` (the model sees the last tokens of the text). Keeping the KV cache valid while the window slides is not
possible for absolute position embeddings (every position changes when the window moves by one token), so:

- inside the window, decoding uses a KV cache (one token through the model per step);
- when the next token would not fit, the window jumps forward to the last `context - shift + 1` tokens and is
  re-filled (one forward over those tokens, batch 1); decoding with the cache then resumes for `shift` more steps.

`shift` (default a quarter of the context) trades exactness for speed: with `shift=1` the model sees exactly the
last `context` tokens at every step (nanoGPT's semantics) and each step is a re-fill; with shift = C/4 it sees
between 3/4 C and C tokens and re-fills every C/4 tokens, so the cost past the context is about one window forward
per C/4 tokens on top of cached decoding. Every step records the window it used (`Row.window`), and the tests check
that the logits equal a fresh forward pass over exactly that window.

Rows of different lengths share one batched KV cache in preallocated buffers (`_SlotCache`: each row a slot, its
tokens right-aligned, zeros on the left, masked); position ids are given explicitly (position 0 is the window's first
token), so a row in a batch computes what it would alone. A cached step of a packed fp32 or an int8 GPT-2 or LLaMA on the CPU
runs `owngpt.decode_step`'s hand-written step over these buffers; any other model runs its own forward.

Sampling uses transformers' logits processors (repetition penalty, no-repeat n-grams, temperature, top-k, top-p)
row by row, and each row draws from its own `torch.Generator` (a seeded row gives the same text whatever shares its
batch). Beam search is not here: it stays with transformers' `generate`, inside the trained context
(owngpt.generation).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from owngpt.decode_step import decode_step_for

log = logging.getLogger("owngpt.engine")

# Prompt tokens kept as left context for incremental decoding, so that tokenizers whose decoding of a token depends
# on its left neighbour (leading-space handling) decode the first new token as they would in the middle of the text.
_DECODE_CONTEXT = 4


@dataclass(frozen=True)
class RowSettings:
    """How one row is generated."""

    max_tokens: int  # new tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_ids: frozenset[int] = frozenset()  # token ids that end the row (end-of-text, end-of-turn)
    seed: int | None = None
    # Past the context: True = the window slides (plain text continues); False = the row ends with
    # finish_reason "length" (a chat reply must not lose the start of its own conversation).
    slide: bool = True
    lstrip: bool = False  # drop whitespace at the start of the text (a chat reply after `Bot:` or a template)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        return self.greedy and self.repetition_penalty == 1.0 and self.no_repeat_ngram_size == 0

    @property
    def logits_read(self) -> int:
        """How many of its largest logits the row's choice depends on: 1 (greedy), top_k (sampling among the top k:
        temperature, top-k and top-p never look below them), or 0 = all of them (penalties change logits anywhere in
        the vocabulary; sampling with no top-k limit)."""
        if self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0:
            return 0
        return 1 if self.greedy else max(self.top_k, 0)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that never split a character.

    With byte fallback or byte-level BPE one character can span several tokens; decoding a partial sequence gives
    U+FFFD. Like vLLM's and TGI's detokenizers (and tokenizers' DecodeStream, used where the tokenizer has a
    `tokenizers` backend), we decode a short window (a few tokens already emitted + the new ones)
    and only release the new text once it no longer ends in U+FFFD. Concatenated pieces equal decoding the whole
    for valid text. At the end (`flush`), an incomplete character is dropped rather than shown as U+FFFD: it is a
    reply cut by a length limit, not text. (Invalid byte sequences mid-text, from an untrained model, still show.)
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids[-_DECODE_CONTEXT:]) if _DECODE_CONTEXT else []
        # The window must start on a character boundary: cut inside a character made of byte tokens (byte fallback,
        # byte-level BPE), its leading bytes decode as U+FFFD, and every piece would carry them. Drop up to three
        # leading continuation bytes (a UTF-8 character has at most four); a context that still starts with U+FFFD
        # (invalid bytes the model wrote) is not used at all.
        for _ in range(3):
            if not self.ids or not self._decode(self.ids).startswith("\ufffd"):
                break
            self.ids = self.ids[1:]
        if self.ids and self._decode(self.ids).startswith("\ufffd"):
            self.ids = []
        self.prefix = 0  # start of the window
        self.read = len(self.ids)  # ids before this have been released as text
        # tokenizers' public DecodeStream does the window's work in Rust; the window over decode() below stays for
        # tokenizers without a `tokenizers` backend and for streams DecodeStream refuses (invalid bytes)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream: Any = None
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(ids=list(self.ids), skip_special_tokens=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.stream is not None:
            try:
                piece = self.stream.step(self.backend, int(token_id))
            except Exception:  # DecodeStream refuses a window whose decoded start changed (invalid bytes from an
                # untrained model, which ByteFallback decodes as one U+FFFD): the window below goes on from here
                self.stream = None
            else:
                if piece is None:
                    return ""
                # the window's bookkeeping too: flush() (or the window, if it takes over) decodes from the start of
                # the last released piece, a character boundary
                self.prefix, self.read = self.read, len(self.ids)
                return piece
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is held back, without the U+FFFD of an incomplete character at the very end."""
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if new_text.endswith("\ufffd"):
            # An incomplete character is at most 3 held-back byte tokens that decode cleanly once removed; a longer
            # run of invalid bytes (the model really wrote them) stays as it is, as decode() shows it.
            for k in range(1, 4):
                if len(self.ids) - k < self.read:
                    break
                shorter = self._decode(self.ids[self.prefix : len(self.ids) - k])
                if not shorter.endswith("\ufffd"):
                    new_text = shorter
                    break
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text) :]


def held_back(buf: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a stop string (it may still become one)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), best, -1):
            if buf.endswith(s[:k]):
                best = k
                break
    return best


# on_event(row, text_piece, finished): called from the decoding thread as text arrives and once when the row ends.
EventCallback = Callable[["Row", str, bool], None]


class Row:
    """One sequence being generated: prompt, settings, tokens and text so far, the window, why it ended."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        settings: RowSettings,
        on_event: EventCallback | None = None,
        cancel_flag: Any = None,
    ) -> None:
        import torch

        self.prompt_ids = list(prompt_ids)
        self.settings = settings
        self.on_event = on_event
        self.cancel_flag = cancel_flag  # a threading.Event (is_set()) or a callable, checked every step
        seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.token_ids: list[int] = []  # new tokens (an end token excluded)
        self.text = ""
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.error: str | None = None
        self.cancelled = False
        self.window: tuple[int, int] = (0, 0)  # ids[start:end] the last step's logits were computed from
        self.trace: list[tuple[int, int, Any]] | None = None  # set to [] to record (start, end, logits) every step
        self._pending = ""  # decoded text held back because it may be the start of a stop string
        self._decoder: IncrementalDecoder | None = None
        self._processors: Any = None
        # decoding state, owned by the Decoder
        self.ids: list[int] = []  # prompt + new tokens (what the window reads)
        self.start = 0  # first id of the window
        self.cached = 0  # ids[start : start + cached] are in the KV cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the decoder to drop this row at its next step (a plain attribute write, safe from any thread)."""
        self.cancelled = True

    def is_cancelled(self) -> bool:
        if self.cancelled:
            return True
        f = self.cancel_flag
        if f is None:
            return False
        return bool(f.is_set() if hasattr(f, "is_set") else f() if callable(f) else f)

    # --- called from the decoding thread only ---------------------------------------------------------------
    def begin(self, tokenizer: Any, start_id: int) -> None:
        self.ids = list(self.prompt_ids) or [start_id]  # an empty prompt starts a document: end-of-text
        self._decoder = IncrementalDecoder(tokenizer, self.prompt_ids)
        self._processors = _processors(self.settings)

    def feed(self, token_id: int) -> None:
        if self.finished:
            return
        if token_id in self.settings.stop_ids:
            self.finish("stop")
            return
        self.token_ids.append(int(token_id))
        self.ids.append(int(token_id))
        self._add(self._decoder.push(token_id) if self._decoder is not None else "")
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
        keep = 0 if final else held_back(buf, stops)
        self._pending = buf[len(buf) - keep :]
        self._emit(buf[: len(buf) - keep])

    def _emit(self, piece: str) -> None:
        if self.settings.lstrip and not self.text:
            piece = piece.lstrip()
        if piece:
            self.text += piece
            self._notify(piece, False)

    def choose(self, logits: Any) -> int:
        """The next token from this row's logits (V,), with its settings and its own generator."""
        import torch

        s = self.settings
        if s.plain_greedy:
            return int(logits.argmax())
        scores = logits.float().unsqueeze(0)  # (1, V)
        hist = torch.tensor([self.ids], dtype=torch.long, device=scores.device)
        for p in self._processors:
            scores = p(hist, scores)
        if s.greedy:
            return int(scores[0].argmax())
        # the row's generator lives on the CPU (a seed gives the same text on any device)
        probs = torch.softmax(scores[0], dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _processors(s: RowSettings) -> list[Any]:
    """transformers' logits processors for one row, in the order its `generate` applies them."""
    from transformers import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out: list[Any] = []
    if s.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.no_repeat_ngram_size > 0:
        out.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
    if not s.greedy:
        if s.temperature != 1.0:
            out.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k > 0:
            out.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            out.append(TopPLogitsWarper(s.top_p))
    return out


def default_shift(context: int) -> int:
    """How far the window jumps when it moves (see the module docstring): a quarter of the context."""
    return max(1, context // 4)


class _SlotCache:
    """The batch's KV cache in preallocated buffers, per layer (B_cap, H, L_cap, D): rows are slots 0..B-1, their
    tokens right-aligned at columns [L - cached, L) (zeros on the left, masked).

    Hand-written because transformers' DynamicCache grows by concatenation (a copy of the whole cache every step) and
    its rows cannot join or leave: here a step writes one column in place, a row joins by writing its slot and leaves
    by moving the last slot into its place, and the columns every row has left behind are dropped only when the
    buffer is full (a copy every L_cap - context steps).
    """

    def __init__(self, context: int) -> None:
        self.context = context
        self.k: list[Any] = []  # per layer (B_cap, H, L_cap, D)
        self.v: list[Any] = []
        self.B = 0  # rows in use
        self.L = 0  # columns in use

    def _alloc(self, like: Sequence[tuple[Any, Any]], b_cap: int, l_cap: int) -> None:
        old_k, old_v = self.k, self.v
        self.k = [k.new_zeros(b_cap, k.shape[1], l_cap, k.shape[3]) for k, _ in like]
        self.v = [v.new_zeros(b_cap, v.shape[1], l_cap, v.shape[3]) for _, v in like]
        for i in range(len(old_k)):
            self.k[i][: self.B, :, : self.L] = old_k[i][: self.B, :, : self.L]
            self.v[i][: self.B, :, : self.L] = old_v[i][: self.B, :, : self.L]

    def _grown(self, need: int) -> int:
        """A column capacity for `need` columns: doubling (so a short generation never allocates the whole context)
        up to the context plus a quarter (so compaction, a copy, happens at most every context/4 steps)."""
        cap = self.k[0].shape[2] if self.k else 32
        return max(need, min(2 * cap, self.context + max(16, self.context // 4) + 1))

    def append(self, kv: Sequence[tuple[Any, Any]]) -> None:
        """Add a row (its window's keys and values, per layer (1, H, n, D)) in slot B."""
        n = kv[0][0].shape[2]
        if not self.k:
            self._alloc(kv, 4, self._grown(2 * (n + 1)))
        if self.B == self.k[0].shape[0]:
            self._alloc(kv, 2 * self.B, self.k[0].shape[2])
        if n > self.L:  # the new row is longer than every row here: shift them right
            if n + 1 > self.k[0].shape[2]:
                self._alloc(kv, self.k[0].shape[0], self._grown(n + 1))
            d = n - self.L
            for t in self.k + self.v:
                t[: self.B, :, d:n] = t[: self.B, :, : self.L].clone()
                t[: self.B, :, :d] = 0
            self.L = n
        i = self.B
        for tk, tv, (k, v) in zip(self.k, self.v, kv, strict=True):
            for t, new in ((tk, k), (tv, v)):
                t[i, :, : self.L - n] = 0
                t[i, :, self.L - n : self.L] = new[0]
        self.B += 1

    def remove(self, i: int) -> None:
        """Free slot i: the last row moves into it (the caller moves its Row the same way)."""
        last = self.B - 1
        if i != last:
            for t in self.k + self.v:
                t[i, :, : self.L] = t[last, :, : self.L]
        self.B -= 1
        if self.B == 0:
            self.L = 0

    def make_room(self, longest: int) -> None:
        """Make sure one more column fits: drop the columns no row uses any more, or grow the buffers."""
        if self.L < self.k[0].shape[2]:
            return
        drop = self.L - longest
        if drop > 0:
            for t in self.k + self.v:
                t[: self.B, :, : self.L - drop] = t[: self.B, :, drop : self.L].clone()
            self.L -= drop
        if self.L >= self.k[0].shape[2]:
            self._alloc(list(zip(self.k, self.v)), self.k[0].shape[0], self._grown(self.L + 1))

    def as_transformers_cache(self) -> Any:
        """A transformers Cache whose layers write the next column(s) into these buffers in place."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        owner = self

        class _Layer(DynamicLayer):
            def __init__(self, idx: int) -> None:
                super().__init__()
                self.idx, self.is_initialized = idx, True
                self.keys = owner.k[idx][: owner.B, :, : owner.L]
                self.values = owner.v[idx][: owner.B, :, : owner.L]
                self.device = self.keys.device

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                q = key_states.shape[2]
                L = owner.L
                owner.k[self.idx][: owner.B, :, L : L + q] = key_states
                owner.v[self.idx][: owner.B, :, L : L + q] = value_states
                self.keys = owner.k[self.idx][: owner.B, :, : L + q]
                self.values = owner.v[self.idx][: owner.B, :, : L + q]
                return self.keys, self.values

            def get_seq_length(self) -> int:
                return owner.L

        cache = DynamicCache()
        cache.layers = [_Layer(i) for i in range(len(self.k))]
        return cache


class Decoder:
    """Rows decoding together over one batched KV cache; `step()` advances every row by one token."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        context: int,
        *,
        shift: int | None = None,
        use_cache: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context = int(context)
        self.shift = min(max(1, shift or default_shift(self.context)), self.context)
        self.use_cache = use_cache
        eos = tokenizer.eos_token_id
        self.start_id = eos if eos is not None else 0
        self.rows: list[Row] = []  # row i is slot i of the cache
        self._cache = _SlotCache(self.context)
        self._new: list[Row] = []  # added, not yet prefilled
        self._stepping: list[Row] = []  # the rows of the step in progress (fail() must reach those it moved)
        self.device = next(model.parameters()).device
        self._cache_kw = _cache_arg(model)
        self._keeps_logits = _accepts(model, "logits_to_keep")
        # a packed fp32 or int8 GPT-2 / LLaMA decodes through a hand-written step over the same weights (owngpt.decode_step)
        self._fast_step = decode_step_for(model) if use_cache else None

    @property
    def active(self) -> int:
        return len(self.rows) + len(self._new)

    def add(self, row: Row) -> None:
        """Admit a row; it is prefilled at the next step."""
        row.begin(self.tokenizer, self.start_id)
        self._new.append(row)

    def _drop(self, keep: Callable[[Row], bool]) -> None:
        """Remove the rows for which keep(row) is false (the last slot moves into each freed one)."""
        i = 0
        while i < len(self.rows):
            if keep(self.rows[i]):
                i += 1
                continue
            if self.use_cache:
                self._cache.remove(i)
            self.rows[i] = self.rows[-1]
            self.rows.pop()

    # --- forward passes ---------------------------------------------------------------------------------------
    def _prefill(self, rows: list[Row]) -> tuple[Any, Any]:
        """One forward over the windows of `rows`, all of one length (positions from 0, no padding); returns their
        last logits (G, V) and their cache (per layer (G, H, n, D)). Rows of one length share a forward: it reads the
        weights once for the group instead of once per row (bench/bench_decode.py measures the batch-8 case)."""
        import torch

        windows = [r.ids[r.start :] for r in rows]
        x = torch.tensor(windows, dtype=torch.long, device=self.device)  # (G, n)
        pos = torch.arange(x.shape[1], device=self.device).unsqueeze(0).expand(len(rows), -1)  # (G, n)
        # the LM head over the last position only: the other positions' logits are never read (a prompt of n tokens
        # would otherwise cost n times the head's (V x C) product)
        kw = {"logits_to_keep": 1} if self._keeps_logits else {}
        out = self.model(input_ids=x, position_ids=pos, use_cache=self.use_cache, **kw)
        for r, w in zip(rows, windows, strict=True):
            r.cached = len(w)
            r.window = (r.start, len(r.ids))
        kv = None
        if self.use_cache:
            kv = [(layer.keys, layer.values) for layer in _out_cache(out).layers]
        return out.logits[:, -1], kv

    def _decode(self) -> Any:
        """One token through the model for every row in the batch cache; returns logits (B, V)."""
        import torch

        rows, c = self.rows, self._cache
        c.make_room(max(r.cached for r in rows))
        L = c.L
        if self._fast_step is not None:
            ids = torch.tensor([r.ids[-1] for r in rows], dtype=torch.long)  # (B,)
            pos = torch.tensor([r.cached for r in rows], dtype=torch.long)  # (B,)
            valid_from = None if all(r.cached == L for r in rows) else L - pos  # rows' first cached columns
            # rows that read only their k largest logits (and keep no trace of them) let the step screen the LM head
            reads = [0 if r.trace is not None else r.settings.logits_read for r in rows]
            top_k = 0 if 0 in reads else max(reads)
            logits = self._fast_step(ids, pos, c.k, c.v, len(rows), L, valid_from, top_k=top_k)
        else:
            logits = self._forward_one(rows, L)
        c.L += 1
        for r in rows:
            r.cached += 1
            r.window = (r.start, len(r.ids))
        return logits

    def _forward_one(self, rows: list[Row], L: int) -> Any:
        """The model's own forward for one token per row over the batch cache (L columns): logits (B, V)."""
        import torch

        c = self._cache
        x = torch.tensor([[r.ids[-1]] for r in rows], dtype=torch.long, device=self.device)  # (B, 1)
        pos = torch.tensor([[r.cached] for r in rows], dtype=torch.long, device=self.device)  # (B, 1)
        mask = None  # no padding in the cache (every row as long as the batch): no mask, the fast attention path
        if any(r.cached != L for r in rows):
            mask = torch.zeros(len(rows), L + 1, dtype=torch.long, device=self.device)  # (B, L + 1)
            for i, r in enumerate(rows):
                mask[i, L - r.cached :] = 1
        kw = {self._cache_kw: c.as_transformers_cache()}
        out = self.model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        return out.logits[:, -1]

    def _needs_refill(self, row: Row) -> bool:
        """Whether the next step cannot extend the row's cache: the window must move (or there is no cache)."""
        return not self.use_cache or len(row.ids) - row.start > self.context

    def step(self) -> list[Row]:
        """Advance every row by one token; return the rows that finished (they have left the batch)."""
        import torch

        everyone = self._stepping = self.rows + self._new
        with torch.no_grad():
            # 1. Rows that cannot continue: cancelled, or at the context without sliding.
            for r in everyone:
                if r.is_cancelled():
                    r.finish("cancelled")
                elif len(r.ids) - r.start > self.context and not r.settings.slide:
                    r.finish("length")
            # 2. Rows whose window moves leave the batch cache and are re-filled with the new rows.
            refill = [r for r in self.rows if not r.finished and self._needs_refill(r)]
            self._drop(lambda r: not r.finished and not self._needs_refill(r))
            new = [r for r in self._new if not r.finished]
            self._new = []
            logits: dict[int, Any] = {}
            if self.rows:
                for r, lg in zip(self.rows, self._decode(), strict=True):
                    logits[id(r)] = lg
            groups: dict[int, list[Row]] = {}
            for r in refill + new:
                if len(r.ids) - r.start > self.context:
                    # the window jumps to the last context - shift + 1 tokens (all of them for a new prompt)
                    keep = self.context if r in new else self.context - self.shift + 1
                    r.start = len(r.ids) - keep
                groups.setdefault(len(r.ids) - r.start, []).append(r)
            for group in groups.values():
                lgs, kv = self._prefill(group)
                for g, r in enumerate(group):
                    logits[id(r)] = lgs[g]
                    if kv is not None:
                        self._cache.append([(k[g : g + 1], v[g : g + 1]) for k, v in kv])
                    self.rows.append(r)
            # 3. Sample, feed, stream.
            for r in self.rows:
                lg = logits[id(r)]
                if r.trace is not None:
                    r.trace.append((r.window[0], r.window[1], lg.detach().clone()))
                r.feed(r.choose(lg))
            self._drop(lambda r: not r.finished)
        self._stepping = []
        return [r for r in everyone if r.finished]

    def fail(self, message: str) -> list[Row]:
        """End every row with an error (the caller reports it); the decoder is empty afterwards."""
        # A step that failed may have taken new and re-filled rows out of both lists before their prefill: they are
        # in _stepping only, and their clients wait for them to end too.
        rows = list({id(r): r for r in self.rows + self._new + self._stepping}.values())
        for r in rows:
            r.finish("error", error=message)
        self.rows, self._new, self._stepping, self._cache = [], [], [], _SlotCache(self.context)
        return rows


def _accepts(model: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def _cache_arg(model: Any) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); older 5.x know only the old."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _out_cache(out: Any) -> Any:
    c = out.get("cache") if hasattr(out, "get") else None
    return c if c is not None else out.past_key_values


def run_to_end(decoder: Decoder, rows: Sequence[Row]) -> None:
    """Add `rows` and step until every one has finished (the CLI and the Python API)."""
    for r in rows:
        decoder.add(r)
    while decoder.active:
        decoder.step()
