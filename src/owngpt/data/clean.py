"""Cleaning: the text rules of `owngpt prepare`, each counted in the report with examples.

Order (each rule sees the previous one's output): line endings -> ANSI escape sequences -> control characters ->
HTML tags (opt-in) -> Unicode normalization (NFC, or NFKC opt-in) -> whitespace -> length filters -> exact
duplicates -> near-duplicates (opt-in, MinHash). Newlines and tabs are kept: they are part of poems and code.

Decoding (BOM, encodings, undecodable bytes) happens earlier, in `owngpt.data.readers`, where byte offsets are known.
Regular expressions and `unicodedata` do the work; the HTML stripper is the standard library's `html.parser`
(tolerant of broken markup), and near-duplicate detection is datasketch's MinHash LSH.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from html.parser import HTMLParser
from typing import Any

from owngpt.data.readers import Record
from owngpt.data.report import Report, shorten
from owngpt.errors import require

# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \), and the two-byte escapes (ESC + one of @-Z \ ] ^ _).
ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# C0 and C1 control characters except \t (\x09) and \n (\x0a); \r is turned into \n before this runs.
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
LINE_BREAKS_RE = re.compile(r"\r\n?|[\u2028\u2029\x85]")
SPACES_RE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f]")  # exotic spaces -> " " (not U+3000, 全角空格)
ZERO_WIDTH_RE = re.compile(r"[\u200b\u2060\ufeff]")  # zero-width space / word joiner / stray BOM (not ZWJ: emoji)
TRAILING_RE = re.compile(r"[ \t]+(?=\n)")
MANY_NEWLINES_RE = re.compile(r"\n{3,}")
# Anything any of the rules above would touch: most documents have none, and one search is much cheaper than
# running every rule (Tiny Shakespeare: 6x faster cleaning).
NEEDS_WORK_RE = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u2060\ufeff]|[ \t]\n|\n\n\n"
)


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML fragment; block tags become line breaks, script/style are skipped."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


HTML_HINT_RE = re.compile(r"<[a-zA-Z/!][^>]*>|&[#a-zA-Z0-9]+;")


def strip_html(text: str) -> str:
    """The text of an HTML fragment (tags removed, entities decoded)."""
    p = _TextExtractor()
    p.feed(text)
    p.close()
    return "".join(p.parts)  # convert_charrefs=True has already decoded &amp; and friends


_VISIBLE = {c: 0x2400 + c for c in range(32) if c not in (9, 10)}  # control char -> its Unicode control picture


def _visible(s: str) -> str:
    """Control characters made visible for examples (ESC as ␛)."""
    return s.translate(_VISIBLE)


def _first_changed_line(before: str, after: str) -> str | None:
    a, b = before.split("\n"), after.split("\n")
    for x, y in zip(a, b):
        if x != y:
            return f"{_visible(x)!r} → {y!r}"
    return shorten(_visible(before), 60)


class Cleaner:
    """Applies the cleaning rules to records and remembers what it has seen (for duplicate removal).

    Memory: exact-duplicate removal keeps a 16-byte hash per kept document; near-duplicate removal (opt-in) keeps
    datasketch's LSH index (a few hundred bytes per document).
    """

    def __init__(self, cfg: Any, report: Report):
        self.cfg, self.report = cfg, report
        self.form = "NFKC" if cfg.nfkc else "NFC"
        self.seen: set[bytes] = set()
        self.near = NearDuplicates(cfg.near_dup_threshold) if cfg.near_dup else None

    # --- text rules --------------------------------------------------------------------------------------------
    def clean_text(self, text: str, where: str) -> str:
        r = self.report
        if not NEEDS_WORK_RE.search(text) and not self.cfg.strip_html and unicodedata.is_normalized(self.form, text):
            return text.strip()
        text = LINE_BREAKS_RE.sub("\n", text)
        if "\x1b" in text:
            new = ANSI_RE.sub("", text)
            if new != text:
                r.change(
                    "ansi_escapes", self._example("ansi_escapes", text, new), where, chars_removed=len(text) - len(new)
                )
                text = new
        new = CONTROL_RE.sub("", text)
        if new != text:
            r.change(
                "control_chars", self._example("control_chars", text, new), where, chars_removed=len(text) - len(new)
            )
            text = new
        if self.cfg.strip_html and HTML_HINT_RE.search(text):
            new = strip_html(text)
            if new != text:
                r.change("html_tags", shorten(text, 60), where, chars_removed=len(text) - len(new))
                text = new
        if not unicodedata.is_normalized(self.form, text):
            new = unicodedata.normalize(self.form, text)
            r.change(f"unicode_{self.form.lower()}", self._example(f"unicode_{self.form.lower()}", text, new), where)
            text = new
        new = ZERO_WIDTH_RE.sub("", SPACES_RE.sub(" ", text))
        new = MANY_NEWLINES_RE.sub("\n\n", TRAILING_RE.sub("", new))
        if new != text:
            r.change("whitespace", self._example("whitespace", text, new), where)
        return new.strip()

    def _example(self, rule: str, before: str, after: str) -> str | None:
        return _first_changed_line(before, after) if self.report.wants_example(rule) else None

    # --- records -----------------------------------------------------------------------------------------------
    def clean(self, rec: Record) -> Record | None:
        """The cleaned record, or None when a rule drops it (the report says which)."""
        if rec.messages is not None:
            return self._clean_chat(rec)
        text = self.clean_text(rec.text or "", rec.where)
        if not text:
            self.report.drop("empty", rec.text or "", rec.where)
            return None
        if not self._length_ok(len(text), text, rec.where):
            return None
        out = Record(rec.file, rec.line, text=text, label=rec.label)
        key = text if rec.label is None else f"{rec.label}\x00{text}"
        return out if self._unique(key, text, rec.where) else None

    def _clean_chat(self, rec: Record) -> Record | None:
        msgs = []
        for m in rec.messages or []:
            content = self.clean_text(m["content"], rec.where)
            if not content:
                self.report.change("empty_message_removed", f"{m['role']}: {shorten(m['content'], 40)}", rec.where)
                continue
            msgs.append({"role": m["role"], "content": content})
        joined = "\n".join(m["content"] for m in msgs)
        if not any(m["role"] == "assistant" for m in msgs):
            self.report.drop("no_assistant_reply", joined or "(empty)", rec.where)
            return None
        if not self._length_ok(sum(len(m["content"]) for m in msgs), joined, rec.where):
            return None
        key = json.dumps(msgs, ensure_ascii=False, sort_keys=True)
        return Record(rec.file, rec.line, messages=msgs) if self._unique(key, joined, rec.where) else None

    def _length_ok(self, n: int, text: str, where: str) -> bool:
        if n < self.cfg.min_chars:
            self.report.drop("too_short", text, where)
            return False
        if self.cfg.max_chars and n > self.cfg.max_chars:
            self.report.drop("too_long", f"({n} characters) {text}", where)
            return False
        return True

    def _unique(self, key: str, text: str, where: str) -> bool:
        if self.cfg.dedup:
            h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if h in self.seen:
                self.report.drop("exact_duplicate", text, where)
                return False
            self.seen.add(h)
        if self.near is not None:
            other = self.near.check_and_add(text, where)
            if other is not None:
                self.report.drop("near_duplicate", f"{shorten(text, 60)} ≈ {os.path.basename(other)}", where)
                return False
        return True


class NearDuplicates:
    """MinHash LSH over character 5-grams (works for languages without spaces, e.g. Chinese)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, ngram: int = 5):
        datasketch = require("datasketch", "data")
        self._MinHash = datasketch.MinHash
        self.lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.ngram, self.n = num_perm, ngram, 0
        # the seeded permutations, drawn once and shared by every document's MinHash (datasketch draws them again
        # for each new MinHash otherwise); the same seed gives the same signatures
        template = self._MinHash(num_perm=num_perm, seed=1)
        self._shared = {"permutations": template.permutations}
        if hasattr(template, "scheme"):  # datasketch >= 2 asks which hashing scheme the permutations belong to
            self._shared["scheme"] = template.scheme

    def check_and_add(self, text: str, where: str) -> str | None:
        """The location of an earlier near-duplicate of `text`, or None (and then `text` is indexed)."""
        s = " ".join(text.lower().split())
        if len(s) < self.ngram:
            return None
        m = self._MinHash(num_perm=self.num_perm, seed=1, **self._shared)
        m.update_batch([s[i : i + self.ngram].encode("utf-8") for i in range(len(s) - self.ngram + 1)])
        hits = self.lsh.query(m)
        if hits:
            return min(hits)
        self.n += 1
        self.lsh.insert(where if where not in self.lsh else f"{where}#{self.n}", m)
        return None
