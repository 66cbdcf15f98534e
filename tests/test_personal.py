"""Chat exports -> conversations (owngpt.data.personal): each format's messy parts, roles, sessions, merges, drops,
privacy in the output and the report, and the errors for wrong inputs. Exports are hand-made in tests/data/exports."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from owngpt.cli import main
from owngpt.data.personal import parse_duration, read_exports
from owngpt.data.report import Report
from owngpt.errors import ConfigError, DataError

EXPORTS = Path(__file__).parent / "data" / "exports"


def cfg(source: str, me: str | None, **kw) -> SimpleNamespace:
    base = dict(
        source_format=source,
        me=me,
        session_gap="2h",
        pseudonymize=False,
        keep_pii=False,
        time_column=None,
        sender_column=None,
        content_column=None,
    )
    return SimpleNamespace(**{**base, **kw})


def run(name: str, source: str, me: str | None, **kw) -> tuple[list[list[dict]], Report]:
    report = Report()
    records = list(read_exports([EXPORTS / name], cfg(source, me, **kw), report))
    return [r.messages for r in records], report


def counts(report: Report) -> dict[str, int]:
    return {name: rule.count for name, rule in report.rules.items()}


def test_parse_duration():
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("1d") == timedelta(days=1)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("45") == timedelta(minutes=45)
    for bad in ("2 hours", "h", "-1h", "0m"):
        with pytest.raises(ConfigError, match="--session-gap"):
            parse_duration(bad)


def test_whatsapp_android_12h():
    convs, report = run("whatsapp_android_12h.txt", "whatsapp", "Bob Lee")
    # one conversation: 9:15-9:20 PM. The next morning Bob speaks first (leading --me turn dropped) and Alice's
    # three messages get no answer within 2 h (dropped); on 12/13 only Bob speaks.
    assert convs == [
        [
            {"role": "user", "content": "Hey! Are you coming on Friday?\nCall me: <PHONE>"},
            {
                "role": "assistant",
                "content": "Yes!\nBring the cake\nand the candles",
            },  # continuation lines, edit mark gone
            {"role": "user", "content": "great, see <URL>. Mail <EMAIL>"},
            {"role": "assistant", "content": "ok"},
        ]
    ]
    c = counts(report)
    assert c["chat.system_message"] == 1 and c["chat.media_placeholder"] == 1 and c["chat.recalled_message"] == 1
    assert c["chat.sessions"] == 3 and c["chat.leading_me_turn"] == 2 and c["chat.unanswered_turn"] == 1
    assert c["chat.conversation_without_me"] == 2 and c["chat.conversations"] == 1
    assert c["redacted.phone"] == 1 and c["redacted.email"] == 1 and c["redacted.url"] == 1
    assert report.rules["chat.system_message"].examples[0].startswith(f"{EXPORTS / 'whatsapp_android_12h.txt'}:1: ")


def test_whatsapp_ios_brackets_24h_and_session_gap():
    convs, report = run("whatsapp_ios.txt", "whatsapp", "张三")
    assert convs == [[{"role": "user", "content": "你好，我的身份证 <ID>"}, {"role": "assistant", "content": "在的"}]]
    c = counts(report)
    assert c["chat.media_placeholder"] == 1 and c["chat.sticker"] == 1
    assert c["redacted.id"] == 1 and c["redacted.card"] == 1  # the card was in an unanswered (dropped) turn
    assert "<CARD>" in report.rules["redacted.card"].examples[0]
    # with a gap longer than the night, the next morning's answer joins the first conversation
    convs, _ = run("whatsapp_ios.txt", "whatsapp", "张三", session_gap="1d")
    assert convs[0][-2:] == [
        {"role": "user", "content": "卡号 <CARD> 对吗\n第二行"},
        {"role": "assistant", "content": "对的"},
    ]


def test_whatsapp_group_keeps_who_said_what_and_pseudonyms():
    convs, report = run("group_whatsapp.txt", "whatsapp", "Zhang San")
    assert convs == [
        [
            {"role": "user", "content": "Wang Wei: 周六去香山吗？\nLi Na: 我去！\n几点？"},
            {"role": "assistant", "content": "八点西门见，Li Na 带水"},
            {"role": "user", "content": "Wang Wei: 好"},
            {"role": "assistant", "content": "👍"},
        ]
    ]
    assert counts(report)["chat.system_message"] == 2 and counts(report)["chat.group_chats"] == 1
    convs, report = run("group_whatsapp.txt", "whatsapp", "Zhang San", pseudonymize=True)
    assert convs[0][:2] == [
        {"role": "user", "content": "Person 1: 周六去香山吗？\nPerson 2: 我去！\n几点？"},
        {"role": "assistant", "content": "八点西门见，Person 2 带水"},  # names written in texts too
    ]
    assert counts(report)["pseudonymized.people"] == 2
    assert "Wang Wei" not in json.dumps(report.to_dict(), ensure_ascii=False)


def test_telegram_one_chat_parts_service_sticker_forwarded():
    convs, report = run("telegram_one.json", "telegram", "Zhang San")
    assert convs == [
        [
            {"role": "user", "content": "hi, new number <PHONE>"},
            {"role": "assistant", "content": "saved, thanks see <URL>"},  # text given as a list of parts
            {"role": "user", "content": "see you"},
            {"role": "assistant", "content": "bye"},
        ]
    ]
    c = counts(report)
    assert (c["chat.system_message"], c["chat.media_placeholder"], c["chat.sticker"], c["chat.forwarded_message"]) == (
        1,
        1,
        1,
        1,
    )


def test_telegram_all_chats_and_me_by_id():
    convs, report = run("telegram_all.json", "telegram", "user222")  # --me may be the from_id
    assert [c[0]["content"] for c in convs] == ["hi, new number <PHONE>", "早"]
    assert counts(report)["chat.conversation_without_me"] == 1  # the channel


def test_wechat_memotrace_csv_is_sender_and_types():
    convs, report = run("wechat_memotrace.csv", "wechat", None)  # IsSender says who is who: --me not needed
    assert convs == [
        [
            {"role": "user", "content": "在吗？我邮箱 <EMAIL>"},
            {"role": "assistant", "content": "在"},
            {"role": "user", "content": "明天见"},
            {"role": "assistant", "content": "好\n早点睡"},
        ]
    ]
    c = counts(report)
    assert (c["chat.system_message"], c["chat.media_placeholder"], c["chat.sticker"], c["chat.recalled_message"]) == (
        1,
        1,
        1,
        1,
    )
    assert c["chat.merged_message"] == 1


def test_wechat_chinese_column_names():
    convs, report = run("wechat_chinese_columns.csv", "wechat", "我")
    assert convs == [
        [
            {"role": "user", "content": "周末有空吗"},
            {"role": "assistant", "content": "有空"},
            {"role": "user", "content": "那去爬山"},
            {"role": "assistant", "content": "好啊"},
        ]
    ]
    assert counts(report)["chat.media_placeholder"] == 1


def test_generic_csv_with_named_columns_and_jsonl():
    convs, _ = run("generic.csv", "csv", "Me Myself", time_column="when", sender_column="who", content_column="said")
    assert convs == [
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi Ann"},
            {"role": "user", "content": "how are you, my email is <EMAIL>"},
            {"role": "assistant", "content": "fine,\nthanks"},
        ],
        [{"role": "user", "content": "later"}, {"role": "assistant", "content": "yes"}],  # 3 h later: new session
    ]
    with pytest.raises(DataError, match="cannot tell which column.*columns found: when, who, said"):
        run("generic.csv", "csv", "Me Myself")
    convs, report = run("generic.jsonl", "csv", "me")  # unix timestamps, common column names
    assert convs == [[{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]]
    assert counts(report)["chat.empty_message"] == 1


def test_keep_pii_keeps_it_and_warns(capsys):
    convs, report = run("whatsapp_android_12h.txt", "whatsapp", "Bob Lee", keep_pii=True)
    assert "+1 (555) 123-4567" in convs[0][0]["content"]
    assert "WARNING: --keep-pii" in capsys.readouterr().err
    assert not [n for n in report.rules if n.startswith("redacted.")]


# --- errors -------------------------------------------------------------------------------------------------------


def test_me_who_never_speaks_lists_the_senders():
    with pytest.raises(DataError) as e:
        run("whatsapp_ios.txt", "whatsapp", "Nobody")
    assert "--me 'Nobody' never speaks" in str(e.value) and "王伟 (2 messages)" in str(e.value)
    assert "张三 (2 messages)" in str(e.value)
    with pytest.raises(ConfigError, match="--me is required.*Senders present: Alice Smith"):
        run("whatsapp_android_12h.txt", "whatsapp", None)


@pytest.mark.parametrize(
    "name, source, expected",
    [
        ("telegram_one.json", "whatsapp", "looks like a Telegram Desktop JSON export"),
        ("whatsapp_ios.txt", "telegram", "looks like a WhatsApp text export"),
        ("wechat_memotrace.csv", "telegram", "looks like a WeChat CSV export"),
        ("generic.csv", "whatsapp", "no WhatsApp message line"),
        ("telegram_one.json", "wechat", "looks like a Telegram Desktop JSON export"),
    ],
)
def test_export_of_another_kind_is_named(name, source, expected):
    with pytest.raises(DataError, match=expected) as e:
        run(name, source, "Zhang San")
    assert name in str(e.value)


def test_truncated_json_names_file_and_position(tmp_path):
    text = (EXPORTS / "telegram_one.json").read_text(encoding="utf-8")
    cut = tmp_path / "result.json"
    cut.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_exports([cut], cfg("telegram", "Zhang San")))
    msg = str(e.value)
    assert msg.startswith(f"{cut}:") and "truncated" in msg
    assert f"of {len(text[: len(text) // 2].encode())})" in msg


def test_json_that_is_not_telegram(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{"foo": 1, "bar": []}', encoding="utf-8")
    with pytest.raises(DataError, match="not a Telegram Desktop export.*found foo, bar"):
        list(read_exports([f], cfg("telegram", "Zhang San")))


# --- the smoke script's exact inputs through `owngpt prepare` -----------------------------------------------------

WA = """12/03/2024, 21:15 - Wang Wei: 你好！在吗？我的电话是 13987654321
12/03/2024, 21:16 - Zhang San: 在的，怎么了
12/03/2024, 21:16 - Zhang San: 刚下班
12/03/2024, 21:17 - Wang Wei: 把报告发到 boss@example.net 吧
12/03/2024, 21:18 - Zhang San: 好的，马上发
我的身份证号是 310104198512124321
12/03/2024, 21:19 - Wang Wei: <Media omitted>
13/03/2024, 09:02 - Wang Wei: 早上好
13/03/2024, 09:05 - Zhang San: 早！今天开会吗
"""
TG = """{"name": "Wang Wei", "type": "personal_chat", "id": 1, "messages": [
 {"id": 1, "type": "message", "date": "2024-03-12T21:15:00", "from": "Wang Wei", "text": "call me at +44 20 7946 0958"},
 {"id": 2, "type": "message", "date": "2024-03-12T21:16:00", "from": "Zhang San", "text": [{"type": "plain", "text": "sure, mail "}, {"type": "email", "text": "hm@example.com"}]},
 {"id": 3, "type": "service", "date": "2024-03-12T21:17:00", "actor": "Wang Wei", "action": "pin_message"},
 {"id": 4, "type": "message", "date": "2024-03-12T21:18:00", "from": "Wang Wei", "text": "thanks!"},
 {"id": 5, "type": "message", "date": "2024-03-12T21:19:00", "from": "Zhang San", "text": "any time"}]}
"""  # noqa: E501


def test_smoke_inputs_through_prepare(tmp_path, capsys):
    (tmp_path / "wa.txt").write_text(WA, encoding="utf-8")
    (tmp_path / "result.json").write_text(TG, encoding="utf-8")
    common = ["--me", "Zhang San", "--task", "chat", "--tokenizer", "char", "--quiet"]
    assert (
        main(["prepare", str(tmp_path / "wa.txt"), "--from", "whatsapp", "--out", str(tmp_path / "wa"), *common]) == 0
    )
    assert (
        main(["prepare", str(tmp_path / "result.json"), "--from", "telegram", "--out", str(tmp_path / "tg"), *common])
        == 0
    )
    for pii in ("13987654321", "boss@example.net", "310104198512124321", "20 7946 0958", "hm@example.com"):
        for f in [*(tmp_path / "wa").rglob("*"), *(tmp_path / "tg").rglob("*")]:
            assert not f.is_file() or pii.encode() not in f.read_bytes(), (pii, f)
    convs = [
        json.loads(line)["messages"]
        for s in ("train", "val")
        for line in (tmp_path / "wa" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert sorted(c[0]["content"] for c in convs) == ["你好！在吗？我的电话是 <PHONE>", "早上好"]
    report = json.loads((tmp_path / "wa" / "report.json").read_text(encoding="utf-8"))
    assert report["rules"]["redacted.id"]["count"] == 1 and report["rules"]["chat.media_placeholder"]["count"] == 1
    capsys.readouterr()
    assert (
        main(
            [
                "prepare",
                str(tmp_path / "wa.txt"),
                "--from",
                "whatsapp",
                "--me",
                "Nobody",
                "--task",
                "chat",
                "--out",
                str(tmp_path / "none"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Zhang San" in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()


def test_report_and_records_hold_no_names_or_numbers_with_pseudonymize(tmp_path):
    export = tmp_path / "chat.txt"
    export.write_text(
        "01/02/2024, 10:00 - Wang Wei: Li Na 的电话是 13812345678\n"
        "01/02/2024, 10:01 - Li Na: 对\n"
        "01/02/2024, 10:01 - \u202a+86 139 1234 5678\u202c: 我是 Li Na 的同事\n"  # an unsaved contact: shown as its number
        "01/02/2024, 10:02 - Zhang San: 好的\n",
        encoding="utf-8",
    )
    report = Report()
    records = list(read_exports([export], cfg("whatsapp", "Zhang San", pseudonymize=True), report))
    everything = json.dumps([r.messages for r in records], ensure_ascii=False) + json.dumps(
        report.to_dict(), ensure_ascii=False
    )
    for secret in ("Wang Wei", "Li Na", "13812345678", "139 1234 5678"):
        assert secret not in everything
    assert records[0].messages[0]["content"] == (
        "Person 1: Person 2 的电话是 <PHONE>\nPerson 2: 对\nPerson 3: 我是 Person 2 的同事"
    )
    assert report.rules["redacted.sender_names"].count == 1 and report.rules["redacted.phone"].count == 1


def test_sender_shown_as_a_phone_number_gets_a_pseudonym_without_the_flag(tmp_path):
    export = tmp_path / "chat.txt"
    export.write_text(
        "01/02/2024, 10:00 - +44 20 7946 0958: hello\n01/02/2024, 10:01 - Wang Wei: hi\n"
        "01/02/2024, 10:02 - Zhang San: hi both\n",
        encoding="utf-8",
    )
    records = list(read_exports([export], cfg("whatsapp", "Zhang San")))
    assert records[0].messages[0]["content"] == "Person 1: hello\nWang Wei: hi"


def test_a_file_named_after_a_phone_number_is_not_copied_into_the_report(tmp_path):
    export = tmp_path / "WhatsApp Chat with +86 139 1234 5678.txt"
    export.write_text(
        "01/02/2024, 10:00 - Wang Wei: <Media omitted>\n01/02/2024, 10:01 - Wang Wei: hi\n"
        "01/02/2024, 10:02 - Zhang San: hi\n",
        encoding="utf-8",
    )
    report = Report()
    records = list(read_exports([export], cfg("whatsapp", "Zhang San"), report))
    assert "139 1234 5678" not in json.dumps(report.to_dict()) and "139 1234 5678" not in records[0].file
    assert (
        report.rules["chat.media_placeholder"].examples[0].endswith("WhatsApp Chat with <PHONE>.txt:1: <Media omitted>")
    )
    from owngpt.data.prepare import PrepareConfig, prepare

    out = tmp_path / "data"
    prepare(
        PrepareConfig(
            sources=[str(export)],
            out=str(out),
            source_format="whatsapp",
            me="Zhang San",
            tokenizer="char",
            quiet=True,
            progress=False,
        )
    )
    for f in out.rglob("*"):
        assert not f.is_file() or b"139 1234 5678" not in f.read_bytes(), f


@pytest.mark.parametrize(
    "line, expected",
    [
        ("[12/3/24, 9:15:00\u202fPM] Ann: hi", "2024-12-03 21:15:00"),  # iOS US: narrow no-break space before PM
        ("13/03/2024, 09:02 - Ann: hi", "2024-03-13 09:02:00"),  # day first, 24-hour
        ("3/13/24, 9:02 AM - Ann: hi", "2024-03-13 09:02:00"),  # month first, 12-hour
        ("2024/3/12 下午9:17 - Ann: hi", "2024-03-12 21:17:00"),  # Chinese locale
        ("12.03.24, 21:18 - Ann: hi", "2024-03-12 21:18:00"),  # German style
        ("[2024-03-12 12:05:09 AM] Ann: hi", "2024-03-12 00:05:09"),  # midnight in 12-hour time
    ],
)
def test_whatsapp_date_styles(line, expected, tmp_path):
    from owngpt.data.personal import read_whatsapp

    (msg,) = read_whatsapp(tmp_path / "x.txt", line + "\n")[0].messages
    assert (str(msg.time), msg.sender, msg.text) == (expected, "Ann", "hi")


def test_wechat_group_member_without_remark_falls_back_to_nickname(tmp_path):
    f = tmp_path / "group.csv"
    f.write_text(
        "localId,TalkerId,Type,SubType,IsSender,CreateTime,Status,StrContent,StrTime,Remark,NickName,Sender\n"
        "1,9,1,0,0,1710278100,2,周六爬山？,2024-03-12 21:15:00,,山哥,wxid_a\n"
        "2,9,1,0,0,1710278110,2,我去,2024-03-12 21:15:10,小李,lee,wxid_b\n"
        "3,9,1,0,1,1710278120,2,好,2024-03-12 21:15:20,,zs,wxid_me\n",
        encoding="utf-8",
    )
    (conv,) = [r.messages for r in read_exports([f], cfg("wechat", None))]
    assert conv == [{"role": "user", "content": "山哥: 周六爬山？\n小李: 我去"}, {"role": "assistant", "content": "好"}]


def _prepare_export(export: Path, out: Path, **kw):
    from owngpt.data.prepare import PrepareConfig, prepare

    settings = dict(
        sources=[str(export)], out=str(out), source_format="whatsapp", me="Zhang San", quiet=True, progress=False
    )
    return prepare(PrepareConfig(**{**settings, **kw}))


def test_pseudonymize_covers_file_names_and_every_field_of_meta_and_report(tmp_path):
    folder = tmp_path / "Chats of Zhang San"  # the user's own folder name: absolute paths must not be recorded
    folder.mkdir()
    export = folder / "WhatsApp Chat with Wang Wei.txt"
    export.write_text(
        "01/02/2024, 10:00 - Wang Wei: <Media omitted>\n01/02/2024, 10:01 - Wang Wei: hi\n"
        "01/02/2024, 10:02 - Zhang San: hi\n01/02/2024, 10:03 - Zhang San: hi\n",
        encoding="utf-8",
    )
    out = tmp_path / "data"
    _prepare_export(export, out, tokenizer="char", pseudonymize=True)
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["inputs"][0]["path"] == "input-1.txt" and meta["settings"]["me"] == "(withheld: --pseudonymize)"
    report = (out / "report.json").read_text(encoding="utf-8")
    assert "input-1.txt:1: <Media omitted>" in report  # the examples still say where, by the alias
    for f in out.rglob("*"):
        if f.is_file():
            content = f.read_bytes()
            for secret in (b"Wang Wei", b"Zhang San", str(tmp_path).encode()):
                assert secret not in content, (secret, f)
    # without the flag the file name is kept (redacted of numbers only): the test above can fail
    _prepare_export(export, tmp_path / "plain", tokenizer="char")
    plain = json.loads((tmp_path / "plain" / "meta.json").read_text(encoding="utf-8"))
    assert plain["inputs"][0]["path"] == "../Chats of Zhang San/WhatsApp Chat with Wang Wei.txt"  # data-dir relative
    assert str(tmp_path) not in json.dumps(plain)


def test_tokenizer_learns_no_digit_run_of_redacted_pii(tmp_path):
    # a passport number and an IBAN said many times: a BPE vocabulary trained on unredacted text learns their digits
    lines = []
    for i in range(40):
        lines.append(f"01/02/2024, 10:{i:02d} - Wang Wei: 我的护照号码是E12345678，IBAN DE89 3704 0044 0532 0130 00")
        lines.append(f"01/02/2024, 10:{i:02d} - Zhang San: 好的，护照 E12345678 收到")
    export = tmp_path / "chat.txt"
    export.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def vocab(out: Path) -> str:
        return (out / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")

    _prepare_export(export, tmp_path / "redacted", tokenizer="bpe", vocab_size=400, val_fraction=0.0)
    assert "1234" not in vocab(tmp_path / "redacted") and "3704" not in vocab(tmp_path / "redacted")
    _prepare_export(export, tmp_path / "kept", tokenizer="bpe", vocab_size=400, val_fraction=0.0, keep_pii=True)
    assert "12345678" in vocab(tmp_path / "kept")  # the oracle: the same data unredacted does teach it


def test_region_flag_reads_local_numbers_and_refuses_unknown_regions(tmp_path, capsys):
    export = tmp_path / "chat.txt"
    export.write_text(
        "01/02/2024, 10:00 - Wang Wei: ring me on 139 1234 5678 or 06 12 34 56 78\n01/02/2024, 10:01 - Zhang San: ok\n",
        encoding="utf-8",
    )
    (convs,), _ = run(str(export), "whatsapp", "Zhang San", region="FR")
    assert convs[0]["content"] == "ring me on <PHONE> or <PHONE>"  # the Chinese mobile rule holds for every region
    (convs,), _ = run(str(export), "whatsapp", "Zhang San")
    assert convs[0]["content"] == "ring me on <PHONE> or 06 12 34 56 78"  # default CN: the French number is not seen
    args = ["prepare", str(export), "--from", "whatsapp", "--me", "Zhang San", "--out", str(tmp_path / "d")]
    assert main([*args, "--region", "XX"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --region") and "Traceback" not in err and not (tmp_path / "d").exists()
