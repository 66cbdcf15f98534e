"""Personal data out of text before anything is written: PII redaction and stable pseudonyms for names.

`Redactor` replaces, with placeholders, and counts by kind:
- `<EMAIL>` e-mail addresses; `<URL>` links and bare domains of any top-level domain (the Public Suffix List, bundled
  with the `publicsuffixlist` package: nothing is downloaded);
- `<IBAN>` bank account numbers that pass the IBAN mod-97 check, with their country's length;
- `<ID>` Chinese resident ID numbers (18 digits ending in a digit or X, and the old 15-digit form), US social security
  numbers (123-45-6789, or 9 digits after "SSN"), UK national insurance, Hong Kong, Taiwan and Korean ID numbers;
- `<CARD>` bank card numbers (13-19 digits passing the Luhn check); `<CVV>` 3-4 digits after a card word (CVV, CVC,
  security code, 安全码);
- `<PASSPORT>` passport numbers after the word (passport, 护照) and Chinese passport numbers (E12345678);
- `<IM_ID>` WeChat IDs and QQ numbers after the word (微信, WeChat, wxid_..., QQ);
- `<ADDRESS>` postal addresses: Chinese ones down to the house number (省/市/区 ... 路/街/道 12号, 小区 3栋) and English
  street addresses (221B Baker Street, 1600 Amphitheatre Parkway, Apt 4);
- `<PHONE>` phone numbers: Chinese mobiles and landlines and North American numbers by their written shape, and the
  numbers of every region through Google's libphonenumber data (the `phonenumbers` package): any number written with
  its country code (+44 20 7946 0958, 0033 6 12 34 56 78), and local numbers of `region` (default CN; `owngpt prepare
  --region GB` for 020 7946 0958).
`Pseudonymizer` replaces people's names with "Person 1", "Person 2", ... in order of first appearance, so the same
inputs always give the same pseudonyms.

It is reusable on its own (no owngpt imports) and is used by `owngpt prepare --from ...` (owngpt.data.personal).
What it is not: a guarantee. It finds the common written forms of these numbers; names are only found where they
appear in full as a sender's display name. Read docs/personal.md before sharing a model trained on private chats.

Why regular expressions written here for most kinds: the well-kept PII libraries (Presidio, scrubadub) pull in spaCy
models and do not know Chinese ID, mobile, WeChat or address formats; the formats below are short and exactly
specified. Phone numbers of other countries and the list of top-level domains are not short: those come from the
maintained data sets named above.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable

# Placeholders are written in ASCII angle brackets, without digits, '@' or dots, so no later rule can match inside one.
PLACEHOLDERS: dict[str, str] = {
    "EMAIL": "<EMAIL>",
    "URL": "<URL>",
    "IBAN": "<IBAN>",
    "ID": "<ID>",
    "CARD": "<CARD>",
    "CVV": "<CVV>",
    "PASSPORT": "<PASSPORT>",
    "IM": "<IM_ID>",
    "ADDRESS": "<ADDRESS>",
    "PHONE": "<PHONE>",
}
# The order rules run in. E-mails before URLs (a bare domain inside an address is not a URL); IBANs before IDs, cards
# and phones (an IBAN holds long digit runs); ID numbers before cards and phones (an 18-digit ID contains 11-digit
# runs that look like mobile numbers); cards before CVVs (the code follows the card number); passports, WeChat/QQ IDs
# and addresses before phones (a QQ number or a passport's digits can look like a local phone number).
KINDS: tuple[str, ...] = ("EMAIL", "URL", "IBAN", "ID", "CARD", "CVV", "PASSPORT", "IM", "ADDRESS", "PHONE")
DEFAULT_REGION = "CN"  # numbers written without a country code are read as this region's (prepare --region)
# kinds whose every form holds a digit: skipped on text without one (most chat messages)
_NEEDS_DIGIT = {"IBAN", "ID", "CARD", "CVV", "PASSPORT", "ADDRESS", "PHONE"}

# Full-width digits, letters, '＠' and '＋' are common in Chinese text; they are read as ASCII before matching (only
# these: full-width punctuation such as '，' is part of the writer's style and stays).
_ANY_DIGIT = re.compile(r"\d")
_FULLWIDTH = (
    {0xFF10 + i: ord("0") + i for i in range(10)}
    | {0xFF21 + i: ord("A") + i for i in range(26)}
    | {0xFF41 + i: ord("a") + i for i in range(26)}
    | {0xFF20: ord("@"), 0xFF0B: ord("+")}
)
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])"
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
)
# A URL ends at whitespace, at CJK text or full-width punctuation (Chinese writes no space after a link), or at a
# placeholder's '<'; trailing sentence punctuation is given back (see _url).
_URL_BODY = r"[^\s<>\"'\u3000-\u303f\u3400-\u9fff\uff00-\uffef]"
_URL = re.compile(rf"(?:(?<![A-Za-z0-9])(?:https?|ftp)://|(?<![A-Za-z0-9.])www\.){_URL_BODY}+", re.IGNORECASE)
# bare domains (baidu.com, bbc.co.uk, yandex.ru/news): any dotted name, kept only if its last label is a top-level
# domain of the Public Suffix List (see _is_domain)
_BARE_DOMAIN = re.compile(
    rf"(?<![A-Za-z0-9.@-])(?P<host>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)+"
    rf"(?P<tld>[A-Za-z]{{2,63}}|xn--[A-Za-z0-9-]{{1,59}}))(?![A-Za-z0-9-])(?P<path>/{_URL_BODY}*)?"
)
# File extensions that are also country domains: "main.py", "README.md", "lib.so" are files far more often than
# Paraguayan, Moldovan or Somali sites, unless written with a path or www.
_FILE_EXTENSIONS = {"py", "md", "sh", "rs", "pl", "pm", "so", "zip", "mov", "ps", "cs", "ts", "rb", "mk", "am", "in"}
_DATE = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
_ID = re.compile(
    "|".join(
        [
            # Chinese resident ID: 18 digits (region, birth date, sequence, check digit or X) or the old 15
            rf"(?<!\d)(?:[1-9]\d{{5}}(?:18|19|20)\d{{2}}{_DATE}\d{{3}}[\dXx]|[1-9]\d{{5}}\d{{2}}{_DATE}\d{{3}})(?!\d)",
            # US social security number 123-45-6789 / 123 45 6789 (area 000, 666 and 9xx, group 00 and serial 0000
            # are never issued)
            r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])",
            # UK national insurance number AB 12 34 56 C
            r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]"
            r"(?![A-Za-z0-9])",
            # Hong Kong identity card A123456(7), with its bracketed check digit
            r"(?<![A-Za-z0-9])[A-Z]{1,2}\d{6}[(（][0-9A][)）]",
            # Taiwan national ID A123456789
            r"(?<![A-Za-z0-9])[A-Z][12]\d{8}(?![A-Za-z0-9])",
            # Korean resident registration number 900101-1234567
            rf"(?<!\d)\d{{2}}{_DATE}-[1-4]\d{{6}}(?!\d)",
        ]
    )
)
# an ID written as bare digits after its name: "SSN 123456789", "社会安全号 123456789"
_ID_AFTER_WORD = re.compile(
    r"(?i:\bSSN|social security(?: number| no\.?)?|社会安全号码?|社會安全號碼?)[\s:：#是为]*(?P<v>\d{9})(?!\d)"
)
_CARD = re.compile(r"(?<![\d+])\d(?:[ -]?\d){12,18}(?!\d)")
_CVV = re.compile(
    r"(?i:\b(?:cvv2?|cvc2?|cvn|csc)\b|security code|card code|安全码|安全碼|卡背面?(?:后|後)?三位(?:数字|数)?)"
    r"[\s:：#=是为]*(?:is\s+)?(?P<v>\d{3,4})(?!\d)"
)
_PASSPORT = re.compile(
    # after the word: "passport no. E12345678", "护照号码：G12345678", "Passport: 123456789"
    r"(?i:passport|护照|護照)(?:\s*(?i:no\.?|number|num\.?|#)|号码?|號碼?)?[\s:：#是为]*"
    r"(?P<v>(?=[A-Za-z]{0,3}\d)[A-Za-z0-9]{6,9})(?![A-Za-z0-9])"
    # Chinese passports on their own: E12345678, EA1234567, G12345678
    r"|(?<![A-Za-z0-9])(?P<w>[EG]\d{8}|E[A-HJ-NP-Z]\d{7})(?![A-Za-z0-9])"
)
_IM = re.compile(
    # QQ numbers after "QQ" (5-11 digits); "QQ群 12345" (a group) is not a person's number
    r"(?<![A-Za-z])(?i:QQ)(?:号码?|號碼?|\s*(?i:no\.?|number|#))?[\s:：是为]*(?P<qq>[1-9]\d{4,10})(?!\d)"
    # WeChat's internal IDs (wxid_...) anywhere; user-chosen WeChat IDs (6-20 letters, digits, '_' or '-', starting
    # with a letter) after the word
    r"|(?<![A-Za-z0-9])(?P<wxid>wxid_[A-Za-z0-9]{6,24})(?![A-Za-z0-9])"
    r"|(?P<kw>微信号|微信號|(?i:wechat\s*id|weixin\s*id|微信id)|微信|(?<![A-Za-z])(?i:wechat|weixin|vx|wx))"
    r"(?P<sep>[\s:：是为]*)(?P<wx>[A-Za-z][-_A-Za-z0-9]{5,19})(?![-_A-Za-z0-9])"
)
# Chinese addresses, down to a house or room number: a place name alone ("南京路", "朝阳区") is not personal, the
# number is. Place-name characters exclude the words that lead into an address ("我住在", "地址是"), so the
# placeholder does not swallow them.
_CJK = r"(?:(?![在住是到的去址我你他她了和从往来寄送发至于为及与])[\u4e00-\u9fff])"
_CN_ADDRESS = (
    rf"(?:{_CJK}{{2,7}}(?:省|自治区|特别行政区))?(?:{_CJK}{{2,7}}(?:市|州|盟))?(?:{_CJK}{{1,7}}(?:区|县|旗|镇|乡|街道))?"
    rf"(?:{_CJK}{{1,10}}(?:大道|大街|路|街|道|巷|胡同|弄|里)\d{{1,5}}(?:-\d{{1,5}})?(?:号|號|弄)"
    rf"|{_CJK}{{2,10}}(?:小区|花园|公寓|大厦|苑|村|广场|新村)\d{{1,4}}(?:号楼|栋|幢|座|號樓))"
    r"(?:[A-Za-z]?\d{1,5}(?:号楼|號樓|栋|幢|座|单元|單元|楼|樓|层|層|室|号|號)|[A-Za-z]座)*"
)
# English street addresses: a house number, one to four capitalised words and a street type, then optionally a
# flat/suite number and ", City, ST 12345" / a UK postcode.
_STREET_TYPES = (
    r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Close|Crescent|"
    r"Square|Sq|Highway|Hwy|Parkway|Pkwy|Row|Mews|Gardens|Walk|Hill"
)
_EN_ADDRESS = (
    r"(?<![\w-])\d{1,5}[A-Za-z]?,?\s+(?:[A-Z][A-Za-z'-]*\.?\s+){1,4}"
    rf"(?i:{_STREET_TYPES})\b\.?"
    r"(?:,?\s*(?i:apt|apartment|suite|ste|unit|flat|#)\.?\s*#?[A-Za-z0-9-]{1,6})?"
    r"(?:,\s*[A-Z][A-Za-z]+(?:\s[A-Z][A-Za-z]+){0,2})?"
    r"(?:,?\s*[A-Z]{2}\s+\d{5}(?:-\d{4})?|,?\s*[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2})?(?![\w])"
)
_ADDRESS = re.compile(f"{_CN_ADDRESS}|{_EN_ADDRESS}")
# Phones with a written shape of their own; every other number goes through libphonenumber (see _phone).
_PHONE = re.compile(
    "|".join(
        [
            # Chinese mobile, optionally +86 / 0086 / (+86), optionally grouped 3-4-4
            r"(?<![\d+])(?:\(?(?:\+|00)86\)?[\s-]?)?1[3-9]\d(?:[\s-]?\d{4}){2}(?!\d)",
            # Chinese landline: area code 0xx(x), optional brackets/separator, 7-8 digits, optional extension
            r"(?<!\d)(?:\(0[1-9]\d{1,2}\)|0[1-9]\d{1,2})[\s-]?\d{7,8}(?:-\d{1,4})?(?!\d)",
            # North American: (555) 123-4567, 555-123-4567, 555.123.4567, optionally +1 (written without +1 they
            # need region US to be found by libphonenumber, and the 555 numbers of examples are not valid there);
            # area codes start with 2-9
            r"(?<![\d+])(?:\+?1[\s.-]?)?(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[\s.-])\d{3}[\s.-]\d{4}(?!\d)",
        ]
    )
)
# IBAN lengths by country (the SWIFT IBAN registry): a candidate must have its country's length and pass mod 97.
IBAN_LENGTHS: dict[str, int] = dict(
    (c[:2], int(c[2:]))
    for c in (
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 EE20 "
        "EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 "
        "KZ20 LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 "
        "PL28 PS29 QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 VA22 "
        "VG24 XK20 YE30"
    ).split()
)
# where an IBAN may start: zero-width, so that one too long a run (an IBAN followed by more letters) does not hide
# the next start; the check in _iban decides how much of the run is the IBAN
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])(?=(?P<run>[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){10,32}))")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum bank cards carry (ISO/IEC 7812)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: the country's length, and the number read with letters as 10..35, rotated by 4, is 1 mod 97."""
    s = re.sub(r"[ -]", "", iban).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", s) or IBAN_LENGTHS.get(s[:2]) != len(s):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def id_checksum_ok(number: str) -> bool:
    """GB 11643 check character of an 18-digit ID number (informational: redaction does not require it)."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    if len(number) != 18:
        return False
    total = sum(int(c) * w for c, w in zip(number[:17], weights))
    return "10X98765432"[total % 11] == number[17].upper()


@functools.lru_cache(maxsize=1)
def _suffix_list():
    """The Public Suffix List bundled with `publicsuffixlist` (ICANN section: the real top-level domains). It is read
    from the package's own file: the package downloads only when its separate update script is run."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList(only_icann=True, accept_unknown=False)


def is_domain(host: str) -> bool:
    """Whether a dotted name ends in a registrable domain under a top-level domain of the Public Suffix List."""
    return _suffix_list().privatesuffix(host.lower()) is not None


def region_ok(region: str) -> str:
    """A region code libphonenumber knows (GB, FR, US, CN...), upper-cased; ValueError naming a few otherwise."""
    import phonenumbers

    code = (region or "").strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(
            f"unknown phone region {region!r}: expected a two-letter region code such as CN, US, GB, FR, DE, JP"
        )
    return code


class Redactor:
    """Replace PII with placeholders and count what was replaced (`counts`, by kind).

    `region`: the region (CN, GB, US...) whose phone numbers may be written without a country code.

    An 18-digit number shaped like an ID (region, a real birth date) is redacted whatever its check character: a
    wrong one is more often a typo than a different kind of number, and leaking a real ID costs more than hiding a
    stray number.
    """

    def __init__(self, kinds: Iterable[str] = KINDS, region: str = DEFAULT_REGION) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.kinds = [k for k in KINDS if k in set(kinds)]
        self.region = region_ok(region)
        self.counts: Counter[str] = Counter()

    def redact(self, text: str) -> str:
        text = text.translate(_FULLWIDTH)
        # Cheap tests first: most chat messages hold no digit, '@' or '.', and then most rules cannot match.
        digits = _ANY_DIGIT.search(text) is not None
        for kind in self.kinds:
            if kind in _NEEDS_DIGIT and not digits:
                continue
            if kind == "URL" and "." not in text:
                continue
            text = getattr(self, f"_{kind.lower()}")(text)
        return text

    def _sub(self, kind: str, pattern: re.Pattern, text: str, accept: Callable[[re.Match], bool] | None = None) -> str:
        """Replace each match (or, where the pattern names a group "v", only that group) that `accept` takes."""

        def repl(m: re.Match) -> str:
            if accept is not None and not accept(m):
                return m.group(0)
            self.counts[kind] += 1
            if "v" in m.re.groupindex and m.group("v") is not None:  # the value after a keyword: keep the keyword
                start, end = m.span("v")
                return text[m.start() : start] + PLACEHOLDERS[kind] + text[end : m.end()]
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

        def bare(m: re.Match) -> str:
            host, tld, path = m.group("host"), m.group("tld"), m.group("path")
            # a sentence run together ("Hello.How are you") is not a domain: top-level domains are written in one
            # case; file names ("main.py") are not domains unless they carry a path
            if not (tld.islower() or tld.isupper()) or not is_domain(host):
                return m.group(0)
            if not path and tld.lower() in _FILE_EXTENSIONS and host.count(".") == 1:
                return m.group(0)
            return repl(m)

        text = _URL.sub(repl, text)
        return _BARE_DOMAIN.sub(bare, text)

    def _iban(self, text: str) -> str:
        out, pos = [], 0
        for m in _IBAN_START.finditer(text):
            if m.start() < pos:  # inside an IBAN already replaced
                continue
            run = m.group("run")
            n = IBAN_LENGTHS.get(run[:2].upper())
            if n is None:
                continue
            # the first n letters and digits of the run, with the separators between them
            k = seen = 0
            while seen < n and k < len(run):
                seen += run[k] not in " -"
                k += 1
            if seen < n or not iban_ok(run[:k]):
                continue
            out += [text[pos : m.start()], PLACEHOLDERS["IBAN"]]
            pos = m.start() + k
            self.counts["IBAN"] += 1
        return "".join(out) + text[pos:] if out else text

    def _id(self, text: str) -> str:
        return self._sub("ID", _ID_AFTER_WORD, self._sub("ID", _ID, text))

    def _card(self, text: str) -> str:
        return self._sub("CARD", _CARD, text, accept=lambda m: luhn_ok(re.sub(r"\D", "", m.group(0))))

    def _cvv(self, text: str) -> str:
        return self._sub("CVV", _CVV, text)

    def _passport(self, text: str) -> str:
        def repl(m: re.Match) -> str:
            self.counts["PASSPORT"] += 1
            g = "v" if m.group("v") is not None else "w"
            return text[m.start() : m.start(g)] + PLACEHOLDERS["PASSPORT"] + text[m.end(g) : m.end()]

        return _PASSPORT.sub(repl, text)

    def _im(self, text: str) -> str:
        def repl(m: re.Match) -> str:
            g = next(g for g in ("qq", "wx", "wxid") if m.group(g) is not None)
            if g == "wx":
                # a bare English word after "wechat" ("wechat tomorrow") is not an ID: without a ':' or "ID" the
                # ID must hold a digit, '_' or '-'
                explicit = m.group("sep").strip() or m.group("kw").lower().endswith(("id", "号", "號"))
                if not explicit and not re.search(r"[\d_-]", m.group("wx")):
                    return m.group(0)
            self.counts["IM"] += 1
            return text[m.start() : m.start(g)] + PLACEHOLDERS["IM"] + text[m.end(g) : m.end()]

        return _IM.sub(repl, text)

    def _address(self, text: str) -> str:
        return self._sub("ADDRESS", _ADDRESS, text)

    def _phone(self, text: str) -> str:
        text = self._sub("PHONE", _PHONE, text)
        if sum(c.isdigit() for c in text) < 5:  # no phone number of any region is shorter
            return text
        import phonenumbers

        # VALID leniency: only numbers in a range libphonenumber knows for their country (with their country code, or
        # local numbers of self.region); digit runs of a phone's length are not enough (dates, sums, order numbers)
        spans = [
            (m.start, m.end)
            for m in phonenumbers.PhoneNumberMatcher(text, self.region, leniency=phonenumbers.Leniency.VALID)
        ]
        for start, end in reversed(spans):
            text = text[:start] + PLACEHOLDERS["PHONE"] + text[end:]
            self.counts["PHONE"] += 1
        return text


def redact(text: str, region: str = DEFAULT_REGION) -> tuple[str, Counter[str]]:
    """Redact one text; return it with the counts by kind."""
    r = Redactor(region=region)
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
