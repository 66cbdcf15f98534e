"""Multi-turn chat: replies for the REPL and the Python API, MMI reranking, and the terminal REPL.

The conversation becomes a prompt in owngpt.conversation (the one function the server uses too): a chat-tuned model
gets its chat template, a plain language model continues `User:` / `Bot:` lines (it continues text, and the REPL
says so). The prompt keeps the system message and the latest turns that fit; the reply is decoded by the one engine
(owngpt.engine) and ends with finish_reason "length" if it would run past the model's trained context.

`reply()` is what the Python API and the REPL share; `run_repl()` is `owngpt chat`: plain `input()` with
readline editing/history when available, so it works on a terminal, a pipe or a pseudo-terminal alike.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from owngpt import atomic, conversation
from owngpt.chat_format import Message, validate_messages
from owngpt.conversation import PLAIN_BOT, PLAIN_STOPS, PLAIN_USER, plain_transcript  # noqa: F401  (re-exported)
from owngpt.errors import ConfigError, OwnGPTError
from owngpt.generation import LoadedModel, SamplingParams, context_length, default_eos_ids, generate_batch
from owngpt.mmi import history_latest_first, rerank
from owngpt.outdir import check_out_file


def is_chat_model(lm: LoadedModel) -> bool:
    """Whether to use the chat template (owngpt.conversation.is_chat_model: the rule every front end uses)."""
    return conversation.is_chat_model(lm.meta, lm.tokenizer)


def chat_prompt(lm: LoadedModel, messages: Sequence[Message], use_template: bool, max_new_tokens: int):
    """The prompt for the next reply (owngpt.conversation.conversation_prompt with this model's budget)."""
    ctx = context_length(lm.model)
    return conversation.conversation_prompt(
        lm.tokenizer,
        messages,
        chat=use_template,
        max_tokens=conversation.reply_budget(ctx, max_new_tokens),
        eos_ids=default_eos_ids(lm.model, lm.tokenizer),
    )


@dataclass
class Reply:
    text: str
    finish_reason: str
    candidates: list[str] = field(default_factory=list)  # with MMI: every sampled candidate
    scores: list[float] = field(default_factory=list)  # with MMI: backward loss per candidate (lower = chosen)
    completion_tokens: int = 0  # tokens generated for the reply (the chosen one with MMI)


@dataclass
class ChatSettings:
    """How a conversation is turned into a prompt and a reply."""

    use_template: bool
    mmi: LoadedModel | None = None
    candidates: int = 5


def reply(
    lm: LoadedModel,
    messages: Sequence[Message],
    params: SamplingParams,
    settings: ChatSettings,
    on_text: Callable[[str], None] | None = None,
    stop_flag: Any = None,
) -> Reply:
    """The assistant's next reply to `messages` (which end with the user's turn).

    Without MMI the reply is streamed through `on_text`. With MMI, `settings.candidates` replies are sampled in one
    batched generate and the backward model picks one; `on_text` then receives the chosen reply in one piece.
    `stop_flag` (a threading.Event) cuts the reply short (finish_reason "cancelled").
    """
    messages = validate_messages(list(messages), "messages")
    tok = lm.tokenizer
    params.validate(context_length(lm.model))
    prompt = chat_prompt(lm, messages, settings.use_template, params.max_new_tokens)
    ids, eos = prompt.ids, prompt.stop_ids
    stop = list(params.stop) + [s for s in prompt.stop if s not in params.stop]
    flags = [stop_flag] if stop_flag is not None else None

    if settings.mmi is None:
        res = generate_batch(
            lm.model,
            tok,
            [ids],
            params.replace(stop=stop, num_return_sequences=1, num_beams=1),
            streamer_callback=(lambda _row, piece: on_text(piece)) if on_text else None,
            stop_flags=flags,
            eos_token_ids=eos,
            slide=False,
            lstrip=True,
        )[0]
        return Reply(text=res.text, finish_reason=res.finish_reason, completion_tokens=res.completion_tokens)

    if params.greedy:
        raise ConfigError("--mmi needs sampled candidates: set --temperature above 0 (e.g. 0.8)")
    if settings.candidates < 1:
        raise ConfigError(f"--candidates {settings.candidates}: must be >= 1")
    results = generate_batch(
        lm.model,
        tok,
        [ids],
        params.replace(stop=stop, num_return_sequences=settings.candidates, num_beams=1),
        stop_flags=flags,
        eos_token_ids=eos,
        slide=False,
        lstrip=True,
    )
    candidates = [r.text for r in results]
    ranked = rerank(settings.mmi.model, settings.mmi.tokenizer, candidates, history_latest_first(messages))
    chosen = results[ranked.best]
    if on_text is not None and ranked.text:
        on_text(ranked.text)
    return Reply(
        text=ranked.text,
        finish_reason=chosen.finish_reason,
        candidates=candidates,
        scores=ranked.scores,
        completion_tokens=chosen.completion_tokens,
    )


# --- the REPL ------------------------------------------------------------------------------------------------

HELP = """commands:
  /help               this help
  /reset              forget the conversation (the system prompt stays)
  /save FILE          write the transcript as JSON {"messages": [...]}
  /params             show the sampling settings
  /set NAME VALUE     change one, e.g. /set temperature 0.7, /set max_new_tokens 64, /set seed none
  /system TEXT        set the system prompt (and reset the conversation)
  /exit               quit (also /quit, Ctrl-D); Ctrl-C stops the current answer"""


def is_transcript(path: str | os.PathLike) -> bool:
    """Whether `path` is a transcript owngpt chat wrote: one JSON object with "messages" and "checkpoint"."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.loads(f.read(64 << 20))  # a transcript is small; a huge file is not one
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("messages"), list) and "checkpoint" in obj


def check_transcript_path(path: str | os.PathLike, models: Sequence[str | os.PathLike], flag: str = "") -> Path:
    """Refuse a transcript path that would destroy something: a folder, a path inside a checkpoint being used
    (`models`), or an existing file that is not an earlier owngpt transcript (which is replaced, as documented).
    Returns the path (~ expanded). The rules are owngpt.outdir's, for every output that is one file."""

    inputs = [("checkpoint", m) for m in models]
    return check_out_file(path, inputs, ours=is_transcript, what="a chat transcript", example="chat.json", flag=flag)


def write_transcript(path: str | os.PathLike, messages: Sequence[Message], extra: dict[str, Any] | None = None) -> None:
    """Write {"messages": [...]} atomically (a temp file in the same dir, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # mode 0o600: a conversation is private (transcripts have always been readable by their owner only)
    atomic.write_json(p, {"messages": list(messages), **(extra or {})}, mode=0o600)


def _parse_value(name: str, raw: str, current: Any) -> Any:
    """A /set value, typed like the setting it changes."""
    raw = raw.strip()
    if name == "stop":
        try:
            v = json.loads(raw)
        except ValueError:
            v = [raw] if raw else []
        return [v] if isinstance(v, str) else v
    if name == "seed" and raw.lower() in ("none", "off", ""):
        return None
    try:
        if isinstance(current, bool):
            raise ValueError
        if isinstance(current, int) or name in ("seed", "top_k", "num_beams", "max_new_tokens"):
            return int(raw)
        return float(raw)
    except ValueError:
        raise ConfigError(f"/set {name} {raw!r}: expected a number") from None


class ChatREPL:
    """State of one terminal conversation: messages, settings, transcript."""

    def __init__(
        self,
        lm: LoadedModel,
        params: SamplingParams,
        settings: ChatSettings,
        system: str | None = None,
        transcript: str | None = None,
        debug: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.lm, self.params, self.settings = lm, params, settings
        self.system = system
        self.transcript = transcript
        self.debug = debug
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.messages: list[Message] = []
        self.reset()
        if transcript:  # before the first answer, not after it
            check_transcript_path(transcript, self._models(), flag="--transcript")

    def _models(self) -> list[str]:
        """The checkpoints in use, which a transcript must not be written into."""
        return [str(m.path) for m in (self.lm, self.settings.mmi) if m is not None and m.path]

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def save(self, path: str | os.PathLike) -> None:
        p = check_transcript_path(path, self._models())
        write_transcript(p, self.messages, {"checkpoint": str(self.lm.path), "params": self.params.to_dict()})

    def _autosave(self) -> None:
        """Rewrite --transcript; a failure (disk full, folder gone) is reported and the conversation goes on."""
        try:
            self.save(self.transcript)
        except (OwnGPTError, OSError) as e:
            print(f"error: could not save the transcript: {e}", file=self.err)

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("exit", "quit", "q"):
            return False
        if name in ("help", "h", "?"):
            print(HELP, file=self.out)
        elif name == "reset":
            self.reset()
            print("(conversation reset)", file=self.out)
        elif name == "save":
            if not arg:
                print("usage: /save FILE", file=self.out)
            else:
                try:
                    self.save(arg)
                    print(f"(saved {len(self.messages)} messages to {arg})", file=self.out)
                except (OwnGPTError, OSError) as e:  # a bad name must not end the session and lose the chat
                    print(f"error: {e}", file=self.out)
        elif name == "params":
            for k, v in self.params.to_dict().items():
                print(f"  {k} = {v!r}", file=self.out)
            mode = "chat template" if self.settings.use_template else "plain text (User:/Bot: lines)"
            print(f"  format = {mode}", file=self.out)
            if self.settings.mmi is not None:
                print(f"  mmi = {self.settings.mmi.path} ({self.settings.candidates} candidates)", file=self.out)
        elif name == "set":
            key, _, raw = arg.partition(" ")
            key = key.replace("-", "_")
            if not key or key not in self.params.to_dict():
                print(f"usage: /set NAME VALUE with NAME one of {', '.join(self.params.to_dict())}", file=self.out)
            else:
                try:
                    self.params = self.params.replace(**{key: _parse_value(key, raw, getattr(self.params, key))})
                    self.params.validate(context_length(self.lm.model))
                    print(f"  {key} = {getattr(self.params, key)!r}", file=self.out)
                except OwnGPTError as e:
                    print(f"error: {e}", file=self.out)
        elif name == "system":
            self.system = arg or None
            self.reset()
            print("(system prompt set, conversation reset)" if arg else "(system prompt cleared)", file=self.out)
        else:
            print(f"unknown command /{name}; /help lists them", file=self.out)
        return True

    def turn(self, text: str) -> Reply:
        """One user turn: stream the reply; Ctrl-C (SIGINT) stops the answer, not the session."""
        self.messages.append({"role": "user", "content": text})
        stop = threading.Event()
        prev = _install_sigint(stop)
        streamed = []

        def show(piece: str) -> None:
            streamed.append(piece)
            self.out.write(piece)
            self.out.flush()

        try:
            r = reply(self.lm, self.messages, self.params, self.settings, on_text=show, stop_flag=stop)
        except BaseException:
            self.messages.pop()  # the turn failed: keep the history as it was
            raise
        finally:
            _restore_sigint(prev)
        if streamed:
            self.out.write("\n")
        if r.finish_reason == "cancelled":
            print("(stopped)", file=self.out)
        elif r.finish_reason == "length" and self._reached_context(r):
            print(f"(the reply reached the model's context of {context_length(self.lm.model)} tokens)", file=self.out)
        if self.debug and r.candidates:
            for i, (c, s) in enumerate(zip(r.candidates, r.scores, strict=True)):
                mark = "*" if c == r.text else " "
                print(f"[mmi] {mark} {i} loss={s:.4f} {c!r}", file=self.err)
        self.messages.append({"role": "assistant", "content": r.text})
        if self.transcript:
            self._autosave()
        return r

    def _reached_context(self, r: Reply) -> bool:
        # the tokens generated, not the reply's text re-tokenized: the text is stripped and may tokenize shorter,
        # which claimed "reached the context" for a reply that had simply used its --max-new-tokens
        return r.completion_tokens < self.params.max_new_tokens

    def run(self, stdin: TextIO | None = None) -> int:
        interactive = (stdin or sys.stdin).isatty()
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and in-session history for input())
            except ImportError:  # pragma: no cover - Windows
                pass
        you = "you> " if interactive else ""
        try:
            while True:
                try:
                    line = input(you) if stdin is None else _readline(stdin)
                except EOFError:
                    if interactive:
                        print(file=self.out)
                    break
                except KeyboardInterrupt:
                    print("\n(Ctrl-C: type /exit or press Ctrl-D to quit)", file=self.out)
                    continue
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        break
                    continue
                if interactive:
                    self.out.write("bot> ")
                    self.out.flush()
                self.turn(line)
        finally:
            if self.transcript:
                self._autosave()
        return 0


def _readline(stdin: TextIO) -> str:
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _install_sigint(stop: threading.Event) -> Any:
    """Ctrl-C during an answer sets `stop` (checked by generate's stopping criteria every token) instead of raising."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda *_: stop.set())


def _restore_sigint(prev: Any) -> None:
    if prev is not None:
        signal.signal(signal.SIGINT, prev)
