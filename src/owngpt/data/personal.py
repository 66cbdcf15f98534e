"""Personal chat exports -> chat records: WhatsApp, Telegram Desktop, WeChat (MemoTrace CSV), generic CSV/JSONL.

`owngpt prepare EXPORT... --from whatsapp|telegram|wechat|csv --me NAME --task chat` calls `read_exports`, which
yields `{"messages": [{"role", "content"}, ...]}` records for the ordinary chat pipeline. Steps, in order:

1. read: each reader turns a file into `Chat`s (one per chat in the export) of `ChatMessage`s (time, sender, text,
   kind, file:line). Media placeholders, stickers, system/service lines, recalled and empty messages are kept as
   kinds here and dropped (and counted) when shaping.
2. privacy, before anything leaves this module (on by default): `owngpt.data.privacy.Redactor` replaces phone numbers
   (of any region: `--region` for numbers without a country code), e-mails, URLs, ID, passport, IBAN, card and CVV
   numbers, WeChat/QQ IDs and postal addresses in every text and sender name; `--pseudonymize` replaces other
   people's names (as senders and written in full in texts) with "Person 1", "Person 2", ... in order of first
   appearance, and the export file names (which name contacts) with "input-1.txt", ...
3. shape: messages by `--me` become assistant turns, everyone else's user turns. A new conversation starts when a
   message comes more than `--session-gap` after the previous one; consecutive messages by one side merge into one
   turn (joined with a newline); in a chat with more than one other person (a group) each user message block starts
   with "Name: " so the model sees who said what. A conversation must open with a user turn and end with an
   assistant turn: leading `--me` turns (nothing to answer yet) and trailing user turns (no answer) are dropped, and
   conversations with no answer by `--me` at all are dropped. Every drop is counted in the report.

Not here: generic cleaning, dedup, splitting and tokenization (owngpt.data.prepare does those for every source).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from owngpt.data.privacy import DEFAULT_REGION, Pseudonymizer, Redactor, region_ok
from owngpt.data.readers import Record
from owngpt.data.report import Report
from owngpt.errors import ConfigError, DataError

SOURCES = ("whatsapp", "telegram", "wechat", "csv")
# Kinds of message; only "text" becomes part of a conversation.
TEXT, SYSTEM, MEDIA, STICKER, RECALLED, EMPTY, FORWARDED = (
    "text",
    "system",
    "media",
    "sticker",
    "recalled",
    "empty",
    "forwarded",
)
# Report rule names (owngpt.data.report): message-level drops, then conversation shaping, then privacy counters.
DROP_RULE = {
    SYSTEM: "chat.system_message",
    MEDIA: "chat.media_placeholder",
    STICKER: "chat.sticker",
    RECALLED: "chat.recalled_message",
    EMPTY: "chat.empty_message",
    FORWARDED: "chat.forwarded_message",
}


@dataclass
class ChatMessage:
    time: datetime | None
    sender: str | None  # None for system lines
    text: str
    file: str
    line: int  # 1-based line in the export (Telegram JSON: 0, the message id is in `where`)
    where: str  # file:line (or file message id) for the report
    kind: str = TEXT
    is_me: bool | None = None  # known from the export itself (WeChat's IsSender), else decided by --me
    sender_id: str | None = None  # Telegram's from_id ("user123"): --me may name it instead of the display name


@dataclass
class Chat:
    name: str
    where: str
    messages: list[ChatMessage] = field(default_factory=list)


@dataclass
class PersonalOptions:
    """The `prepare` flags this module reads (taken from the prepare config by `options_from`)."""

    source: str
    me: str | None = None
    session_gap: timedelta = timedelta(hours=2)
    pseudonymize: bool = False
    keep_pii: bool = False
    region: str = DEFAULT_REGION  # phone numbers written without a country code are read as this region's
    time_column: str | None = None
    sender_column: str | None = None
    content_column: str | None = None


# ----------------------------------------------------------------------------------------------------------- helpers
def parse_duration(value: str | int | float | timedelta, flag: str = "--session-gap") -> timedelta:
    """'30m', '2h', '1d', '90s', '1h30m' (a bare number means minutes) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)):
        return timedelta(minutes=value)
    s = str(value).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return timedelta(minutes=float(s))
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", s)
    if not parts or "".join(a + b for a, b in parts) != s:
        raise ConfigError(f"{flag} {value!r}: expected a duration such as 30m, 2h, 1d or 1h30m")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    out = timedelta()
    for n, u in parts:
        out += timedelta(**{unit[u]: float(n)})
    if out <= timedelta(0):
        raise ConfigError(f"{flag} {value!r}: the gap must be positive")
    return out


_TIME_FORMATS = (
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%M",
    "%Y.%m.%d %H:%M:%S",
    "%Y.%m.%d %H:%M",
    "%Y年%m月%d日 %H:%M:%S",
    "%Y年%m月%d日 %H:%M",
    "%Y-%m-%d",
)


def parse_time(value: Any) -> datetime | None:
    """A timestamp from an export: unix seconds/milliseconds or a common date-time string; None if unreadable."""
    if value is None:
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and re.fullmatch(r"\d{9,13}(\.\d+)?", value.strip())):
        t = float(value)
        if t > 1e11:  # milliseconds
            t /= 1000
        # naive local-free UTC: only differences between times matter here
        return datetime.fromtimestamp(t, tz=timezone.utc).replace(tzinfo=None)
    s = str(value).strip()
    if not s:
        return None
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00"))
        return d.astimezone(timezone.utc).replace(tzinfo=None) if d.tzinfo else d
    except ValueError:
        pass
    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(s, fmt)
        except ValueError:
            continue
    return None


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise DataError(f"{path} is a directory: pass the export file inside it") from e
    for enc in ("utf-8-sig", "gb18030"):  # Chinese Windows tools still write GBK/GB18030 CSVs
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    raise DataError(f"{path}: not UTF-8 or GB18030 text; re-export it as UTF-8")


def _looks_like(text: str) -> str:
    """A guess at what a file is, for errors about an export of another kind than --from."""
    head = text.lstrip("\ufeff \t\r\n")[:4096]
    if head.startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except ValueError:
            return "JSON (truncated or invalid)"
        if isinstance(obj, dict) and ("messages" in obj or "chats" in obj):
            return "a Telegram Desktop JSON export (use --from telegram)"
        return "JSON"
    first = head.splitlines()[0] if head.splitlines() else ""
    if _WA_LINE.match(first) or any(_WA_LINE.match(ln) for ln in head.splitlines()[:20]):
        return "a WhatsApp text export (use --from whatsapp)"
    if "," in first or "\t" in first:
        cols = [c.strip().lower() for c in re.split(r"[,\t]", first)]
        if {"strcontent", "issender"} & set(cols) or "type_name" in cols:
            return "a WeChat CSV export (use --from wechat)"
        return f"a CSV/TSV file with columns {first[:120]!r} (use --from csv)"
    return f"text starting with {first[:80]!r}"


# ----------------------------------------------------------------------------------------------------------- WhatsApp
# Android: "12/3/24, 9:15 PM - Name: text" / "12/03/2024, 21:15 - Name: text"
# iOS:     "[12/03/2024, 21:15:00] Name: text" (system and media lines start with U+200E)
# The space before AM/PM is often U+202F (narrow no-break space); some locales write 上午/下午 before the time.
_WA_LINE = re.compile(
    r"^[\u200e\u200f\ufeff]*\[?(?P<date>\d{1,4}[./-]\d{1,2}[./-]\d{1,4})[,，]?\s+"
    r"(?P<ampm1>上午|下午|凌晨|早上|中午|晚上)?(?P<time>\d{1,2}[:.]\d{2}(?:[:.]\d{2})?)"
    r"(?:[\s\u202f\u00a0]*(?P<ampm2>[AaPp]\.?\s?[Mm]\.?))?"
    r"(?:\]\s*|\s+[-–]\s+)(?P<rest>.*)$"
)
_WA_MEDIA = re.compile(
    r"^[\u200e\s]*(?:<Media omitted>|<Medien ausgelassen>|<Multimedia omitido>|<媒体已省略>|<省略媒体>|"
    r"(?:image|video|audio|GIF|document|Contact card|sticker) omitted|<attached: [^>]*>|"
    r".+\.(?:jpg|jpeg|png|webp|mp4|opus|pdf|vcf) \(file attached\)|<View once message omitted>|null)\s*$",
    re.IGNORECASE,
)
_WA_STICKER = re.compile(r"^[\u200e\s]*(?:sticker omitted|<attached: [^>]*STICKER[^>]*>)\s*$", re.IGNORECASE)
_WA_DELETED = re.compile(
    r"^[\u200e\s]*(?:This message was deleted\.?|You deleted this message\.?|此消息已删除|你删除了此消息)\s*$",
    re.IGNORECASE,
)
_WA_EDITED = re.compile(r"\s*<This message was edited>\s*$")
_WA_SYSTEM_HINT = re.compile(
    r"end-to-end encrypted|端到端加密|Missed (?:voice|video) call|created group|"
    r"changed the (?:subject|group|description)|added |left$|joined using",
    re.IGNORECASE,
)


def _wa_datetime(date: str, time_: str, ampm: str | None, day_first: bool) -> datetime | None:
    a, b, c = (int(x) for x in re.split(r"[./-]", date))
    if a > 31:  # 2024-03-12
        y, mo, d = a, b, c
    elif day_first:
        d, mo, y = a, b, c
    else:
        mo, d, y = a, b, c
    if y < 100:
        y += 2000
    hms = [int(x) for x in re.split(r"[:.]", time_)]
    h, mi, s = hms[0], hms[1], hms[2] if len(hms) > 2 else 0
    if ampm:
        pm = ampm[0].lower() == "p" or ampm in ("下午", "晚上", "中午")
        if ampm in ("中午",) and h < 11:  # 中午1:00 means 13:00
            pm = True
        h = h % 12 + (12 if pm else 0)
    try:
        return datetime(y, mo, d, h, mi, s)
    except ValueError:
        return None


def read_whatsapp(path: Path, text: str | None = None) -> list[Chat]:
    """One WhatsApp "Export chat" .txt (without media) -> one Chat."""
    text = _read_text(path) if text is None else text
    lines = text.splitlines()
    heads = [(i, m) for i, ln in enumerate(lines) if (m := _WA_LINE.match(ln))]
    if not heads:
        raise DataError(
            f"{path}: no WhatsApp message line ('DD/MM/YY, HH:MM - Name: text' or "
            f"'[DD/MM/YYYY, HH:MM:SS] Name: text') found; the file looks like {_looks_like(text)}"
        )
    # Day-first or month-first: decided once per file from dates that can only be read one way; if none can, the
    # 12-hour clock suggests a US export (month first), the 24-hour clock a day-first one.
    dates = [[int(x) for x in re.split(r"[./-]", m["date"])] for _, m in heads]
    dates = [d for d in dates if d[0] <= 31]  # year-first dates (2024/3/12) are read one way only
    if any(d[0] > 12 for d in dates):
        day_first = True
    elif any(d[1] > 12 for d in dates):
        day_first = False
    else:
        day_first = not any(m["ampm2"] for _, m in heads)
    chat = Chat(name=path.stem, where=str(path))
    for k, (i, m) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        body = "\n".join([m["rest"], *lines[i + 1 : end]]).rstrip()  # continuation lines belong to this message
        when = _wa_datetime(m["date"], m["time"], m["ampm1"] or m["ampm2"], day_first)
        where, file, line = f"{path}:{i + 1}", str(path), i + 1
        name, sep, msg = body.partition(": ")
        if not sep or len(name) > 60 or "\n" in name or _WA_SYSTEM_HINT.search(name):
            chat.messages.append(ChatMessage(when, None, body.strip("\u200e "), file, line, where, SYSTEM))
            continue
        name = name.strip("\u200e\u202a\u202c ~\u202f")  # iOS wraps unsaved numbers in directional marks and '~'
        msg = _WA_EDITED.sub("", msg).lstrip("\u200e")
        if _WA_STICKER.match(msg):
            kind = STICKER
        elif _WA_MEDIA.match(msg):
            kind = MEDIA
        elif _WA_DELETED.match(msg):
            kind = RECALLED
        elif not msg.strip():
            kind = EMPTY
        else:
            kind = TEXT
        chat.messages.append(ChatMessage(when, name, msg, file, line, where, kind))
    return [chat]


# ----------------------------------------------------------------------------------------------------------- Telegram
def _json_load(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        near_end = e.pos >= len(text.rstrip()) - 2
        hint = (
            "the file ends early: it looks truncated (was the export interrupted or the copy incomplete?)"
            if near_end
            else "it is not valid JSON"
        )
        raise DataError(f"{path}:{e.lineno}:{e.colno} (byte {e.pos} of {len(text.encode())}): {e.msg}; {hint}") from e


def _tg_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # parts: plain strings or {"type": "bold"|"link"|"email"|..., "text": "..."}
        return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in value if isinstance(p, (str, dict)))
    return ""


def read_telegram(path: Path, text: str | None = None) -> list[Chat]:
    """Telegram Desktop's `result.json`: one chat ({"name", "type", "messages"}) or all ({"chats": {"list": [...]}})."""
    text = _read_text(path) if text is None else text
    if not text.lstrip("\ufeff \t\r\n").startswith(("{", "[")):
        raise DataError(
            f"{path}: not a Telegram Desktop JSON export (Settings > Advanced > Export Telegram data, "
            f"format JSON); the file looks like {_looks_like(text)}"
        )
    obj = _json_load(path, text)
    if isinstance(obj, dict) and isinstance(obj.get("chats"), dict) and isinstance(obj["chats"].get("list"), list):
        raw_chats = obj["chats"]["list"]
    elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        raw_chats = [obj]
    else:
        keys = ", ".join(list(obj)[:10]) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{path}: not a Telegram Desktop export: expected 'messages' (one chat) or 'chats.list' "
            f"(all chats) at the top level; found {keys}"
        )
    chats = []
    for ci, rc in enumerate(raw_chats):
        if not isinstance(rc, dict) or not isinstance(rc.get("messages"), list):
            continue
        chat = Chat(name=str(rc.get("name") or f"chat {ci + 1}"), where=f"{path} chat {rc.get('name') or ci + 1!r}")
        for m in rc["messages"]:
            if not isinstance(m, dict):
                continue
            where = f"{path} message id {m.get('id')}"
            when = parse_time(m.get("date_unixtime") or m.get("date"))
            if m.get("type") != "message":
                chat.messages.append(ChatMessage(when, None, str(m.get("action", "")), str(path), 0, where, SYSTEM))
                continue
            sender = m.get("from") or m.get("from_id") or "Deleted Account"
            body = _tg_text(m.get("text"))
            if m.get("media_type") == "sticker":
                kind = STICKER
            elif "forwarded_from" in m:
                kind = FORWARDED  # someone else's words: not the user's voice, and not theirs to train on
            elif not body.strip():
                kind = (
                    MEDIA
                    if any(
                        k in m
                        for k in ("photo", "file", "media_type", "poll", "location_information", "contact_information")
                    )
                    else EMPTY
                )
            else:
                kind = TEXT
            from_id = str(m["from_id"]) if m.get("from_id") is not None else None
            chat.messages.append(ChatMessage(when, str(sender), body, str(path), 0, where, kind, sender_id=from_id))
        chats.append(chat)
    return chats


# ----------------------------------------------------------------------------------------------------------- CSV
# Column names seen in WeChat export tools (MemoTrace/WeChatMsg, PyWxDump, WeClone's CSV), English and Chinese.
_WECHAT_COLUMNS = {
    "type": ("Type", "type", "type_name", "msg_type", "类型", "消息类型"),
    "is_sender": ("IsSender", "is_sender", "isSend", "is_send", "是否发送", "是否为发送者", "发送者是否为自己"),
    "sender": (
        "Remark",
        "NickName",
        "sender",
        "Sender",
        "talker",
        "nickname",
        "remark",
        "发送人",
        "发送者",
        "发送者昵称",
        "昵称",
        "备注",
    ),
    "time": ("StrTime", "CreateTime", "time", "str_time", "create_time", "时间", "发送时间", "消息时间"),
    "content": ("StrContent", "content", "msg", "text", "message", "内容", "消息内容", "消息"),
}
_GENERIC_COLUMNS = {
    "time": ("time", "timestamp", "date", "datetime", "created_at", "时间"),
    "sender": ("sender", "from", "author", "name", "user", "speaker", "发送人", "发送者"),
    "content": ("text", "content", "message", "msg", "body", "内容", "消息"),
}
# WeChat message types (MSG.Type): 1 text, 3 image, 34 voice, 42 card, 43 video, 47 sticker, 48 location,
# 49 app/link/file/quote, 50 call, 10000 system (including recalls), 10002 system.
_WECHAT_TEXT_TYPES = {"1", "文本", "text", "文字"}
_WECHAT_STICKER_TYPES = {"47", "表情", "动画表情", "sticker", "emoji"}
_WECHAT_SYSTEM_TYPES = {"10000", "10002", "系统消息", "system", "撤回消息"}
_RECALLED = re.compile(r"撤回了一条消息|recalled a message|This message was deleted|你撤回了|已撤回")


def _read_rows(path: Path, text: str) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    """Rows of a CSV/TSV (header row) or a JSONL file, with their line numbers."""
    if path.suffix.lower() in (".jsonl", ".ndjson") or text.lstrip("\ufeff").startswith("{"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not a JSON object per line ({e})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected one JSON object per line, found {type(obj).__name__}")
            rows.append((n, obj))
        cols = list(dict.fromkeys(k for _, r in rows for k in r))
        return cols, iter(rows)
    sample = text[:8192]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t;")
    except csv.Error:
        dialect = csv.excel_tab if sample.count("\t") > sample.count(",") else csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    cols = [c.strip() for c in (reader.fieldnames or [])]

    def gen() -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            for row in reader:
                yield reader.line_num, {(k or "").strip(): v for k, v in row.items()}
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: broken CSV ({e})") from e

    return cols, gen()


def _pick(
    cols: list[str], explicit: str | None, candidates: Iterable[str], flag: str, path: Path, required: bool = True
) -> str | None:
    if explicit:
        if explicit not in cols:
            raise DataError(f"{path}: no column {explicit!r} ({flag}); columns found: {', '.join(cols) or 'none'}")
        return explicit
    lower = {c.lower(): c for c in cols}
    for c in candidates:
        if c in cols:
            return c
        if c.lower() in lower:
            return lower[c.lower()]
    if required:
        raise DataError(
            f"{path}: cannot tell which column is the {flag[2:].replace('-column', '')}: none of "
            f"{', '.join(list(candidates)[:6])}... is there (columns found: {', '.join(cols) or 'none'}); "
            f"name it with {flag}"
        )
    return None


def read_wechat(path: Path, opts: PersonalOptions, text: str | None = None) -> list[Chat]:
    """A WeChat chat exported as CSV by MemoTrace/WeChatMsg (or a tool with the same columns) -> one Chat.

    Columns used: type (1 or 文本 = text; others are media, stickers, system lines), IsSender (1 = the user) or a
    sender name, StrTime/CreateTime (time), StrContent (content). In group chats MemoTrace puts the speaker's
    remark/nickname in Remark/NickName.
    """
    text = _read_text(path) if text is None else text
    head = text.lstrip("\ufeff \t\r\n")
    if head.startswith(("{", "[")) and path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise DataError(
            f"{path}: expected a WeChat CSV export (MemoTrace/WeChatMsg: type, sender, time, content); "
            f"the file looks like {_looks_like(text)}"
        )
    cols, rows = _read_rows(path, text)
    c_content = _pick(cols, opts.content_column, _WECHAT_COLUMNS["content"], "--content-column", path)
    c_type = _pick(cols, None, _WECHAT_COLUMNS["type"], "--type-column", path, required=False)
    c_is_sender = _pick(cols, None, _WECHAT_COLUMNS["is_sender"], "--is-sender-column", path, required=False)
    c_sender = _pick(
        cols, opts.sender_column, _WECHAT_COLUMNS["sender"], "--sender-column", path, required=c_is_sender is None
    )
    c_time = _pick(cols, opts.time_column, _WECHAT_COLUMNS["time"], "--time-column", path, required=False)
    chat = Chat(name=path.stem, where=str(path))
    for line, row in rows:
        where = f"{path}:{line}"
        body = str(row.get(c_content) or "")
        mtype = str(row.get(c_type) or "").strip() if c_type else "1"
        is_me = None
        if c_is_sender:
            v = str(row.get(c_is_sender) or "").strip().lower()
            is_me = v in ("1", "true", "yes", "是")
        # MemoTrace leaves Remark empty for group members without a remark: fall back to NickName, then the wxid
        fallbacks = [c_sender] if opts.sender_column else [c for c in _WECHAT_COLUMNS["sender"] if c in row]
        sender = next((str(row[c]).strip() for c in fallbacks if c and str(row.get(c) or "").strip()), "")
        if not sender:
            sender = (opts.me or "me") if is_me else "them"
        when = parse_time(row.get(c_time)) if c_time else None
        if mtype in _WECHAT_SYSTEM_TYPES or _RECALLED.search(body):
            kind = RECALLED if _RECALLED.search(body) else SYSTEM
        elif mtype in _WECHAT_STICKER_TYPES:
            kind = STICKER
        elif mtype not in _WECHAT_TEXT_TYPES:
            kind = MEDIA
        elif not body.strip():
            kind = EMPTY
        else:
            kind = TEXT
        chat.messages.append(
            ChatMessage(when, sender if kind != SYSTEM else None, body, str(path), line, where, kind, is_me)
        )
    return [chat]


def read_table(path: Path, opts: PersonalOptions, text: str | None = None) -> list[Chat]:
    """A generic CSV/TSV/JSONL of (time, sender, text) rows -> one Chat. Column names: --*-column or common names."""
    text = _read_text(path) if text is None else text
    head = text.lstrip("\ufeff \t\r\n")
    if head.startswith("{") and path.suffix.lower() not in (".jsonl", ".ndjson") and "\n{" not in head[:65536]:
        raise DataError(
            f"{path}: expected CSV or JSONL rows of (time, sender, text); the file looks like {_looks_like(text)}"
        )
    cols, rows = _read_rows(path, text)
    c_content = _pick(cols, opts.content_column, _GENERIC_COLUMNS["content"], "--content-column", path)
    c_sender = _pick(cols, opts.sender_column, _GENERIC_COLUMNS["sender"], "--sender-column", path)
    c_time = _pick(cols, opts.time_column, _GENERIC_COLUMNS["time"], "--time-column", path, required=False)
    chat = Chat(name=path.stem, where=str(path))
    for line, row in rows:
        body = row.get(c_content)
        body = "" if body is None else str(body)
        sender = str(row.get(c_sender) or "").strip()
        kind = TEXT if body.strip() else EMPTY
        if _RECALLED.fullmatch(body.strip()):
            kind = RECALLED
        when = parse_time(row.get(c_time)) if c_time else None
        chat.messages.append(
            ChatMessage(when, sender or None, body, str(path), line, f"{path}:{line}", kind if sender else SYSTEM)
        )
    return [chat]


# ----------------------------------------------------------------------------------------------------------- shaping
def _matches_me(msg: ChatMessage, me: str | None) -> bool:
    if msg.is_me is not None:
        return msg.is_me
    if me is None or msg.sender is None:
        return False
    key = me.strip().casefold()
    return msg.sender.strip().casefold() == key or (msg.sender_id or "").casefold() == key


def _check_me(chats: list[Chat], me: str | None, paths: list[Path], source: str) -> None:
    speakers: Counter[str] = Counter()
    for c in chats:
        for m in c.messages:
            if m.sender is not None and m.kind == TEXT:
                speakers[m.sender] += 1
    if any(_matches_me(m, me) for c in chats for m in c.messages):
        return
    files = ", ".join(str(p) for p in paths)
    present = ", ".join(f"{n} ({k} messages)" for n, k in speakers.most_common(10)) or "none"
    if me is None:
        raise ConfigError(
            f"--me is required with --from {source}: name yourself as you appear in {files}. Senders present: {present}"
        )
    raise DataError(
        f"--me {me!r} never speaks in {files}. Senders present: {present}. Pass --me exactly as one of these names"
    )


def conversations(chat: Chat, opts: PersonalOptions, report: Report) -> Iterator[Record]:
    """Shape one chat's (already redacted) messages into chat records of {"role", "content"} turns."""
    kept: list[ChatMessage] = []
    for m in chat.messages:
        if m.kind != TEXT:
            report.drop(DROP_RULE[m.kind], m.text or f"({m.kind})", m.where)
            continue
        kept.append(m)
    group = len({m.sender for m in kept if not m.is_me}) > 1
    if group:
        report.count("chat.group_chats", example=chat.name if not opts.pseudonymize else None)

    sessions: list[list[ChatMessage]] = []
    prev: datetime | None = None
    for m in kept:
        if not sessions or (m.time is not None and prev is not None and m.time - prev > opts.session_gap):
            sessions.append([])
        sessions[-1].append(m)
        prev = m.time or prev
    report.count("chat.sessions", len(sessions))

    for sess in sessions:
        turns: list[dict[str, str]] = []
        last_sender: str | None = None
        for m in sess:
            role = "assistant" if m.is_me else "user"
            line = f"{m.sender}: {m.text}" if (group and role == "user") else m.text
            if turns and turns[-1]["role"] == role:
                report.change("chat.merged_message", m.text, m.where)
                # in a group's user turn a new speaker starts a new "Name: " line; the same speaker just continues
                turns[-1]["content"] += "\n" + (m.text if m.sender == last_sender else line)
            else:
                turns.append({"role": role, "content": line})
            last_sender = m.sender
        while turns and turns[0]["role"] == "assistant":  # nothing to answer yet: not a reply
            report.drop("chat.leading_me_turn", turns.pop(0)["content"], sess[0].where)
        while turns and turns[-1]["role"] == "user":  # nobody answered: nothing to learn
            report.drop("chat.unanswered_turn", turns.pop()["content"], sess[-1].where)
        if not turns:
            report.drop("chat.conversation_without_me", sess[0].text, sess[0].where)
            continue
        report.count("chat.conversations")
        report.count("chat.turns", len(turns))
        yield Record(sess[0].file, sess[0].line, messages=turns)


# ----------------------------------------------------------------------------------------------------------- entry
def options_from(cfg: Any) -> PersonalOptions:
    """PersonalOptions from prepare's config object (attribute names as the `prepare` flags)."""
    source = getattr(cfg, "source_format", None) or getattr(cfg, "source", None)
    if source not in SOURCES:
        raise ConfigError(f"--from {source!r}: expected one of {', '.join(SOURCES)}")
    return PersonalOptions(
        source=source,
        me=getattr(cfg, "me", None),
        session_gap=parse_duration(getattr(cfg, "session_gap", None) or "2h"),
        pseudonymize=bool(getattr(cfg, "pseudonymize", False)),
        keep_pii=bool(getattr(cfg, "keep_pii", False)),
        region=region_flag(getattr(cfg, "region", None)),
        time_column=getattr(cfg, "time_column", None),
        sender_column=getattr(cfg, "sender_column", None),
        content_column=getattr(cfg, "content_column", None),
    )


def read_chats(paths: Iterable[str | Path], opts: PersonalOptions) -> list[Chat]:
    chats: list[Chat] = []
    for p in paths:
        p = Path(p)
        if opts.source == "whatsapp":
            text = _read_text(p)
            if text.lstrip("\ufeff \t\r\n").startswith(("{", "[")):
                raise DataError(
                    f"{p}: --from whatsapp expects WhatsApp's 'Export chat' .txt; the file looks like "
                    f"{_looks_like(text)}"
                )
            chats += read_whatsapp(p, text)
        elif opts.source == "telegram":
            chats += read_telegram(p)
        elif opts.source == "wechat":
            chats += read_wechat(p, opts)
        else:
            chats += read_table(p, opts)
    return chats


def region_flag(region: str | None) -> str:
    """--region checked (a region code libphonenumber knows), upper-cased; the default when None."""
    try:
        return region_ok(region or DEFAULT_REGION)
    except ValueError as e:
        raise ConfigError(f"--region: {e}") from e


def file_alias(index: int, path: str | Path) -> str:
    """What --pseudonymize writes instead of an export's file name ("WhatsApp Chat with Wang Wei.txt" names the
    contact): "input-1.txt", "input-2.json", ... by the file's place among the inputs."""
    return f"input-{index + 1}{Path(path).suffix.lower()}"


@functools.lru_cache(maxsize=4096)
def _redact_label(label: str, region: str = DEFAULT_REGION) -> str:
    """A file name or sender name with any PII replaced (counted nowhere: it is not message content)."""
    return Redactor(region=region).redact(label)


def privatize(chats: list[Chat], opts: PersonalOptions, report: Report) -> None:
    """Redact PII in every text and sender name, in place; with --pseudonymize replace other people's names.

    A sender whose display name is itself PII (WhatsApp shows unsaved contacts as their phone number) gets a
    pseudonym even without --pseudonymize, so that a group's speakers stay apart without the number.
    """
    redactor = None if opts.keep_pii else Redactor(region=opts.region)
    label = functools.partial(_redact_label, region=opts.region)
    people = Pseudonymizer(keep=[opts.me] if opts.me else [])
    hits: list[tuple[ChatMessage, str, int]] = []  # reported at the end, so examples show the final text
    pii_senders: set[str] = set()
    for chat in chats:
        if redactor is not None:  # names of export files can hold a number: "WhatsApp Chat with +86 139....txt"
            chat.name = label(chat.name)
        for m in chat.messages:
            if redactor is not None and label(m.file) != m.file:
                m.where = m.where.replace(m.file, label(m.file), 1)
                m.file = label(m.file)
            m.is_me = _matches_me(m, opts.me)  # decided on the original names, before any replacement
            if redactor is not None:
                before = dict(redactor.counts)
                m.text = redactor.redact(m.text)
                hits += [(m, k, n - before.get(k, 0)) for k, n in redactor.counts.items() if n > before.get(k, 0)]
                if m.sender is not None and label(m.sender) != m.sender:
                    pii_senders.add(m.sender)
                    m.sender = people.name(m.sender) if not m.is_me else (opts.me or "me")
                    continue
            if opts.pseudonymize and m.sender is not None and not m.is_me:
                m.sender = people.name(m.sender)
    if opts.pseudonymize:
        for chat in chats:  # a second pass: a name can be written before its owner first speaks
            chat.name = people.apply(chat.name)
            for m in chat.messages:
                m.text = people.apply(m.text)
        report.count("pseudonymized.people", people.counts["NAME"])
        report.count("pseudonymized.names_in_text", people.counts["NAME_IN_TEXT"])
    for m, kind, n in hits:
        report.count(f"redacted.{kind.lower()}", n, m.text, m.where)
    if pii_senders:
        report.count("redacted.sender_names", len(pii_senders))


KEEP_PII_WARNING = (
    "WARNING: --keep-pii: phone numbers, e-mail addresses, URLs, ID, passport, IBAN, bank card and CVV numbers, "
    "WeChat/QQ IDs and postal addresses from your chats are written AS THEY ARE into the data dir, its tokenizer and any model trained on it. Do not share any of them."
)


def read_exports(paths: Iterable[str | Path], cfg: Any, report: Report | None = None) -> Iterator[Record]:
    """Read chat exports (`--from` = cfg.source_format), yield privacy-safe chat records and fill `report`.

    Everything a record or the report holds has been redacted (unless cfg.keep_pii) before it leaves this function.
    """
    opts = options_from(cfg)
    report = report if report is not None else Report()
    paths = [Path(p) for p in paths]
    if opts.keep_pii:
        print(KEEP_PII_WARNING, file=sys.stderr)
    chats = read_chats(paths, opts)
    _check_me(chats, opts.me, paths, opts.source)
    if opts.pseudonymize:  # file names name contacts and the user's folders: the report and records get aliases
        alias = {str(p): file_alias(i, p) for i, p in enumerate(paths)}
        for chat in chats:
            for m in chat.messages:
                if m.file in alias:
                    m.where = m.where.replace(m.file, alias[m.file], 1)
                    m.file = alias[m.file]
            chat.where = next((alias[k] for k in alias if chat.where.startswith(k)), chat.where)
    privatize(chats, opts, report)
    n = 0
    for chat in chats:
        report.count("chat.messages_read", len(chat.messages))
        for rec in conversations(chat, opts, report):
            n += 1
            yield rec
    if n == 0:
        raise DataError(
            f"no conversation in {', '.join(map(str, paths))} has a reply by --me {opts.me!r} after cleaning "
            f"(each needs a message by someone else answered by you within --session-gap {cfg.session_gap})"
        )
