"""Text generation on top of transformers' `generate`: sampling settings, batching, streaming, stop strings, cancel.

What this module owns is the pipeline *around* `model.generate` (KV cache, greedy/sampling/beam search, top-k/top-p,
repetition penalty, no-repeat-ngram all come from transformers):

- `SamplingParams`: the user's settings, validated with errors that name the flag and the accepted range;
- `load_for_generation(spec)`: a checkpoint dir or Hub id -> model (eval mode), tokenizer and owngpt.json metadata;
- `generate_batch(...)`: left-pads a batch of prompts, calls `model.generate` once, and turns each row's new tokens
  into text incrementally (streamed per row through a callback, multi-byte characters never split), applies stop
  strings and per-row cancellation, and reports per-row finish reason and token counts. The CLI (`owngpt generate`,
  `owngpt chat`), the Python API (`owngpt.api`) and the server all go through it.

It is not a sampler: no logits are touched here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from owngpt.errors import CheckpointError, ConfigError

# Prompt tokens kept as left context for incremental decoding, so that tokenizers whose decoding of a token depends
# on its left neighbour (leading-space handling) decode the first new token as they would in the middle of the text.
_DECODE_CONTEXT = 4


@dataclass
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy (as in OpenAI's API)."""

    max_new_tokens: int = 200  # tokens generated per sample (at most; stops earlier at end-of-text or a stop string)
    temperature: float = 0.8  # 0 = greedy (argmax); higher = more random
    top_k: int = 50  # sample among the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # nucleus sampling: smallest set of tokens whose probabilities add up to p; 1 = no limit
    repetition_penalty: float = 1.0  # >1 discourages tokens already present (CTRL rule; correct for negative logits)
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this size; 0 = off
    num_beams: int = 1  # beam search width (with temperature 0: deterministic beam search); 1 = off
    stop: list[str] = field(default_factory=list)  # stop strings: the text ends before the first one
    seed: int | None = None  # same seed, same sample (on the same machine and versions)
    num_return_sequences: int = 1  # samples per prompt

    # The flag each field is set by, for error messages.
    FLAGS = {
        "max_new_tokens": "--max-new-tokens",
        "temperature": "--temperature",
        "top_k": "--top-k",
        "top_p": "--top-p",
        "repetition_penalty": "--repetition-penalty",
        "no_repeat_ngram_size": "--no-repeat-ngram-size",
        "num_beams": "--num-beams",
        "stop": "--stop",
        "seed": "--seed",
        "num_return_sequences": "--num-samples",
    }

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (unknown names raise ConfigError); validated."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        new = SamplingParams(**{**asdict(self), **changes})
        new.validate()
        return new

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, context_length: int | None = None) -> SamplingParams:
        """Raise ConfigError naming the flag and the accepted range for any out-of-range value; return self."""

        def bad(name: str, value: Any, accepted: str) -> ConfigError:
            return ConfigError(f"{self.FLAGS[name]} {value!r}: must be {accepted}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if context_length is not None and self.max_new_tokens >= context_length:
            raise bad(
                "max_new_tokens",
                self.max_new_tokens,
                f"smaller than the model's context of {context_length} tokens (prompt included)",
            )
        if not is_num(self.temperature) or self.temperature < 0 or self.temperature > 100:
            raise bad("temperature", self.temperature, "between 0 (greedy) and 100")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 = no limit)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1] (1 = no limit)")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "> 0 (1 = off, >1 discourages repeats)")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", self.no_repeat_ngram_size, "an integer >= 0 (0 = off)")
        if not is_int(self.num_beams) or not 1 <= self.num_beams <= 64:
            raise bad("num_beams", self.num_beams, "an integer from 1 (off) to 64")
        if not is_int(self.num_return_sequences) or not 1 <= self.num_return_sequences <= 256:
            raise bad("num_return_sequences", self.num_return_sequences, "an integer from 1 to 256")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise bad(
                "num_return_sequences",
                self.num_return_sequences,
                f"at most --num-beams ({self.num_beams}) with beam search",
            )
        if self.num_beams == 1 and self.greedy and self.num_return_sequences > 1:
            raise bad(
                "num_return_sequences",
                self.num_return_sequences,
                "1 with greedy decoding (--temperature 0 gives the same text every time); use a temperature "
                "> 0 or --num-beams",
            )
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", self.stop, "a list of non-empty strings")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "an integer >= 0")
        return self


@dataclass
class GenerationResult:
    """One generated sequence. Rows are ordered prompt by prompt, then sample by sample."""

    index: int  # row in the batch's output: prompt_index * num_return_sequences + sample number
    prompt_index: int
    token_ids: list[int]  # the new tokens (end-of-text token and anything after the end excluded)
    text: str  # their text, cut before a stop string
    finish_reason: str  # "stop" (end-of-text or a stop string), "length" (max_new_tokens or context), "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class LoadedModel:
    """A model ready to generate, and what owngpt knows about it."""

    model: Any
    tokenizer: Any
    path: Path
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        return self.meta.get("task", "lm")

    @property
    def context_length(self) -> int:
        return context_length(self.model)


def context_length(model: Any) -> int:
    """Tokens the model can attend to (prompt + generated)."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def load_for_generation(spec: str, task: str | None = None) -> LoadedModel:
    """Resolve a checkpoint (local dir or Hub id), load tokenizer and model (safetensors only), in eval mode.

    A classification checkpoint cannot generate: refused with a hint to use `owngpt predict`.
    """
    from owngpt.checkpoint import load_model, read_meta
    from owngpt.models import resolve_checkpoint
    from owngpt.tokenizer import load_tokenizer

    path = resolve_checkpoint(spec)
    meta = read_meta(path)
    ckpt_task = meta.get("task", "lm")
    if ckpt_task == "classify":
        raise CheckpointError(
            f"{path} is a classification checkpoint (owngpt.json task 'classify'): it labels text "
            f"and cannot generate; use `owngpt predict {spec} --text ...`"
        )
    tokenizer = load_tokenizer(path)
    model = load_model(path, task=task or ckpt_task)
    model.eval()
    if tokenizer.pad_token_id is None:  # left padding of a batch needs a pad id; masked out, so any id works
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, path=Path(path), meta=meta)


def default_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-text ids for plain generation: the model's generation config, else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if isinstance(eos, int) else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that never split a character.

    With byte fallback or byte-level BPE one character can span several tokens; decoding a partial sequence gives
    U+FFFD. tokenizers' `DecodeStream` does what vLLM's and TGI's detokenizers do: decode a short window (a few tokens
    already emitted + the new ones) and release the new text once it no longer ends in U+FFFD; the last prompt ids
    prefill it as left context. Concatenated pieces equal decoding the whole for valid text. (Invalid byte sequences,
    from an untrained model, can differ: tokenizers' ByteFallback decoder turns a whole run of byte tokens into
    U+FFFD when any byte is invalid, while the pieces keep the valid ones.) A tokenizer without a `tokenizers`
    backend, and a stream DecodeStream refuses (such invalid bytes), take the same window through decode().
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids[-_DECODE_CONTEXT:]) if _DECODE_CONTEXT else []
        self.prefix = 0  # start of the window
        self.read = len(self.ids)  # ids before this have been released as text
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = None
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
                # the same bookkeeping as the window's: flush() (or the window, if it takes over) decodes from the
                # start of the last released piece, a character boundary
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
        """Whatever is held back (an incomplete character at the very end decodes as U+FFFD, as in decode())."""
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text) :]


class _Row:
    """One output row: new token ids, the text released so far, stop strings, why it ended."""

    def __init__(
        self,
        index: int,
        prompt_index: int,
        prompt: Sequence[int],
        tokenizer: Any,
        eos: set[int],
        stops: Sequence[str],
        on_text: Callable[[int, str], None] | None,
    ) -> None:
        self.index, self.prompt_index, self.prompt_tokens = index, prompt_index, len(prompt)
        self.decoder = IncrementalDecoder(tokenizer, prompt)
        self.eos, self.stops, self.on_text = eos, list(stops), on_text
        self.token_ids: list[int] = []
        self.text = ""
        self.pending = ""  # decoded text held back because it could be the start of a stop string
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token_id: int) -> None:
        if self.finished:
            return
        if token_id in self.eos:
            self.finish("stop")
            return
        self.token_ids.append(int(token_id))
        self._add(self.decoder.push(token_id))

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self._add(self.decoder.flush(), final=True)
        if not self.finished:  # _add may have found a stop string in the flushed text
            self.finish_reason = reason

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            if self.on_text is not None:
                self.on_text(self.index, piece)

    def _add(self, piece: str, final: bool = False) -> None:
        if not self.stops:
            self._emit(piece)
            return
        buf = self.pending + piece
        # Released text never ends with a prefix of a stop string, so a stop string can only start inside `buf`.
        hits = [p for p in (buf.find(s) for s in self.stops) if p >= 0]
        if hits:
            self.pending = ""
            self._emit(buf[: min(hits)])
            self.finish_reason = "stop"
            return
        keep = 0 if final else _held_back(buf, self.stops)
        self.pending = buf[len(buf) - keep :]
        self._emit(buf[: len(buf) - keep])

    def result(self) -> GenerationResult:
        return GenerationResult(
            index=self.index,
            prompt_index=self.prompt_index,
            token_ids=self.token_ids,
            text=self.text,
            finish_reason=self.finish_reason or "length",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
        )


def _held_back(buf: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), best, -1):
            if buf.endswith(s[:k]):
                best = k
                break
    return best


def _is_set(flag: Any) -> bool:
    return flag.is_set() if hasattr(flag, "is_set") else bool(flag)


def _make_observer(rows: list[_Row], nrs: int, stop_flags: Sequence[Any] | None):
    """A StoppingCriteria that feeds each row's newest token to its decoder and reports which rows are done.

    Why a stopping criterion and not a BaseStreamer: in transformers 5 the streamer receives step t's tokens *after*
    the stopping criteria of step t ran, so a stop string (or a cancel) seen in streamed text would stop a step late
    and leak one token. Decoding here keeps the text, stop strings, cancellation and transformers' notion of which
    rows are finished in the same step. (End-of-text ids are also stopped by transformers' own EOS criterion.)
    """
    import torch
    from transformers import StoppingCriteria

    class _Observer(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
            last = input_ids[:, -1].tolist()
            done = []
            for row, tok in zip(rows, last, strict=True):
                if not row.finished:
                    row.feed(tok)
                    if not row.finished and stop_flags is not None and _is_set(stop_flags[row.prompt_index]):
                        row.finish("cancelled")
                done.append(row.finished)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _Observer()


def generation_config(model: Any, tokenizer: Any, params: SamplingParams, eos_ids: Sequence[int]):
    """transformers' GenerationConfig for `params`, every field set explicitly so nothing leaks in from the
    checkpoint's saved generation_config.json (a Hub model may ship do_sample=True, temperature=0.6...)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(eos_ids) or [0])[0]
    kw: dict[str, Any] = dict(
        max_new_tokens=params.max_new_tokens,
        num_beams=params.num_beams,
        num_return_sequences=params.num_return_sequences,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        eos_token_id=list(eos_ids) or None,
        pad_token_id=pad,
        bos_token_id=getattr(model.generation_config, "bos_token_id", None),
        use_cache=True,
    )
    if params.greedy:
        # transformers' neutral values: anything else (or a value inherited from the checkpoint) makes it warn.
        kw.update(do_sample=False, temperature=1.0, top_k=50, top_p=1.0)
    else:
        kw.update(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.num_beams > 1:
        kw.update(early_stopping=True, length_penalty=1.0)
    return GenerationConfig(**kw)


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    streamer_callback: Callable[[int, str], None] | None = None,
    stop_flags: Sequence[Any] | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> list[GenerationResult]:
    """Generate for a batch of prompts with one `model.generate` call.

    - `prompt_ids`: one list of ids per prompt; an empty prompt starts from the end-of-text token (unconditional
      sampling, as GPT-2's generate_unconditional_samples). Prompts longer than the context allows for
      `max_new_tokens` keep their last tokens.
    - `streamer_callback(row, text_piece)`: called as text becomes available (rows ordered prompt by prompt, then
      sample by sample). Pieces never split a character and never include (part of) a stop string. Beam search
      cannot stream (transformers forbids it): each row's text then arrives in one piece at the end.
    - `stop_flags[prompt_index]`: a bool (in a list the caller mutates) or an object with `is_set()`
      (threading.Event); once set, that prompt's rows stop at the next token with finish_reason "cancelled".
    - `eos_token_ids`: ids that end a row (default: the model's / tokenizer's end-of-text). Pass `[]` to never stop
      before max_new_tokens (benchmarks).
    """
    import torch
    from transformers import StoppingCriteriaList

    params.validate(context_length(model))
    if not prompt_ids:
        return []
    eos = list(default_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
    start_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (eos or [0])[0]
    max_prompt = context_length(model) - params.max_new_tokens
    prompts = [list(p)[-max_prompt:] if len(p) else [start_id] for p in prompt_ids]
    if stop_flags is not None and len(stop_flags) != len(prompts):
        raise ValueError(f"stop_flags has {len(stop_flags)} entries for {len(prompts)} prompts")

    cfg = generation_config(model, tokenizer, params, eos)
    nrs = params.num_return_sequences
    width = max(len(p) for p in prompts)
    pad = cfg.pad_token_id
    # Left padding: every row's next token is predicted from the last column; the mask hides the pads and
    # transformers derives position ids from it.
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    rows = [
        _Row(i, i // nrs, prompts[i // nrs], tokenizer, set(eos), params.stop, streamer_callback)
        for i in range(len(prompts) * nrs)
    ]
    kwargs: dict[str, Any] = {}
    beam = params.num_beams > 1
    if beam:
        # Beam hypotheses are reordered every step, so rows cannot be followed token by token: transformers' own
        # stop-string criterion stops the beams and each row's text is cut afterwards.
        if params.stop:
            cfg.stop_strings = list(params.stop)
            kwargs["tokenizer"] = tokenizer
        if stop_flags is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_make_beam_cancel(stop_flags)])
    else:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_make_observer(rows, nrs, stop_flags)])

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg, **kwargs)

    new_tokens = out[:, width:].tolist()
    for row, toks in zip(rows, new_tokens, strict=True):
        if beam:
            for t in toks:
                row.feed(t)
                if row.finished:
                    break
            if not row.finished and stop_flags is not None and _is_set(stop_flags[row.prompt_index]):
                row.finish("cancelled")
        row.finish("length")  # no-op for rows that already ended
    return [r.result() for r in rows]


def _make_beam_cancel(stop_flags: Sequence[Any]):
    """Cancel for beam search: every beam of a prompt counts as finished once its flag is set."""
    import torch
    from transformers import StoppingCriteria

    class _BeamCancel(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
            per_prompt = max(1, input_ids.shape[0] // len(stop_flags))  # beam search checks 2 * num_beams candidates
            flags = [_is_set(stop_flags[min(i // per_prompt, len(stop_flags) - 1)]) for i in range(input_ids.shape[0])]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return _BeamCancel()


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Ids of a plain-text prompt (no special tokens added: the model continues exactly this text)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- command-line flags (shared by `owngpt generate`, `owngpt chat` and anything else that samples) -------------


def add_sampling_arguments(parser: Any, defaults: SamplingParams | None = None) -> None:
    """Add one flag per SamplingParams field (argparse); `params_from_args` turns them back into SamplingParams."""
    d = defaults or SamplingParams()
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens to generate at most (default {d.max_new_tokens}, or half the model's context if smaller)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        metavar="T",
        help=f"randomness; 0 = greedy, always the most likely token (default {d.temperature})",
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=d.top_k,
        metavar="K",
        help=f"sample only among the K most likely tokens; 0 = no limit (default {d.top_k})",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=d.top_p,
        metavar="P",
        help=f"nucleus sampling: only the most likely tokens whose probabilities add up to P, in (0, 1] "
        f"(default {d.top_p}: no limit)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=d.repetition_penalty,
        metavar="R",
        help="> 1 makes tokens already in the text less likely (CTRL's rule, also right for negative "
        f"logits); 1 = off (default {d.repetition_penalty})",
    )
    g.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=d.no_repeat_ngram_size,
        metavar="N",
        help=f"never repeat any N tokens in a row; 0 = off (default {d.no_repeat_ngram_size})",
    )
    g.add_argument(
        "--num-beams",
        type=int,
        default=d.num_beams,
        metavar="B",
        help="beam search with B beams (with --temperature 0: the most likely sequence it finds); "
        "cannot stream (default 1: off)",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop before this text (repeatable); backslash escapes such as \\n are understood",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        metavar="S",
        help="random seed: the same seed, prompt and settings give the same text (default: random)",
    )


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\\\` in a command-line value -> newline, tab, backslash (other characters untouched)."""
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def fit_max_new_tokens(default: int, context: int | None) -> int:
    """The default reply length for a model: `default`, or half its context if smaller (room for the prompt)."""
    return default if context is None else max(1, min(default, context // 2))


def params_from_args(
    args: Any, context: int | None = None, default_max_new_tokens: int = 200, **overrides: Any
) -> SamplingParams:
    """SamplingParams from the flags of `add_sampling_arguments`, validated (against `context` when given).

    Without --max-new-tokens the length is `default_max_new_tokens`, or half the context if that is smaller.
    """
    mnt = args.max_new_tokens
    p = SamplingParams(
        max_new_tokens=fit_max_new_tokens(default_max_new_tokens, context) if mnt is None else mnt,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_beams=args.num_beams,
        stop=[unescape(s) for s in (args.stop or [])],
        seed=args.seed,
        **overrides,
    )
    return p.validate(context)


def use_one_thread_for_small_models(model: Any, max_params: int = 20_000_000) -> bool:
    """For the CLI: decode a small model on one intra-op thread unless OMP_NUM_THREADS says otherwise.

    Decoding a small model is bound by per-operation overhead, not arithmetic, so a second thread only adds
    synchronisation; on a busy 2-core machine it was 22x slower here (tiny preset, 100 tokens: 55 tokens/s on one
    thread vs 2.5 on two). From about GPT-2 small up, matrix products are big enough for threads to pay off.
    """
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS") or sum(p.numel() for p in model.parameters()) >= max_params:
        return False
    torch.set_num_threads(1)
    return True
