"""Text generation: sampling settings, the trained context of a checkpoint, and `generate_batch`.

- `SamplingParams`: the user's settings, validated with errors that name the flag and the accepted range;
- `trained_context(meta, config)`: how many tokens the model was trained to read (owngpt.checkpoint_files; see
  docs/architecture.md);
- `load_for_generation(spec)`: a checkpoint dir or Hub id -> model (eval mode), tokenizer and owngpt.json metadata,
  loaded quietly (no progress bars), with the trained context attached;
- `generate_batch(...)`: a batch of prompts through the one decode engine (`owngpt.engine`: KV cache, sliding window
  past the context, per-row sampling, stop strings, streaming, cancel), reporting each row's finish reason and token
  counts. Beam search alone goes through transformers' `generate`, inside the trained context.
  The CLI (`owngpt generate`, `owngpt chat`), the Python API (`owngpt.api`) and the server all use the same engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from owngpt.checkpoint import open_checkpoint
from owngpt.checkpoint_files import (  # noqa: F401  (re-exported: their home is owngpt.checkpoint_files)
    context_length,
    position_table,
    trained_context,
)
from owngpt.decode_kernels import pack_for_decode, parameter_count
from owngpt.engine import Decoder, IncrementalDecoder, Row, RowSettings, run_to_end
from owngpt.errors import CheckpointError, ConfigError

__all__ = ["IncrementalDecoder"]  # re-exported: its home is owngpt.engine


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
        if context_length is not None and self.num_beams > 1 and self.max_new_tokens >= context_length:
            raise bad(
                "max_new_tokens",
                self.max_new_tokens,
                f"smaller than the model's context of {context_length} tokens with beam search (which does not "
                "slide its window); without --num-beams any length works",
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
    checkpoint: Any = None  # the owngpt.checkpoint.Checkpoint it was loaded from

    @property
    def task(self) -> str:
        """The checkpoint's task (Checkpoint.task, the one rule); for one made by hand, owngpt.json's or lm."""
        return self.checkpoint.task if self.checkpoint is not None else self.meta.get("task") or "lm"

    @property
    def context_length(self) -> int:
        return context_length(self.model)


def quiet_loading() -> None:
    """No "Loading weights" progress bars in generate/chat output (the weights load in well under a second)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_for_generation(spec: str, task: str | None = None, device: Any = None) -> LoadedModel:
    """Resolve a checkpoint (local dir or Hub id), load tokenizer and model (safetensors only), in eval mode, on
    `device` (a torch device; None = cpu; see owngpt.device.inference_device).

    A classification checkpoint cannot generate: refused with a hint to use `owngpt predict`.
    """

    ckpt = open_checkpoint(spec)
    if ckpt.task == "classify":
        raise CheckpointError(
            f"{ckpt.path} is a classification checkpoint (task 'classify'): it labels text "
            f"and cannot generate; use `owngpt predict {spec} --text ...`"
        )
    tokenizer = ckpt.tokenizer()  # with a pad id: left padding of a batch needs one (masked out, so any id works)
    quiet_loading()
    # the model carries its trained context (owngpt_context), read by context_length(): every path uses it
    model = ckpt.model(task or ckpt.task).eval().to(device or "cpu")
    pack_for_decode(model)  # CPU fp32 weights laid out once for the decode kernels (owngpt.decode_kernels)
    return LoadedModel(model=model, tokenizer=tokenizer, path=Path(ckpt.path), meta=ckpt.meta, checkpoint=ckpt)


def default_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-text ids for plain generation: the model's generation config, else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if isinstance(eos, int) else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _is_set(flag: Any) -> bool:
    return flag.is_set() if hasattr(flag, "is_set") else bool(flag)


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
        eos_token_id=list(eos_ids),
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


def row_settings(
    params: SamplingParams, eos: Sequence[int], seed: int | None, slide: bool = True, lstrip: bool = False
) -> RowSettings:
    """The engine's settings for one row sampled with `params`."""
    return RowSettings(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        stop=tuple(params.stop),
        stop_ids=frozenset(eos),
        seed=seed,
        slide=slide,
        lstrip=lstrip,
    )


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    streamer_callback: Callable[[int, str], None] | None = None,
    stop_flags: Sequence[Any] | None = None,
    eos_token_ids: Sequence[int] | None = None,
    *,
    slide: bool = True,
    lstrip: bool = False,
    context: int | None = None,
    shift: int | None = None,
) -> list[GenerationResult]:
    """Generate for a batch of prompts, all rows decoding together in the engine (owngpt.engine).

    - `prompt_ids`: one list of ids per prompt; an empty prompt starts from the end-of-text token (unconditional
      sampling, as GPT-2's generate_unconditional_samples). A prompt longer than the context is read through its
      last `context` tokens.
    - Any `max_new_tokens`: past the context the window slides (`slide=True`, nanoGPT's semantics); with
      `slide=False` (chat replies) a row that reaches the context ends with finish_reason "length".
    - `streamer_callback(row, text_piece)`: called as text becomes available (rows ordered prompt by prompt, then
      sample by sample). Pieces never split a character and never include (part of) a stop string. Beam search
      cannot stream: each row's text then arrives in one piece at the end.
    - `stop_flags[prompt_index]`: a bool (in a list the caller mutates) or an object with `is_set()`
      (threading.Event); once set, that prompt's rows stop at the next token with finish_reason "cancelled".
    - `eos_token_ids`: ids that end a row (default: the model's / tokenizer's end-of-text). Pass `[]` to never stop
      before max_new_tokens (benchmarks).
    - `seed`: sample j of every prompt uses seed + j, so a prompt's samples do not depend on what shares the batch.
    """
    ctx = context or context_length(model)
    params.validate(ctx)
    if not prompt_ids:
        return []
    if stop_flags is not None and len(stop_flags) != len(prompt_ids):
        raise ValueError(f"stop_flags has {len(stop_flags)} entries for {len(prompt_ids)} prompts")
    eos = list(default_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
    if params.num_beams > 1:
        return _beam_search(model, tokenizer, prompt_ids, params, streamer_callback, stop_flags, eos, ctx)

    nrs = params.num_return_sequences
    rows, results = [], []
    for i in range(len(prompt_ids) * nrs):
        p, j = i // nrs, i % nrs
        seed = None if params.seed is None else (params.seed + j) % 2**63
        on_event = None
        if streamer_callback is not None:
            on_event = lambda _row, piece, _fin, i=i: piece and streamer_callback(i, piece)  # noqa: E731
        flag = (lambda p=p: _is_set(stop_flags[p])) if stop_flags is not None else None
        rows.append(Row(prompt_ids[p], row_settings(params, eos, seed, slide, lstrip), on_event, cancel_flag=flag))
    run_to_end(Decoder(model, tokenizer, ctx, shift=shift), rows)
    for i, r in enumerate(rows):
        results.append(
            GenerationResult(
                index=i,
                prompt_index=i // nrs,
                token_ids=r.token_ids,
                text=r.text,
                finish_reason=r.finish_reason or "length",
                prompt_tokens=min(len(prompt_ids[i // nrs]) or 1, ctx),
                completion_tokens=len(r.token_ids),
            )
        )
    return results


def _beam_search(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    streamer_callback: Callable[[int, str], None] | None,
    stop_flags: Sequence[Any] | None,
    eos: list[int],
    ctx: int,
) -> list[GenerationResult]:
    """Beam search with transformers' `generate`, inside the trained context (its hypotheses are reordered every
    step, which a sliding window with per-row caches cannot follow)."""
    import torch
    from transformers import StoppingCriteriaList

    start_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (eos or [0])[0]
    max_prompt = ctx - params.max_new_tokens
    prompts = [list(p)[-max_prompt:] if len(p) else [start_id] for p in prompt_ids]
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
    kwargs: dict[str, Any] = {}
    # Beam hypotheses are reordered every step, so rows cannot be followed token by token: transformers' own
    # stop-string criterion stops the beams and each row's text is cut afterwards.
    if params.stop:
        cfg.stop_strings = list(params.stop)
        kwargs["tokenizer"] = tokenizer
    if stop_flags is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_make_beam_cancel(stop_flags)])
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg, **kwargs)

    results = []
    for i, toks in enumerate(out[:, width:].tolist()):
        p = i // nrs
        on_event = None
        if streamer_callback is not None:
            on_event = lambda _row, piece, _fin, i=i: piece and streamer_callback(i, piece)  # noqa: E731
        row = Row(prompts[p], row_settings(params, eos, None), on_event)
        row.begin(tokenizer, start_id)
        cancelled = stop_flags is not None and _is_set(stop_flags[p])
        for t in toks:
            if cancelled and t == pad:  # generate pads the beams that _BeamCancel ended: not tokens of the text
                break
            row.feed(t)
            if row.finished:
                break
        if not row.finished and stop_flags is not None and _is_set(stop_flags[p]):
            row.finish("cancelled")
        row.finish("length")  # no-op for rows that already ended
        results.append(
            GenerationResult(i, p, row.token_ids, row.text, row.finish_reason or "length", len(prompts[p]),
                             len(row.token_ids))
        )  # fmt: skip
    return results


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


def fit_max_new_tokens(default: int, context: int | None) -> int:
    """The default reply length for a model: `default`, or half its context if smaller (room for the prompt)."""
    return default if context is None else max(1, min(default, context // 2))


def use_one_thread_for_small_models(model: Any, max_params: int = 20_000_000) -> bool:
    """For the CLI: decode a small model on one intra-op thread unless OMP_NUM_THREADS says otherwise.

    Decoding a small model is bound by per-operation overhead, not arithmetic, so a second thread only adds
    synchronisation; on a busy 2-core machine it was 22x slower here (tiny preset, 100 tokens: 55 tokens/s on one
    thread vs 2.5 on two). From about GPT-2 small up, matrix products are big enough for threads to pay off.
    """
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS") or parameter_count(model) >= max_params:
        return False
    torch.set_num_threads(1)
    return True
