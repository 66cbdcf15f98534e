"""Property: every phone number the redactor documents is redacted wherever it sits in English or Chinese text.

Fast (the Redactor alone, no `prepare`), so it draws many examples: a weakened rule, such as a mobile prefix
dropped from `1[3-9]`, is found on every run (see docs/testing.md for how that was checked). The slower end-to-end
property in test_privacy.py checks that nothing planted survives into any file of a data dir.
"""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from owngpt.data.privacy import Redactor, redact

_digit = st.sampled_from(string.digits)


def _digits(draw, n: int) -> str:
    return "".join(draw(st.lists(_digit, min_size=n, max_size=n)))


@st.composite
def phone_numbers(draw) -> str:
    """The formats privacy.py documents: Chinese mobiles (13x-19x, +86/0086/(+86), grouped 3-4-4), landlines
    (0xx(x) then 7-8 digits), international numbers of ten countries (through libphonenumber), North American numbers."""
    kind = draw(st.sampled_from(["mobile", "mobile+86", "mobile-grouped", "landline", "intl", "na"]))
    if kind.startswith("mobile"):
        number = "1" + draw(st.sampled_from("3456789")) + _digits(draw, 9)
        if kind == "mobile+86":
            return draw(st.sampled_from(["+86", "+86 ", "+86-", "0086 ", "(+86) ", "(+86)"])) + number
        if kind == "mobile-grouped":
            sep = draw(st.sampled_from([" ", "-"]))
            return f"{number[:3]}{sep}{number[3:7]}{sep}{number[7:]}"
        return number
    if kind == "landline":
        area = "0" + draw(st.sampled_from("123456789")) + _digits(draw, draw(st.integers(1, 2)))
        if draw(st.booleans()):
            area = f"({area})"
        local = draw(st.sampled_from("2345678")) + _digits(draw, draw(st.integers(6, 7)))
        return area + draw(st.sampled_from(["-", " ", ""])) + local
    if kind == "na":
        # North American area codes start with 2-9 (NANP): "(012) 345-6789" is no phone number
        a, b, c = draw(st.sampled_from("23456789")) + _digits(draw, 2), _digits(draw, 3), _digits(draw, 4)
        return draw(st.sampled_from([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}"]))
    # international numbers are found by libphonenumber, which checks them against each country's numbering plan:
    # draw a real example number of a country and a line type, written in its international form
    import phonenumbers

    region = draw(st.sampled_from(["US", "GB", "FR", "DE", "JP", "HK", "TW", "AU", "IN", "BR"]))
    kind = draw(st.sampled_from([phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]))
    example = phonenumbers.example_number_for_type(region, kind)
    text = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    return text.replace(" ", draw(st.sampled_from([" ", "-"])))


_english = st.sampled_from(["hi", "call me at", "ok", "see you", "number:", "tel."])
_chinese = st.sampled_from(["我的电话", "好的", "明天见", "打给我", "联系方式：", "吧", "，"])


@st.composite
def surroundings(draw) -> tuple[str, str]:
    """Filler before and after a value, without digits. Chinese is written without spaces, so a Chinese word may
    touch the number directly; an English word is separated by a space."""

    def side() -> str:
        words = draw(st.lists(st.one_of(_english, _chinese), max_size=3))
        return " ".join(words)

    before, after = side(), side()
    touch = lambda w: w and not w.isascii()  # noqa: E731
    b_sep = draw(st.sampled_from(["", " "])) if touch(before[-1:]) else " "
    a_sep = draw(st.sampled_from(["", " "])) if touch(after[:1]) else " "
    return before + b_sep, a_sep + after


@settings(max_examples=400)
@given(numbers=st.lists(phone_numbers(), min_size=1, max_size=3), around=surroundings())
def test_every_documented_phone_format_is_redacted_in_context(numbers, around):
    before, after = around
    text = before + " 和 ".join(numbers) + after
    out = redact(text)[0]
    assert not any(c.isdigit() for c in out), (text, out)
    # one placeholder per number (a Luhn-valid run of digits may be taken for a card: redacted all the same)
    assert len(re.findall(r"<(?:PHONE|CARD|ID)>", out)) == len(numbers), (text, out)


@pytest.mark.parametrize("prefix", [f"1{d}" for d in "3456789"])
def test_every_mobile_prefix_is_redacted(prefix):
    r = Redactor()
    assert r.redact(f"电话{prefix}123456789，谢谢") == "电话<PHONE>，谢谢"
    assert r.redact(f"+86 {prefix}1 2345 6789") == "<PHONE>"
    assert r.counts["PHONE"] == 2


def test_an_international_number_right_after_chinese_text_is_redacted():
    # found by the property above: `(?<![\w+])` treated a Chinese character as a word character, so
    # "电话+44 20 7946 0958" kept the whole number
    assert redact("电话+44 20 7946 0958")[0] == "电话<PHONE>"
    assert redact("联系：+852 2345 6789吧")[0] == "联系：<PHONE>吧"
