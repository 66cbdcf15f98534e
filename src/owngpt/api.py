"""The Python API: `owngpt.load(CKPT)` -> a `Model` that generates and chats, with streaming iterators.

    import owngpt
    m = owngpt.load("runs/shakespeare/checkpoints/last")
    text = m.generate("ROMEO:", max_new_tokens=50, temperature=0)        # str
    for piece in m.generate("ROMEO:", stream=True): print(piece, end="")  # text as it is generated
    m.chat([{"role": "user", "content": "Hello"}])                        # the assistant's reply

Keyword arguments are SamplingParams fields (max_new_tokens, temperature, top_k, top_p, repetition_penalty,
no_repeat_ngram_size, num_beams, stop, seed, num_return_sequences); bad values raise owngpt.ConfigError.
A thin layer over owngpt.generation and owngpt.chat, which the CLI uses too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from owngpt.chat import ChatSettings, is_chat_model
from owngpt.chat import reply as chat_reply
from owngpt.chat_format import Message
from owngpt.errors import ConfigError
from owngpt.generation import (
    LoadedModel,
    SamplingParams,
    context_length,
    encode_prompt,
    fit_max_new_tokens,
    generate_batch,
    load_for_generation,
)


class Model:
    """A loaded checkpoint. `tokenizer` and `model` are the transformers objects, for anything else."""

    def __init__(
        self,
        loaded: LoadedModel,
        defaults: SamplingParams | None = None,
        chat_template: bool | None = None,
        explicit_length: bool = False,
    ) -> None:
        self._lm = loaded
        self.defaults = (defaults or SamplingParams()).validate()
        self._explicit_length = explicit_length  # max_new_tokens given to load(): never shortened
        self.uses_chat_template = is_chat_model(loaded) if chat_template is None else chat_template

    @property
    def tokenizer(self) -> Any:
        return self._lm.tokenizer

    @property
    def model(self) -> Any:
        return self._lm.model

    @property
    def path(self) -> Path:
        return self._lm.path

    @property
    def meta(self) -> dict[str, Any]:
        """owngpt.json of the checkpoint (task, source, step...); {} for a plain Hugging Face dir."""
        return self._lm.meta

    def _params(self, sampling: dict[str, Any], fit: bool = True) -> SamplingParams:
        params = self.defaults.replace(**sampling)
        if fit and "max_new_tokens" not in sampling and not self._explicit_length:
            # a chat reply's default length leaves room for the conversation (plain text slides: any length)
            params = params.replace(
                max_new_tokens=fit_max_new_tokens(params.max_new_tokens, context_length(self.model))
            )
        return params

    def generate(
        self, prompt: str | Sequence[str] = "", stream: bool = False, **sampling: Any
    ) -> str | list[str] | Iterator[str]:
        """Continue `prompt` ("" = an unconditional sample). Returns the new text (without the prompt).

        A list of prompts (or num_return_sequences > 1) returns a list of texts, generated as one batch.
        `stream=True` (one prompt, one sample) returns an iterator of text pieces as they are generated.
        """
        params = self._params(sampling, fit=False)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [encode_prompt(self.tokenizer, p) if p else [] for p in prompts]
        if stream:
            if len(prompts) != 1 or params.num_return_sequences != 1:
                raise ConfigError(
                    "stream=True streams one prompt and one sample; pass a single prompt string and "
                    "num_return_sequences=1"
                )
            return _stream(
                lambda on_text, flag: generate_batch(
                    self.model,
                    self.tokenizer,
                    ids,
                    params,
                    streamer_callback=lambda _row, t: on_text(t),
                    stop_flags=[flag],
                )
            )
        results = generate_batch(self.model, self.tokenizer, ids, params)
        texts = [r.text for r in results]
        return texts[0] if isinstance(prompt, str) and params.num_return_sequences == 1 else texts

    def chat(
        self,
        messages: Sequence[Message],
        stream: bool = False,
        mmi: Model | None = None,
        candidates: int = 5,
        **sampling: Any,
    ) -> str | Iterator[str]:
        """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content": ...}], ending with
        the user's turn). A chat-tuned checkpoint uses its chat template; a plain model continues `User:`/`Bot:`
        lines (owngpt.conversation: the same prompt as the REPL and the server). A long conversation keeps the
        system message and the latest turns; a reply reaching the trained context ends there. `mmi=owngpt.load(BACKWARD_CKPT)` samples `candidates` replies and returns the one it ranks best."""
        params = self._params(sampling)
        settings = ChatSettings(
            use_template=self.uses_chat_template, mmi=mmi._lm if mmi else None, candidates=candidates
        )
        if stream:
            return _stream(
                lambda on_text, flag: chat_reply(self._lm, messages, params, settings, on_text=on_text, stop_flag=flag)
            )
        return chat_reply(self._lm, messages, params, settings).text

    def __repr__(self) -> str:
        return f"owngpt.Model({str(self.path)!r}, task={self._lm.task!r})"


_DONE = object()


def _stream(run: Callable[[Callable[[str], None], threading.Event], Any]) -> Iterator[str]:
    """Run generation in a thread, yielding its text pieces. Leaving the loop early (break, an exception, garbage
    collection of the iterator) sets the cancel flag, so the thread stops at its next token instead of running on."""
    q: queue.Queue[Any] = queue.Queue()
    cancel = threading.Event()

    def worker() -> None:
        try:
            run(q.put, cancel)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(_Failure(e))
        finally:
            q.put(_DONE)

    def pieces() -> Iterator[str]:
        t = threading.Thread(target=worker, name="owngpt-generate", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            cancel.set()
            t.join()

    return pieces()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def load(checkpoint: str, **sampling: Any) -> Model:
    """Load a checkpoint dir (or a cached Hub id) for generation and chat. Keyword arguments set default sampling
    settings for every call, e.g. `owngpt.load(CKPT, temperature=0)`; `chat_template=True/False` forces the chat
    format (default: the chat template for chat-tuned checkpoints)."""
    chat_template = sampling.pop("chat_template", None)
    defaults = SamplingParams().replace(**sampling) if sampling else SamplingParams()
    return Model(
        load_for_generation(checkpoint),
        defaults,
        chat_template=chat_template,
        explicit_length="max_new_tokens" in sampling,
    )
