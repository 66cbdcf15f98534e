"""Readers: raw files -> records (`{"text"}`, `{"messages"}` or `{"text", "label"}`), each with its file:line.

A registry maps a format name to a reader (`READERS["jsonl"]`, ...). Every reader streams its file line by line
(one record in memory at a time, except a `.json` array, which is parsed whole) and yields `Record`s, or `Invalid`s
for records it cannot use, so that the pipeline decides between failing (default) and counting them
(`--skip-invalid`). Byte-level problems (a binary file, undecodable bytes) are handled here, where byte offsets are
known; everything about the *content* of the text (normalization, ANSI codes, duplicates) is `owngpt.data.clean`'s.

Formats: txt (`.txt`, `.md`; documents split by `--doc-sep`), jsonl (`.jsonl`), json (`.json`: an array of objects,
or JSON lines), csv (`.csv`), tsv (`.tsv`), chitchat (GPT2-chitchat dialogue text: one utterance a line, dialogues
separated by blank lines; roles alternate user/assistant).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt.chat_format import validate_messages
from owngpt.data.report import Report
from owngpt.errors import ConfigError, DataError

EXTENSIONS = {
    ".txt": "txt",
    ".md": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
}
FORMATS = ("txt", "jsonl", "json", "csv", "tsv", "chitchat")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "comment", "document", "body", "utterance")
LABEL_COLUMNS = ("label", "labels", "class", "category", "sentiment", "target")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
SNIFF_BYTES = 1 << 16
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long review is not an error
# Byte-order marks of encodings that are not ASCII-compatible: a file that starts with one is decoded with it even
# under the default --encoding utf-8 (Windows Notepad saves "Unicode" as UTF-16 LE with a BOM).
UTF16_32_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def max_record_chars(cfg: Any) -> int:
    """The longest piece of text held in memory as one record: 1/16 of --max-memory-mb (in characters).

    A plain-text document longer than this is cut into consecutive documents of this size (`long_document_split` in
    the report); a JSON/CSV line longer than this is refused. Later stages hold a few copies of a record (decoded,
    cleaned, spilled as JSON and read back), so this keeps them within the memory budget.
    """
    return max(1 << 16, int(getattr(cfg, "max_memory_mb", 256)) * (1 << 20) // 16)


def bom_encoding(path: Path, encoding: str) -> str:
    """The encoding a UTF-16/32 byte-order mark at the start of `path` announces, when --encoding is UTF-8."""
    if codecs.lookup(encoding).name != "utf-8":
        return encoding
    with open(path, "rb") as f:
        head = f.read(4)
    return next((enc for bom, enc in UTF16_32_BOMS if head.startswith(bom)), encoding)


@dataclass
class Record:
    """One document, conversation or labelled example, and where it came from."""

    file: str
    line: int
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    label: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Invalid:
    """A record that cannot be used: where, and what is wrong and how to fix it."""

    file: str
    line: int
    reason: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class SourceFile:
    """An input file, its format, and (filled while it is read) its size and SHA-256."""

    path: Path
    format: str
    bytes: int = 0
    sha256: str = ""
    _hash: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.path)


Reader = Callable[[SourceFile, Any, Report, str], Iterator["Record | Invalid"]]
READERS: dict[str, Reader] = {}


def reader(name: str) -> Callable[[Reader], Reader]:
    """Register a reader for a format name (`--format NAME`)."""

    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return deco


# --- files and formats -------------------------------------------------------------------------------------------


def discover(sources: list[str], fmt: str | None = None, any_extension: bool = False) -> list[SourceFile]:
    """The input files: files as given, folders searched recursively (sorted, hidden files skipped).

    In folders only files with a known extension are taken, unless `--format` (or `any_extension`) says what they
    all are. A file named directly is read even with an unknown extension (as text, or as `--format`).
    """
    files: list[SourceFile] = []
    seen: set[Path] = set()
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and (fmt or any_extension or f.suffix.lower() in EXTENSIONS)
            )
            if not found:
                raise DataError(
                    f"{p}: no input files found in this folder (looked for "
                    f"{', '.join(sorted(EXTENSIONS))}); pass files, or --format to read other names"
                )
            paths = found
        elif p.is_file():
            paths = [p]
        else:
            raise DataError(f"{p}: no such file or folder{_bundled_hint(p)}")
        for f in paths:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            files.append(SourceFile(f, fmt or EXTENSIONS.get(f.suffix.lower(), "txt")))
    if not files:
        raise DataError("no input files: pass files or folders to `owngpt prepare`")
    return files


def _is_ascii_compatible(encoding: str) -> bool:
    name = codecs.lookup(encoding).name
    return not name.startswith(("utf-16", "utf-32"))


def check_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError as e:
        raise ConfigError(
            f"--encoding {encoding}: unknown encoding; use e.g. utf-8, gbk, gb18030, big5, latin-1"
        ) from e


def decoded_lines(
    src: SourceFile,
    encoding: str,
    report: Report,
    skip_invalid: bool,
    max_line_bytes: int | None = None,
    split_long: bool = False,
) -> Iterator[tuple[int, str]]:
    """(line number, text with its line ending) for each line of `src`, decoded; computes size and SHA-256.

    Lines are split on the raw bytes (b"\\n" never occurs inside a multi-byte character in UTF-8 or GBK), so the
    byte offset of an undecodable byte is exact. A UTF-8 BOM is stripped; a UTF-16/32 BOM switches to that encoding.
    A file with NUL bytes is binary: an error. Memory is bounded by `max_line_bytes`: a longer line is yielded in
    pieces of at most that many bytes (`split_long`, plain text) or refused as a DataError naming the line.
    """
    name = src.name
    h = hashlib.sha256()
    size = 0
    detected = bom_encoding(src.path, encoding)
    if detected != encoding:
        report.change(f"decoded_as_{detected.replace('-', '')}", where=name)
        encoding = detected
    if not _is_ascii_compatible(encoding):  # UTF-16/32: NULs are normal, line splitting must happen after decoding
        src.bytes, src.sha256 = _file_digest(src.path)
        limit = max_line_bytes // 4 if max_line_bytes else -1  # characters: at most 4 bytes each
        try:
            with open(src.path, encoding=encoding, newline="") as f:
                lineno, first = 1, True
                while True:
                    text = f.readline(limit)
                    if not text:
                        return
                    if first:
                        text, first = text.lstrip("\ufeff"), False
                    whole = text.endswith(("\n", "\r"))
                    if not whole and max_line_bytes and not split_long and len(text) >= limit:
                        raise _long_line(name, lineno, max_line_bytes)
                    yield lineno, text
                    lineno += whole
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: not valid {encoding} near line {lineno} ({e.reason}): check --encoding") from None
    with open(src.path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        nul = head.find(b"\x00")
        if nul >= 0:
            raise DataError(
                f"{name}: looks like a binary file (a NUL byte at offset {nul}); owngpt prepare reads "
                f"text: .txt, .md, .jsonl, .json, .csv, .tsv (in UTF-8, UTF-16 with a byte-order mark, or the "
                f"--encoding you give)"
            )
        if skip_invalid and head:
            bad = len(head) - len(head.decode(encoding, errors="ignore").encode(encoding, errors="ignore"))
            if bad > 0.3 * len(head):
                raise DataError(
                    f"{name}: {bad * 100 // len(head)}% of its first {len(head)} bytes are not valid "
                    f"{encoding}: a binary file, or text in another encoding (pass --encoding gbk, "
                    f"gb18030, big5, latin-1...)"
                )
        f.seek(0)
        offset, lineno, carry = 0, 1, b""
        while True:
            raw = f.readline(max_line_bytes or -1)
            if not raw and not carry:
                break
            h.update(raw)
            size += len(raw)
            raw, carry = carry + raw, b""
            whole = raw.endswith(b"\n") or len(raw) == 0 or f.peek(1) == b""
            if not whole:
                if not split_long:
                    raise _long_line(name, lineno, max_line_bytes or 0)
                raw, carry = _split_char(raw, encoding)  # never cut inside a multi-byte character
            start = offset
            offset += len(raw)
            if (
                lineno == 1
                and start == 0
                and raw.startswith(codecs.BOM_UTF8)
                and codecs.lookup(encoding).name == "utf-8"
            ):
                raw = raw[len(codecs.BOM_UTF8) :]
                start += len(codecs.BOM_UTF8)
                report.change("utf8_bom_stripped", where=name)
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as e:
                if not skip_invalid:
                    bad = raw[e.start : e.start + 4].hex(" ")
                    hint = "gbk or gb18030" if encoding == "utf-8" else "the file's encoding"
                    raise DataError(
                        f"{name}:{lineno}: byte offset {start + e.start} ({bad}) is not valid {encoding}: pass "
                        f"--encoding with the file's encoding (e.g. {hint}), or --skip-invalid to drop such bytes"
                    ) from None
                text, offsets = _decode_lossy(raw, encoding, start)
                report.change(
                    "undecodable_bytes",
                    example=f"byte offsets {', '.join(map(str, offsets[:5]))}",
                    where=f"{name}:{lineno}",
                    n=len(offsets),
                )
            yield lineno, text
            lineno += whole
    src.bytes, src.sha256 = size, h.hexdigest()


def _long_line(name: str, lineno: int, max_bytes: int) -> DataError:
    return DataError(
        f"{name}:{lineno}: this line is longer than {max_bytes >> 20} MB, the most one record may hold within "
        "--max-memory-mb (1/16 of it): raise --max-memory-mb, or split the record"
    )


def _split_char(raw: bytes, encoding: str) -> tuple[bytes, bytes]:
    """`raw` cut before an incomplete multi-byte character at its end: (complete part, the rest for later)."""
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as e:
        if e.end == len(raw) and len(raw) - e.start < 4 and "end of data" in e.reason:
            return raw[: e.start], raw[e.start :]
    return raw, b""  # complete, or a real error that the caller reports with its offset


def _file_digest(path: Path) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def _decode_lossy(raw: bytes, encoding: str, start: int) -> tuple[str, list[int]]:
    """Decode, dropping undecodable bytes; also return their absolute byte offsets."""
    out, bad, pos = [], [], 0
    while True:
        try:
            out.append(raw[pos:].decode(encoding))
            return "".join(out), bad
        except UnicodeDecodeError as e:
            out.append(raw[pos : pos + e.start].decode(encoding, errors="ignore"))
            bad.append(start + pos + e.start)
            pos += e.end


def sniff_lines(src: SourceFile, encoding: str, n: int = 50) -> list[str]:
    """The first lines of a file (decoded leniently), for format and task detection."""
    encoding = bom_encoding(src.path, encoding)
    with open(src.path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head and _is_ascii_compatible(encoding):
        return []
    text = head.decode(encoding, errors="replace").lstrip("\ufeff")
    return text.splitlines()[:n]


def infer_task(src: SourceFile, cfg: Any) -> str | None:
    """The task a file's content implies, or None when it does not say (plain text implies lm)."""
    if src.format == "chitchat":
        return "chat"
    if src.format == "txt":
        return "lm"
    lines = sniff_lines(src, cfg.encoding)
    if src.format in ("csv", "tsv"):
        header = next(csv.reader(lines[:1], delimiter="\t" if src.format == "tsv" else ","), [])
        header = [h.strip() for h in header]
        return "classify" if _pick_column(header, cfg.label_column, LABEL_COLUMNS) else "lm"
    candidates = []
    head = "\n".join(lines).lstrip()
    if head.startswith("["):  # a JSON array, maybe pretty-printed: decode its first element
        try:
            candidates.append(json.JSONDecoder().raw_decode(head, len(head) - len(head[1:].lstrip()))[0])
        except (ValueError, RecursionError):
            pass
    for line in lines:  # jsonl: the first object that parses decides
        line = line.strip().lstrip("[").rstrip(",")
        if not line:
            continue
        try:
            candidates.append(json.loads(line))
        except (ValueError, RecursionError):
            continue
    for obj in candidates:
        if isinstance(obj, dict):
            if any(k in obj for k in (cfg.messages_field, "messages", "conversations", "instruction")):
                return "chat"
            if cfg.label_field in obj:
                return "classify"
            return "lm"
    return None


def _pick_column(header: list[str], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    if wanted:
        return wanted if wanted in header else None
    lower = {h.lower(): h for h in header}
    return next((lower[c] for c in candidates if c in lower), None)


# --- plain text ----------------------------------------------------------------------------------------------------


def _separator(doc_sep: str) -> Callable[[str], bool] | str:
    if not doc_sep.strip() or doc_sep in ("\\n\\n", "blank-line", "empty"):  # '' or '\n\n': a blank line
        return "blank"
    if doc_sep in ("file", "blank", "line"):
        return doc_sep
    sep = doc_sep.strip("\r\n")
    return lambda s: s.rstrip("\r\n").strip() == sep


@reader("txt")
def read_txt(src: SourceFile, cfg: Any, report: Report, task: str) -> Iterator[Record | Invalid]:
    """Plain text: the whole file is one document (`--doc-sep file`), or documents are separated by blank lines
    (`blank`), by a line holding only the given string (`%` for fortune files), or are single lines (`line`)."""
    if task != "lm":
        raise ConfigError(
            f"{src.name}: plain text holds no {task} records; use --task lm, or JSONL/CSV/TSV for "
            f"labelled data (and `--format chitchat` for dialogue text)"
        )
    sep = _separator(cfg.doc_sep)
    buf: list[str] = []
    first = 0
    longest = max_record_chars(cfg)
    held = 0  # characters in buf
    for lineno, line in decoded_lines(src, cfg.encoding, report, cfg.skip_invalid, longest, split_long=True):
        if held >= longest and buf:  # bounded memory: a huge document continues as the next document
            report.change("long_document_split", where=f"{src.name}:{first}")
            yield Record(src.name, first, text="".join(buf))
            buf, held, first = [], 0, lineno
        held += len(line)
        if sep == "file":
            if not buf:
                first = lineno
            buf.append(line)
            continue
        if sep == "line":
            if line.strip():
                yield Record(src.name, lineno, text=line)
            continue
        is_sep = (line.strip() == "") if sep == "blank" else sep(line)
        if is_sep:
            if buf:
                yield Record(src.name, first, text="".join(buf))
            buf, held = [], 0
            continue
        if not buf:
            first = lineno
        buf.append(line)
    if buf:
        yield Record(src.name, first or 1, text="".join(buf))


@reader("chitchat")
def read_chitchat(src: SourceFile, cfg: Any, report: Report, task: str) -> Iterator[Record | Invalid]:
    """GPT2-chitchat's train.txt: one utterance a line, dialogues separated by blank lines; the first utterance is
    the user's, then they alternate (user, assistant, user, ...)."""
    buf: list[str] = []
    first = 0
    for lineno, line in decoded_lines(src, cfg.encoding, report, cfg.skip_invalid, max_record_chars(cfg)):
        line = line.rstrip("\r\n")
        if line.strip():
            if not buf:
                first = lineno
            buf.append(line)
            continue
        if buf:
            yield _dialogue(src.name, first, buf)
        buf = []
    if buf:
        yield _dialogue(src.name, first, buf)


def _dialogue(name: str, line: int, utterances: list[str]) -> Record:
    roles = ("user", "assistant")
    return Record(name, line, messages=[{"role": roles[i % 2], "content": u} for i, u in enumerate(utterances)])


# --- JSON lines and JSON arrays ---------------------------------------------------------------------------------


def _json_objects(src: SourceFile, cfg: Any, report: Report) -> Iterator[tuple[int, Any, str | None]]:
    """(line, parsed object or None, error) for each JSON line of a file, or each element of a top-level array."""
    longest = max_record_chars(cfg)
    is_array = src.format == "json" and next(iter(sniff_lines(src, cfg.encoding, 1)), "").lstrip().startswith("[")
    if is_array and src.path.stat().st_size > 4 * longest:
        raise DataError(
            f"{src.name}: a JSON array is parsed whole, and this one is larger than --max-memory-mb allows "
            f"({4 * longest >> 20} MB); convert it to JSON lines (`jq -c '.[]' in.json > out.jsonl`) or raise "
            "--max-memory-mb"
        )
    lines = decoded_lines(src, cfg.encoding, report, cfg.skip_invalid, None if is_array else longest)
    first = None
    for lineno, line in lines:
        if line.strip():
            first = (lineno, line)
            break
    if first is None:
        return
    if src.format == "json" and first[1].lstrip().startswith("["):
        # A JSON array is parsed whole (it cannot be streamed line by line); positions give true line numbers.
        text = first[1] + "".join(t for _, t in lines)
        yield from _json_array(text, first[0])
        return
    for lineno, line in itertools.chain([first], lines):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), None
        except RecursionError:  # json recurses once per level: 100,000 nested '[' exhaust the stack
            yield lineno, None, "JSON nested too deeply (thousands of levels): fix the line, or pass --skip-invalid"
        except ValueError as e:
            if lineno == first[0] and line.lstrip().startswith("{") and not line.rstrip().endswith("}"):
                raise DataError(
                    f"{src.name}:{lineno}: one JSON object spread over many lines; owngpt reads JSON "
                    f"lines (one object a line) or a JSON array of objects (a Telegram export? use "
                    f"--from telegram)"
                ) from None
            yield lineno, None, f"malformed JSON ({e.args[0].split(':')[0]}): fix the line, or pass --skip-invalid"


def _json_array(text: str, first_line: int) -> Iterator[tuple[int, Any, str | None]]:
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line = first_line

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n,":
            p += 1
        return p

    while True:
        new = skip(pos)
        line += text.count("\n", pos, new)
        pos = new
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, end = dec.raw_decode(text, pos)
        except RecursionError:
            yield line, None, "JSON nested too deeply (thousands of levels): fix the file"
            return
        except ValueError as e:
            yield line, None, f"malformed JSON ({e.args[0].split(':')[0]}): fix the file"
            return
        yield line, obj, None
        line += text.count("\n", pos, end)
        pos = end


def _fields(obj: dict) -> str:
    return ", ".join(list(obj)[:8]) or "none"


@reader("jsonl")
@reader("json")
def read_jsonl(src: SourceFile, cfg: Any, report: Report, task: str) -> Iterator[Record | Invalid]:
    """JSON lines (or a JSON array): `{"text"}` (lm), `{"text", "label"}` (classify), or a conversation (chat) as
    `{"messages": [{"role", "content"}]}`, ShareGPT `{"conversations": [{"from", "value"}]}` or Alpaca
    `{"instruction", "input", "output"}`. Field names: --text-field, --label-field, --messages-field."""
    for lineno, obj, err in _json_objects(src, cfg, report):
        if err is not None:
            yield Invalid(src.name, lineno, err)
            continue
        if not isinstance(obj, dict):
            yield Invalid(src.name, lineno, f"expected a JSON object, found {type(obj).__name__}")
            continue
        try:
            yield record_from_object(obj, src.name, lineno, cfg, task)
        except ValueError as e:
            yield Invalid(src.name, lineno, str(e))


def record_from_object(obj: dict, file: str, line: int, cfg: Any, task: str) -> Record:
    """A Record from one JSON object for `task`; ValueError (with the fix) when the fields do not fit."""
    if task == "chat":
        return Record(file, line, messages=parse_chat(obj, cfg.messages_field))
    text = obj.get(cfg.text_field)
    if text is None:
        raise ValueError(
            f"missing field '{cfg.text_field}' (fields present: {_fields(obj)}); name the text field with --text-field"
        )
    if not isinstance(text, str):
        raise ValueError(f"field '{cfg.text_field}' must be a string, found {type(text).__name__}")
    if task == "classify":
        return Record(file, line, text=text, label=label_name(obj.get(cfg.label_field), cfg.label_field))
    return Record(file, line, text=text)


def label_name(value: Any, field_name: str) -> str:
    """A label as its name: strings stripped, integers (and integral floats, booleans) as their decimal form."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if value is None or value == "":
        raise ValueError(
            f"missing label '{field_name}': give every example a label (or name the label field "
            f"with --label-field / --label-column), or pass --skip-invalid"
        )
    raise ValueError(f"label '{field_name}' must be a string or an integer, found {type(value).__name__}")


def _content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI-style content parts: keep the text parts
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type", "text") == "text")
    raise ValueError(f"{where} must be a string, found {type(value).__name__}")


def parse_chat(obj: dict, messages_field: str = "messages") -> list[dict[str, str]]:
    """Messages from the supported chat schemas (owngpt/OpenAI messages, ShareGPT, Alpaca); ValueError otherwise."""
    for key in dict.fromkeys((messages_field, "messages", "conversations")):
        if key in obj:
            turns = obj[key]
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"'{key}' must be a non-empty list of messages")
            msgs = []
            for i, m in enumerate(turns):
                if not isinstance(m, dict):
                    raise ValueError(f"'{key}' item {i} must be an object")
                if "from" in m and "value" in m:  # ShareGPT
                    who = str(m["from"]).lower()
                    if who not in SHAREGPT_ROLES:
                        raise ValueError(f"'{key}' item {i} is from {m['from']!r}; expected human, gpt or system")
                    msgs.append({"role": SHAREGPT_ROLES[who], "content": _content(m["value"], f"item {i} value")})
                elif "role" in m:
                    role = SHAREGPT_ROLES.get(str(m["role"]).lower(), m["role"])
                    msgs.append({"role": role, "content": _content(m.get("content"), f"item {i} content")})
                else:
                    raise ValueError(
                        f"'{key}' item {i} needs 'role' and 'content' (or ShareGPT's 'from' and "
                        f"'value'); found {_fields(m)}"
                    )
            return validate_messages(msgs, where=f"'{key}'")
    if "instruction" in obj:  # Alpaca
        if "output" not in obj:
            raise ValueError("an Alpaca record needs 'instruction' and 'output' (and optionally 'input')")
        prompt = _content(obj["instruction"], "'instruction'")
        extra = _content(obj.get("input"), "'input'")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        msgs = [{"role": "system", "content": _content(obj["system"], "'system'")}] if obj.get("system") else []
        msgs += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _content(obj["output"], "'output'")},
        ]
        return msgs
    raise ValueError(
        f"no conversation found (fields present: {_fields(obj)}): expected '{messages_field}' "
        f"(role/content), 'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca); "
        f"name the field with --messages-field"
    )


# --- CSV / TSV ---------------------------------------------------------------------------------------------------


@reader("csv")
@reader("tsv")
def read_csv(src: SourceFile, cfg: Any, report: Report, task: str) -> Iterator[Record | Invalid]:
    """CSV or TSV with a header row; the text column (--text-column, default the first of text, sentence,
    content, review...) and for classification the label column (--label-column, default label, class...).
    TSV is read without quote processing (GLUE-style files contain bare quotes)."""
    tsv = src.format == "tsv"
    current = [0]

    def lines() -> Iterator[str]:
        for lineno, line in decoded_lines(src, cfg.encoding, report, cfg.skip_invalid, max_record_chars(cfg)):
            current[0] = lineno
            yield line

    rows = csv.reader(lines(), delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    try:
        header = [h.strip() for h in next(rows)]
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{src.name}:1: unreadable header ({e})") from None
    text_col = _pick_column(header, cfg.text_column, TEXT_COLUMNS)
    label_col = _pick_column(header, cfg.label_column, LABEL_COLUMNS) if task == "classify" else None
    if text_col is None and not cfg.text_column:
        others = [h for h in header if h != label_col]
        if len(others) == 1:  # one column (besides the label): it must be the text
            text_col = others[0]
    if text_col is None:
        wanted = cfg.text_column or "text"
        raise DataError(
            f"{src.name}:1: no text column '{wanted}' (columns: {', '.join(header)}); pass --text-column NAME"
        )
    if task == "classify" and label_col is None:
        wanted = cfg.label_column or "label"
        raise DataError(
            f"{src.name}:1: no label column '{wanted}' (columns: {', '.join(header)}); pass --label-column NAME"
        )
    ti = header.index(text_col)
    li = header.index(label_col) if label_col else None
    while True:
        start = current[0] + 1
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            yield Invalid(src.name, start, f"malformed {'TSV' if tsv else 'CSV'} row ({e})")
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            yield Invalid(
                src.name,
                start,
                f"{len(row)} fields where the header has {len(header)}: fix the row "
                f"(quote fields that contain the delimiter), or pass --skip-invalid",
            )
            continue
        if li is None:
            yield Record(src.name, start, text=row[ti])
            continue
        try:
            yield Record(src.name, start, text=row[ti], label=label_name(row[li], label_col))
        except ValueError as e:
            yield Invalid(src.name, start, str(e))


def _bundled_hint(p: Path) -> str:
    """The README's examples name the bundled samples (tinyshakespeare.txt, tang300.txt) as if they were in the
    current folder; a new user who copies the command gets told where the copy owngpt ships is."""
    from importlib import resources

    bundled = Path(str(resources.files("owngpt") / "sample_data" / p.name))
    if p.suffix == ".txt" and bundled.is_file():
        return f"; owngpt bundles a copy of {p.name}: {bundled}"
    return ""
