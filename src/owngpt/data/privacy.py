"""Personal data out of text before anything is written: PII redaction and stable pseudonyms for names.

`Redactor` replaces phone numbers (Chinese mobiles and landlines, international `+CC` numbers, North American
numbers), e-mail addresses, Chinese resident ID numbers (18 digits ending in a digit or X, and the old 15-digit form),
bank card numbers (13-19 digits passing the Luhn check) and URLs with placeholders (`<PHONE>`, `<EMAIL>`, `<ID>`,
`<CARD>`, `<URL>`) and counts each kind. `Pseudonymizer` replaces people's names with "Person 1", "Person 2", ...
in order of first appearance, so the same inputs always give the same pseudonyms.

It is reusable on its own (no owngpt imports) and is used by `owngpt prepare --from ...` (owngpt.data.personal).
What it is not: a guarantee. It finds the common written forms of these numbers; names are only found where they
appear in full as a sender's display name. Read docs/personal.md before sharing a model trained on private chats.

Why regular expressions written here rather than a library: the well-kept PII libraries (Presidio, scrubadub) pull in
spaCy models and do not know Chinese ID or mobile numbers; the formats below are short and exactly specified.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# Placeholders are written in ASCII angle brackets, without digits, '@' or dots, so no later rule can match inside one.
PLACEHOLDERS: dict[str, str] = {
    "EMAIL": "<EMAIL>",
    "URL": "<URL>",
    "ID": "<ID>",
    "CARD": "<CARD>",
    "PHONE": "<PHONE>",
}
# The order rules run in. E-mails before URLs (a bare domain inside an address is not a URL); ID numbers before cards
# and phones (an 18-digit ID contains 11-digit runs that look like mobile numbers); cards before phones.
KINDS: tuple[str, ...] = ("EMAIL", "URL", "ID", "CARD", "PHONE")

# Full-width digits, '＠' and '＋' are common in Chinese text; they are read as ASCII before matching (only these:
# full-width punctuation such as '，' is part of the writer's style and stays).
_ANY_DIGIT = re.compile(r"\d")
_FULLWIDTH = {0xFF10 + i: ord("0") + i for i in range(10)} | {0xFF20: ord("@"), 0xFF0B: ord("+")}
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])"
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
)
# A URL ends at whitespace, at CJK text or full-width punctuation (Chinese writes no space after a link), or at a
# placeholder's '<'; trailing sentence punctuation is given back (see _url).
_URL_BODY = r"[^\s<>\"'\u3000-\u303f\u3400-\u9fff\uff00-\uffef]"
_URL = re.compile(
    rf"(?:(?<![A-Za-z0-9])(?:https?|ftp)://|(?<![A-Za-z0-9.])www\.){_URL_BODY}+"
    # bare domains with a path or a common TLD: baidu.com, t.cn/A6x, example.org/page
    rf"|(?<![A-Za-z0-9.@-])(?:[A-Za-z0-9-]+\.)+(?:com|cn|net|org|io|me|co|cc|ly|info|top|xyz|edu|gov|app|dev)\b(?:/{_URL_BODY}*)?",
    re.IGNORECASE,
)
_DATE = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
_ID = re.compile(
    rf"(?<!\d)(?:[1-9]\d{{5}}(?:18|19|20)\d{{2}}{_DATE}\d{{3}}[\dXx]|[1-9]\d{{5}}\d{{2}}{_DATE}\d{{3}})(?!\d)"
)
_CARD = re.compile(r"(?<![\d+])\d(?:[ -]?\d){12,18}(?!\d)")
_PHONE = re.compile(
    "|".join(
        [
            # Chinese mobile, optionally +86 / 0086 / (+86), optionally grouped 3-4-4
            r"(?<![\d+])(?:\(?(?:\+|00)86\)?[\s-]?)?1[3-9]\d(?:[\s-]?\d{4}){2}(?!\d)",
            # international: +CC then 2-5 groups, 7-15 digits in all (checked in _phone); not glued to a Latin word,
            # but Chinese text may touch it ("电话+44 20 7946 0958": CJK characters are \w, hence no \w here)
            r"(?<![A-Za-z0-9_+])\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}(?!\d)",
            # Chinese landline: area code 0xx(x), optional brackets/separator, 7-8 digits, optional extension
            r"(?<!\d)(?:\(0[1-9]\d{1,2}\)|0[1-9]\d{1,2})[\s-]?\d{7,8}(?:-\d{1,4})?(?!\d)",
            # North American: (555) 123-4567, 555-123-4567, 555.123.4567
            r"(?<!\d)(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)",
        ]
    )
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum bank cards carry (ISO/IEC 7812)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def id_checksum_ok(number: str) -> bool:
    """GB 11643 check character of an 18-digit ID number (informational: redaction does not require it)."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    if len(number) != 18:
        return False
    total = sum(int(c) * w for c, w in zip(number[:17], weights))
    return "10X98765432"[total % 11] == number[17].upper()


class Redactor:
    """Replace PII with placeholders and count what was replaced (`counts`, by kind).

    An 18-digit number shaped like an ID (region, a real birth date) is redacted whatever its check character: a
    wrong one is more often a typo than a different kind of number, and leaking a real ID costs more than hiding a
    stray number.
    """

    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.kinds = [k for k in KINDS if k in set(kinds)]
        self.counts: Counter[str] = Counter()

    def redact(self, text: str) -> str:
        text = text.translate(_FULLWIDTH)
        # Cheap tests first: most chat messages hold no digit, '@' or '.', and then no rule can match.
        digits = _ANY_DIGIT.search(text) is not None
        for kind in self.kinds:
            if kind in ("ID", "CARD", "PHONE") and not digits:
                continue
            if kind == "URL" and "." not in text and "://" not in text:
                continue
            text = getattr(self, f"_{kind.lower()}")(text)
        return text

    def _sub(self, kind: str, pattern: re.Pattern, text: str, accept=None) -> str:
        def repl(m: re.Match) -> str:
            if accept is not None and not accept(m.group(0)):
                return m.group(0)
            self.counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)

    def _email(self, text: str) -> str:
        return self._sub("EMAIL", _EMAIL, text) if "@" in text else text

    def _url(self, text: str) -> str:
        def repl(m: re.Match) -> str:
            url = m.group(0)
            # sentence punctuation after a link is not part of it: "see https://x.org/a." keeps its full stop
            stripped = url.rstrip(".,;:!?)]}")
            self.counts["URL"] += 1
            return PLACEHOLDERS["URL"] + url[len(stripped) :]

        return _URL.sub(repl, text)

    def _id(self, text: str) -> str:
        return self._sub("ID", _ID, text)

    def _card(self, text: str) -> str:
        return self._sub("CARD", _CARD, text, accept=lambda s: luhn_ok(re.sub(r"\D", "", s)))

    def _phone(self, text: str) -> str:
        def plausible(s: str) -> bool:
            return 7 <= len(re.sub(r"\D", "", s)) <= 15

        return self._sub("PHONE", _PHONE, text, accept=plausible)


def redact(text: str) -> tuple[str, Counter[str]]:
    """Redact one text; return it with the counts by kind."""
    r = Redactor()
    return r.redact(text), r.counts


class Pseudonymizer:
    """Stable pseudonyms for people's names: "Person 1", "Person 2", ... in order of first appearance.

    `name(x)` gives x's pseudonym (assigning the next one on first sight); `apply(text)` replaces every known name
    written in full in `text`. Names in `keep` (the exporting user) are never replaced. Latin-script names only match
    as whole words ("Ann" does not match inside "Anna"); CJK names match anywhere, since Chinese has no spaces.
    """

    def __init__(self, keep: Iterable[str] = (), prefix: str = "Person") -> None:
        self.keep = {k.strip().casefold() for k in keep if k and k.strip()}
        self.prefix = prefix
        self.mapping: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self._pattern: re.Pattern | None = None

    def name(self, original: str) -> str:
        key = original.strip()
        if not key or key.casefold() in self.keep:
            return original
        if key not in self.mapping:
            self.mapping[key] = f"{self.prefix} {len(self.mapping) + 1}"
            self._pattern = None
            self.counts["NAME"] += 1  # people pseudonymized
        return self.mapping[key]

    def apply(self, text: str) -> str:
        if not self.mapping:
            return text
        if self._pattern is None:
            alts = []
            for n in sorted(self.mapping, key=len, reverse=True):  # longest first: "Wang Wei" before "Wang"
                left = r"(?<![A-Za-z0-9_])" if n[0].isascii() and n[0].isalnum() else ""
                right = r"(?![A-Za-z0-9_])" if n[-1].isascii() and n[-1].isalnum() else ""
                alts.append(left + re.escape(n) + right)
            self._pattern = re.compile("|".join(alts))

        def repl(m: re.Match) -> str:
            self.counts["NAME_IN_TEXT"] += 1
            return self.mapping[m.group(0)]

        return self._pattern.sub(repl, text)
