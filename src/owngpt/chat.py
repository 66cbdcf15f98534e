"""Multi-turn chat: prompt building for chat-tuned and plain models, MMI reranking, and the terminal REPL.

Two ways to talk to a model:
- a chat-tuned checkpoint (owngpt.json task `chat`, or a Hugging Face dir without owngpt.json whose tokenizer has
  a chat template) gets the conversation rendered with its chat template (owngpt.chat_format.prompt_ids) and its reply
  ends at the end-of-turn token;
- a plain language model continues a transcript written as text lines, `User: ...` / `Bot: ...`, and its reply
  ends at the next `\\nUser:` or a blank line.
Either way the oldest turns are dropped first so that prompt + reply fit the context.

`reply()` is the engine (the Python API and the REPL share it); `run_repl()` is `owngpt chat`: plain `input()` with
readline editing/history when available, so it works on a terminal, a pipe or a pseudo-terminal alike.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from owngpt.chat_format import Message, prompt_ids, stop_token_ids, validate_messages
from owngpt.errors import ConfigError, OwnGPTError
from owngpt.generation import LoadedModel, SamplingParams, context_length, default_eos_ids, generate_batch

PLAIN_USER = "User:"
PLAIN_BOT = "Bot:"
# A plain model's reply ends where it starts writing the user's next line, or at a blank line (a paragraph break in
# most training text, e.g. between speeches in Tiny Shakespeare).
PLAIN_STOPS = ["\n" + PLAIN_USER, "\n\n"]


def is_chat_model(lm: LoadedModel) -> bool:
    """Whether to use the chat template: task `chat`; or a non-owngpt dir whose tokenizer brings a template.

    Every tokenizer owngpt builds carries owngpt's template, so for owngpt checkpoints only the task counts.
    """
    if lm.meta:
        return lm.meta.get("task") == "chat"
    return bool(getattr(lm.tokenizer, "chat_template", None))


def plain_transcript(messages: Sequence[Message]) -> str:
    """The plain-text rendering a plain language model continues (ends with `Bot:`)."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(m["content"])
        else:
            lines.append(f"{PLAIN_USER if m['role'] == 'user' else PLAIN_BOT} {m['content']}")
    return "\n".join(lines + [PLAIN_BOT])


def plain_prompt_ids(tokenizer: Any, messages: Sequence[Message], max_tokens: int) -> list[int]:
    """Ids of the plain transcript, dropping the oldest turns (never the system line or the latest turn) to fit."""
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        ids = tokenizer(plain_transcript(system + turns), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens or len(turns) <= 1:
            return list(ids)[-max_tokens:]
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] == "assistant":  # the kept history opens with the user
            turns = turns[1:]


@dataclass
class Reply:
    text: str
    finish_reason: str
    candidates: list[str] = field(default_factory=list)  # with MMI: every sampled candidate
    scores: list[float] = field(default_factory=list)  # with MMI: backward loss per candidate (lower = chosen)


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
    ctx = context_length(lm.model)
    params.validate(ctx)
    room = ctx - params.max_new_tokens
    if settings.use_template:
        ids = prompt_ids(tok, messages, max_tokens=room)
        eos = stop_token_ids(tok)
        stop = list(params.stop)
    else:
        ids = plain_prompt_ids(tok, messages, room)
        eos = default_eos_ids(lm.model, tok)
        stop = list(params.stop) + [s for s in PLAIN_STOPS if s not in params.stop]
    flags = [stop_flag] if stop_flag is not None else None

    if settings.mmi is None:
        strip = _LeadingSpaceStripper(on_text) if on_text is not None else None
        res = generate_batch(
            lm.model,
            tok,
            [ids],
            params.replace(stop=stop, num_return_sequences=1),
            streamer_callback=(lambda _row, piece: strip(piece)) if strip else None,
            stop_flags=flags,
            eos_token_ids=eos,
        )[0]
        return Reply(text=res.text.strip(), finish_reason=res.finish_reason)

    from owngpt.mmi import history_latest_first, rerank

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
    )
    candidates = [r.text.strip() for r in results]
    ranked = rerank(settings.mmi.model, settings.mmi.tokenizer, candidates, history_latest_first(messages))
    chosen = results[ranked.best]
    if on_text is not None and ranked.text:
        on_text(ranked.text)
    return Reply(text=ranked.text, finish_reason=chosen.finish_reason, candidates=candidates, scores=ranked.scores)


class _LeadingSpaceStripper:
    """Drops whitespace at the start of a streamed reply (a plain model writes `Bot: hello`; the space is markup)."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out, self.started = out, False

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        if piece:
            self.out(piece)


# --- the REPL ------------------------------------------------------------------------------------------------

HELP = """commands:
  /help               this help
  /reset              forget the conversation (the system prompt stays)
  /save FILE          write the transcript as JSON {"messages": [...]}
  /params             show the sampling settings
  /set NAME VALUE     change one, e.g. /set temperature 0.7, /set max_new_tokens 64, /set seed none
  /system TEXT        set the system prompt (and reset the conversation)
  /exit               quit (also /quit, Ctrl-D); Ctrl-C stops the current answer"""


def write_transcript(path: str | os.PathLike, messages: Sequence[Message], extra: dict[str, Any] | None = None) -> None:
    """Write {"messages": [...]} atomically (a temp file in the same dir, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"messages": list(messages), **(extra or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def save(self, path: str | os.PathLike) -> None:
        write_transcript(path, self.messages, {"checkpoint": str(self.lm.path), "params": self.params.to_dict()})

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
                self.save(arg)
                print(f"(saved {len(self.messages)} messages to {arg})", file=self.out)
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
        if self.debug and r.candidates:
            for i, (c, s) in enumerate(zip(r.candidates, r.scores, strict=True)):
                mark = "*" if c == r.text else " "
                print(f"[mmi] {mark} {i} loss={s:.4f} {c!r}", file=self.err)
        self.messages.append({"role": "assistant", "content": r.text})
        if self.transcript:
            self.save(self.transcript)
        return r

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
                self.save(self.transcript)
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
