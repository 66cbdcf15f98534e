"""PII redaction and pseudonyms (owngpt.data.privacy), and the property that no planted phone number or e-mail
reaches any file of a data dir made by `owngpt prepare --from ...`."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from owngpt.data.privacy import Pseudonymizer, Redactor, id_checksum_ok, luhn_ok, redact


@pytest.mark.parametrize(
    "text, expected",
    [
        # phones: Chinese mobile (plain, +86, 0086, grouped, full-width digits), landlines, international, US
        ("我的电话是13987654321。", "我的电话是<PHONE>。"),
        ("+86 139 8765 4321 / +86-13987654321 / 0086 13987654321", "<PHONE> / <PHONE> / <PHONE>"),
        ("手机：１３９８７６５４３２１", "手机：<PHONE>"),
        ("座机 010-12345678，(021) 87654321，0755 2345678-12", "座机 <PHONE>，<PHONE>，<PHONE>"),
        ("call +44 20 7946 0958 or +1 (555) 123-4567", "call <PHONE> or <PHONE>"),
        ("US: (555) 123-4567, 555.123.4567", "US: <PHONE>, <PHONE>"),
        # e-mails and URLs
        ("把报告发到boss@example.net吧", "把报告发到<EMAIL>吧"),
        ("a.b+tag@sub.example.co.uk, x_y@mail.xn--fiqs8s!", "<EMAIL>, <EMAIL>!"),
        ("看这个https://a.com/x?y=1吧 和 www.baidu.com。", "看这个<URL>吧 和 <URL>。"),
        ("see https://example.org/page. or t.cn/A6xYz", "see <URL>. or <URL>"),
        # ID numbers (checksum valid, X, invalid checksum, old 15-digit) before phones
        ("身份证 11010519491231002X 号", "身份证 <ID> 号"),
        ("ID 310104198512124321", "ID <ID>"),
        ("旧证 110105491231002", "旧证 <ID>"),
        # cards: Luhn-valid with or without spaces; a Luhn-invalid run stays
        ("卡号 4111 1111 1111 1111，6222021234567890128", "卡号 <CARD>，<CARD>"),
        ("order 4111111111111112", "order 4111111111111112"),
    ],
)
def test_each_kind_is_redacted(text, expected):
    assert Redactor().redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2024-03-12 21:15:00 and 12/03/2024, 9:15 PM",
        "version 1.2.3, python3.11, pi 3.14159, file.txt",
        "price 1000000 yuan in 2024, room 1203, QQ群 12345",
        "score 13:45, 100%, 1,234,567 visitors",
    ],
)
def test_ordinary_numbers_and_words_stay(text):
    r = Redactor()
    assert r.redact(text) == text and not r.counts


def test_counts_by_kind_and_id_before_phone():
    text, counts = redact(
        "ID 11010519491231002X, tel 13912345678, mail a@b.cn, web https://x.io, card 4111111111111111"
    )
    assert text == "ID <ID>, tel <PHONE>, mail <EMAIL>, web <URL>, card <CARD>"
    assert counts == {"ID": 1, "PHONE": 1, "EMAIL": 1, "URL": 1, "CARD": 1}
    # IDs run first: these 17 digits pass the Luhn check, so the card rule alone would leave "<CARD>X"
    assert luhn_ok("11010519900101118") and redact("身份证11010519900101118X")[0] == "身份证<ID>"


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert id_checksum_ok("11010519491231002X") and not id_checksum_ok("310104198512124321")


def test_pseudonyms_are_stable_whole_names_and_keep_me():
    p = Pseudonymizer(keep=["Zhang San"])
    assert [p.name(n) for n in ("Ann", "王伟", "Ann", "Zhang San")] == ["Person 1", "Person 2", "Person 1", "Zhang San"]
    assert p.apply("Ann and Anna met 王伟们 and Zhang San") == "Person 1 and Anna met Person 2们 and Zhang San"
    assert p.counts["NAME"] == 2


# --- the property: nothing planted survives anywhere in the data dir ------------------------------------------------

_digits = st.text(string.digits, min_size=1, max_size=1)


@st.composite
def phone_numbers(draw) -> str:
    kind = draw(st.sampled_from(["cn", "cn+86", "cn-grouped", "landline", "intl"]))
    d = lambda n: "".join(draw(st.lists(_digits, min_size=n, max_size=n)))  # noqa: E731
    if kind.startswith("cn"):
        number = "1" + draw(st.sampled_from("3456789")) + d(9)
        if kind == "cn+86":
            return draw(st.sampled_from(["+86", "+86 ", "+86-", "0086 ", "(+86) "])) + number
        if kind == "cn-grouped":
            sep = draw(st.sampled_from([" ", "-"]))
            return f"{number[:3]}{sep}{number[3:7]}{sep}{number[7:]}"
        return number
    if kind == "landline":
        area = "0" + draw(st.sampled_from("123456789")) + d(draw(st.integers(1, 2)))
        return area + draw(st.sampled_from(["-", " ", ""])) + draw(st.sampled_from("2345678")) + d(6)
    cc = draw(st.sampled_from(["1", "33", "44", "49", "81", "852", "886"]))
    groups = [draw(st.integers(1, 3)), draw(st.integers(3, 4)), draw(st.integers(3, 4))]  # e.g. +44 20 7946 0958
    sep = draw(st.sampled_from([" ", "-"]))
    return "+" + cc + "".join(sep + d(n) for n in groups)


_local = st.text(string.ascii_letters + string.digits + "._+-", min_size=1, max_size=12).filter(
    lambda s: s[0] not in ".-+" and s[-1] != "." and ".." not in s
)
_label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10)
emails = st.builds(
    lambda a, b, c, tld: f"{a}@{b}.{c}.{tld}" if c else f"{a}@{b}.{tld}",
    _local,
    _label,
    st.one_of(st.just(""), _label),
    st.sampled_from(["com", "cn", "net", "org", "co.uk", "io", "de"]),
)
# filler without digits or '@', in English and Chinese, so that only the planted values can be PII
words = st.lists(
    st.sampled_from(["hi", "ok", "call me", "好的", "明天见", "我的电话", "邮箱是", "see", "吧", "，", "!"]),
    min_size=0,
    max_size=4,
).map(" ".join)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(planted=st.lists(st.one_of(phone_numbers(), emails), min_size=1, max_size=6), before=words, after=words)
def test_no_planted_phone_or_email_survives_in_any_file(tmp_path_factory, planted, before, after):
    from owngpt.data.prepare import PrepareConfig, prepare

    tmp: Path = tmp_path_factory.mktemp("pii")
    lines = []
    for i, value in enumerate(planted):
        sender = "Wang Wei" if i % 2 == 0 else "Zhang San"
        lines.append(f"12/03/2024, 21:{i:02d} - {sender}: {before} {value} {after}")
        lines.append(f"12/03/2024, 21:{i:02d} - {'Zhang San' if i % 2 == 0 else 'Wang Wei'}: 收到 {value}")
    lines.append("12/03/2024, 22:59 - Zhang San: 好")
    export = tmp / "chat.txt"
    export.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp / "data"
    prepare(
        PrepareConfig(
            sources=[str(export)],
            out=str(out),
            source_format="whatsapp",
            me="Zhang San",
            task="chat",
            tokenizer="bpe",
            vocab_size=300,
            val_fraction=0.0,
            quiet=True,
            progress=False,
        )
    )
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.parent.name == "tokenizer" for f in files)
    for f in files:
        content = f.read_bytes()
        for value in planted:
            assert value.encode() not in content, f"{value!r} survived into {f.relative_to(out)}"
            digits = "".join(c for c in value if c.isdigit())
            if "@" not in value:  # the number without its separators must not be there either
                assert digits.encode() not in content, f"{digits} survived into {f.relative_to(out)}"
