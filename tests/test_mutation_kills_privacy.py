"""data/privacy's contract, written against the classes of mutants that survived in data/privacy (#25): the counts
the report shows for every kind of redaction, and where a pseudonymized CJK name ends. Oracles: the placeholders in
the redacted text, counted by str.count."""

from __future__ import annotations

from owngpt.data.privacy import PLACEHOLDERS, Pseudonymizer, redact

# one or more of every kind (the examples of test_privacy.py), in one text
EVERY_KIND = "\n".join(
    [
        "我的电话是13987654321。call +44 20 7946 0958 or +1 (555) 123-4567",
        "把报告发到boss@example.net吧 a.b+tag@sub.example.co.uk",
        "看这个https://a.com/x?y=1吧 和 www.baidu.com。",
        "身份证 11010519491231002X 号, SSN 123-45-6789",
        "卡号 4111 1111 1111 1111，6222021234567890128",
        "IBAN DE89 3704 0044 0532 0130 00 please, GB82WEST12345698765432",
        "passport no. E12345678; 护照号码：G12345678; Passport: 123456789",
        "card 4111 1111 1111 1111 cvv 123, CVC: 4567",
        "加我微信 zhang_san88，QQ号：10001",
        "我住在北京市朝阳区建国路88号3号楼2单元501室，你来吧; I live at 221B Baker Street, London NW1 6XE now",
    ]
)


def test_the_counts_are_the_placeholders_written_for_every_kind():
    text, counts = redact(EVERY_KIND)
    for kind, placeholder in PLACEHOLDERS.items():
        assert counts[kind] == text.count(placeholder) >= 1, kind
    assert counts["PASSPORT"] == 3 and counts["CARD"] == 3 and counts["CVV"] == 2


def test_a_cjk_name_is_found_next_to_any_character_and_a_latin_one_only_as_a_word():
    # Chinese has no spaces: a CJK name matches anywhere, also right before Latin letters or digits; a name that
    # ends in an ASCII letter or digit matches only as a whole word ("Wei" is not inside "Weibo")
    p = Pseudonymizer()
    assert p.name("王伟") == "Person 1" and p.name("Wei") == "Person 2"
    assert p.apply("王伟abc说王伟2号到了") == "Person 1abc说Person 12号到了"
    assert p.apply("Wei uses Weibo, Wei2 and Wei.") == "Person 2 uses Weibo, Wei2 and Person 2."
    assert p.counts["NAME"] == 2 and p.counts["NAME_IN_TEXT"] == 4
