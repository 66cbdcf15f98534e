"""PII redaction and pseudonyms (owngpt.data.privacy), and the property that no planted phone number, e-mail, IBAN,
ID, passport, WeChat/QQ ID or address reaches any file of a data dir made by `owngpt prepare --from ...`."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from owngpt.data.privacy import Pseudonymizer, Redactor, iban_ok, id_checksum_ok, luhn_ok, redact


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
        # IBANs (mod-97 and the country's length), spaced, compact, lower case; the rest of the sentence stays
        ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN <IBAN> please"),
        ("汇到GB82WEST12345698765432，或 FR14 2004 1010 0505 0001 3M02 606.", "汇到<IBAN>，或 <IBAN>."),
        ("iban: nl91abna0417164300", "iban: <IBAN>"),
        # national IDs: US SSN (shape, or 9 digits after "SSN"), UK NI, Hong Kong, Taiwan, Korea
        ("SSN 123-45-6789, ssn: 123456789", "SSN <ID>, ssn: <ID>"),
        (
            "NI AB 12 34 56 C; 香港身份证 A123456(7)；台湾 A123456789；KR 900101-1234567",
            "NI <ID>; 香港身份证 <ID>；台湾 <ID>；KR <ID>",
        ),
        # passports: after the word, and Chinese passport numbers on their own
        (
            "passport no. E12345678; 护照号码：G12345678; Passport: 123456789",
            "passport no. <PASSPORT>; 护照号码：<PASSPORT>; Passport: <PASSPORT>",
        ),
        ("我的护照EA1234567过期了", "我的护照<PASSPORT>过期了"),
        # CVV after a card word (the card itself first)
        (
            "card 4111 1111 1111 1111 cvv 123, CVC: 4567, 安全码是321",
            "card <CARD> cvv <CVV>, CVC: <CVV>, 安全码是<CVV>",
        ),
        # WeChat IDs and QQ numbers after the word; wxid_ anywhere
        (
            "加我微信 zhang_san88，微信号：abcdefg，wechat: hello_world",
            "加我微信 <IM_ID>，微信号：<IM_ID>，wechat: <IM_ID>",
        ),
        ("id wxid_abc123def456, QQ 123456789，QQ号：10001", "id <IM_ID>, QQ <IM_ID>，QQ号：<IM_ID>"),
        # postal addresses: Chinese down to the house/room number, English street addresses
        ("我住在北京市朝阳区建国路88号3号楼2单元501室，你来吧", "我住在<ADDRESS>，你来吧"),
        ("寄到上海市浦东新区世纪大道100号。阳光小区3栋2单元501室", "寄到<ADDRESS>。<ADDRESS>"),
        ("I live at 221B Baker Street, London NW1 6XE now", "I live at <ADDRESS> now"),
        ("1600 Amphitheatre Parkway, Mountain View, CA 94043 / 123 Main St, Apt 4B.", "<ADDRESS> / <ADDRESS>."),
        # bare domains of any top-level domain of the Public Suffix List
        ("see bbc.co.uk, spiegel.de, yandex.ru/news, 例子 a.jp", "see <URL>, <URL>, <URL>, 例子 <URL>"),
    ],
)
def test_each_kind_is_redacted(text, expected):
    assert Redactor().redact(text) == expected


# Phone numbers of ten countries, in their local form (found with --region) and their international forms (found with
# any region), with Chinese and English text around them. The numbers are each country's example numbers from
# libphonenumber's own metadata or in its valid ranges.
PHONES = [
    ("GB", "020 7946 0958", "+44 20 7946 0958"),
    ("GB", "07400 123456", "+44 7400 123456"),
    ("FR", "06 12 34 56 78", "+33 6 12 34 56 78"),
    ("DE", "030 12345678", "+49 30 12345678"),
    ("JP", "090-1234-5678", "+81 90-1234-5678"),
    ("KR", "010-1234-5678", "+82 10-1234-5678"),
    ("AU", "0412 345 678", "+61 412 345 678"),
    ("IN", "98765 43210", "+91 98765 43210"),
    ("BR", "(11) 91234-5678", "+55 11 91234-5678"),
    ("RU", "8 (495) 123-45-67", "+7 495 123-45-67"),
    ("US", "(212) 555-0123", "+1 212-555-0123"),
    ("TW", "0912 345 678", "+886 912 345 678"),
]


@pytest.mark.parametrize("region, local, international", PHONES)
@pytest.mark.parametrize("before, after", [("我的电话是", "，有事打给我。"), ("call me on ", " tonight, ok?")])
def test_phones_of_many_countries_local_and_international(region, local, international, before, after):
    compact = "+" + "".join(c for c in international if c.isdigit())
    zero_zero = "00" + compact[1:]
    for number, redactor in [
        (local, Redactor(region=region)),
        (international, Redactor()),  # the default region (CN): a country code is enough
        (compact, Redactor()),
        (zero_zero, Redactor()),  # 00: the international prefix dialled from China (and most of Europe)
    ]:
        text = f"{before}{number}{after}"
        assert redactor.redact(text) == f"{before}<PHONE>{after}", (region, number)
        assert redactor.counts == {"PHONE": 1}


def test_local_numbers_need_their_region_and_non_numbers_stay():
    # a French local number is not a Chinese one: without --region FR it stays (documented in docs/personal.md)
    assert Redactor(region="CN").redact("appelle 06 12 34 56 78") == "appelle 06 12 34 56 78"
    # digit runs of a phone's length that are no number of any known range, with or without '+': not phones
    for text in ["+1 000 000 0000 units", "+44 0000 000000", "ref 0000000", "id 10000000"]:
        r = Redactor(region="GB")
        assert r.redact(text) == text and not r.counts, text
    with pytest.raises(ValueError, match="region"):
        Redactor(region="XX")


@pytest.mark.parametrize(
    "text",
    [
        "2024-03-12 21:15:00 and 12/03/2024, 9:15 PM",
        "version 1.2.3, python3.11, pi 3.14159, file.txt",
        "price 1000000 yuan in 2024, room 1203, QQ群 12345",
        "score 13:45, 100%, 1,234,567 visitors",
        # no kind: an IBAN with a wrong check, 3 digits without a card word, a street name without a number, a
        # sentence run together, file names that end like country domains, "wechat" followed by a word
        "DE89 3704 0044 0532 0130 01, code 123, 南京路很热闹, Hello.How are you, main.py, README.md",
        "wechat tomorrow, I have 3 dogs and 2 cats, passport office",
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
    assert iban_ok("DE89 3704 0044 0532 0130 00") and iban_ok("GB82WEST12345698765432")
    assert not iban_ok("DE89 3704 0044 0532 0130 01") and not iban_ok("DE89 3704 0044 0532 0130 0")  # check, length
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
    # other countries: a valid number of that country (its example number with new last digits), international form
    import phonenumbers

    region = draw(st.sampled_from(["US", "GB", "FR", "DE", "JP", "KR", "AU", "IN", "BR", "HK", "TW", "SG"]))
    kind = draw(st.sampled_from([phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]))
    example = phonenumbers.example_number_for_type(region, kind)
    national = str(example.national_number)
    number = phonenumbers.parse(f"+{example.country_code}{national[:-4]}{d(4)}")
    assume(phonenumbers.is_valid_number(number))
    fmt = draw(st.sampled_from([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164]))
    return phonenumbers.format_number(number, fmt)


@st.composite
def other_pii(draw) -> str:
    """IBANs, SSNs, passports, WeChat/QQ IDs, addresses: the new kinds, as they are written after their words."""
    d = lambda n: "".join(draw(st.lists(_digits, min_size=n, max_size=n)))  # noqa: E731
    kind = draw(st.sampled_from(["iban", "ssn", "passport", "wechat", "qq", "address-cn", "address-en"]))
    if kind == "iban":  # a German IBAN: bank code and account digits, check digits computed
        bban = d(18)
        check = 98 - int(bban + "131400") % 97  # D=13, E=14, then "00"
        return f"DE{check:02d}{bban}"
    if kind == "ssn":
        return f"{draw(st.integers(100, 665))}-{draw(st.integers(10, 99))}-{draw(st.integers(1000, 9999))}"
    if kind == "passport":
        return draw(st.sampled_from(["护照 ", "passport no. "])) + "E" + d(8)
    if kind == "wechat":
        return draw(st.sampled_from(["微信号：", "wechat: "])) + "wx_" + d(8)
    if kind == "qq":
        return "QQ " + draw(st.sampled_from("123456789")) + d(8)
    if kind == "address-cn":
        return f"北京市海淀区中关村大街{d(3)}号{d(2)}号楼{d(4)}室"
    return f"{draw(st.integers(1, 9999))} Baker Street, Apt {d(2)}"


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
@given(
    planted=st.lists(st.one_of(phone_numbers(), emails, other_pii()), min_size=1, max_size=6), before=words, after=words
)
def test_no_planted_pii_survives_in_any_file(tmp_path_factory, planted, before, after):
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
            # the number without its separators must not be there either (the tokenizer's vocabulary included);
            # short runs (a house number) are in any file by chance
            if "@" not in value and len(digits) >= 8:
                assert digits.encode() not in content, f"{digits} survived into {f.relative_to(out)}"


def test_suffix_list_and_phone_data_are_read_offline(monkeypatch):
    # the Public Suffix List and libphonenumber's metadata ship inside their packages: no network at run time
    import socket

    from owngpt.data import privacy

    def no_network(*args, **kwargs):
        raise AssertionError("owngpt.data.privacy tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    privacy._suffix_list.cache_clear()
    assert Redactor(region="JP").redact("見て example.jp と 090-1234-5678") == "見て <URL> と <PHONE>"
