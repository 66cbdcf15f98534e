"""`owngpt prepare`: readers, cleaning, split, data dir contents, determinism and bad input."""

import json
import os
from pathlib import Path

import pytest

from owngpt import chat_format as cf
from owngpt.cli import main
from owngpt.data.datadir import open_data_dir
from owngpt.data.prepare import PrepareConfig, choose_val, prepare
from owngpt.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"
TANG = DATA / "tang_excerpt.txt"


def run(tmp_path, *sources, out="out", **kw):
    kw.setdefault("tokenizer", "char")
    cfg = PrepareConfig(sources=[str(s) for s in sources], out=str(tmp_path / out), progress=False, quiet=True, **kw)
    return prepare(cfg)


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def lm_docs(d) -> dict[str, list[str]]:
    """The documents of an lm data dir, decoded and split at EOS."""
    tok = d.load_tokenizer()
    out = {}
    for split in ("train", "val"):
        ids = d.tokens(split).tolist()
        docs, cur = [], []
        for i in ids:
            if i == tok.eos_token_id:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        assert not cur, "every document ends with EOS"
        out[split] = docs
    return out


# --- plain text and the raw Tang poems ------------------------------------------------------------------------------


def test_tang_poems_lose_ansi_codes_but_keep_titles_and_poems(tmp_path):
    raw = TANG.read_text(encoding="utf-8")
    assert "\x1b[32m" in raw and "\n%\n" in raw
    r = run(tmp_path, TANG, doc_sep="%", tokenizer="bpe", vocab_size=300, val_fraction=0.25)
    d = open_data_dir(r.out)
    docs = lm_docs(d)
    everything = docs["train"] + docs["val"]
    assert len(everything) == 4 and len(docs["val"]) == 1
    joined = "\n".join(everything)
    assert "\x1b" not in joined and "[32m" not in joined and "%" not in joined
    assert any(doc.startswith("《感遇・其一》\n作者：张九龄\n兰叶春葳蕤") for doc in everything)
    rules = r.report["rules"]
    assert rules["ansi_escapes"]["count"] == 4 and rules["ansi_escapes"]["chars_removed"] == 4 * 2 * (5 + 3)
    assert "《感遇・其一》" in rules["ansi_escapes"]["examples"][0]
    assert r.report["in"]["documents"] == r.report["out"]["documents"] == 4
    meta = d.meta
    assert meta["splits"]["train"]["documents"] == 3 and meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["train"]["bytes"] == sum(len(x.encode()) for x in docs["train"])
    assert meta["tokenizer"]["kind"] == "bpe" and meta["inputs"][0]["bytes"] == TANG.stat().st_size
    assert json.loads((r.out / "report.json").read_text(encoding="utf-8"))["rules"]["ansi_escapes"]["count"] == 4


def test_doc_sep_modes(tmp_path):
    f = write(tmp_path / "a.txt", "one\ntwo\n\n\nthree\n--\nfour\n")
    count = lambda **kw: sum(v["documents"] for v in run(tmp_path, f, overwrite=True, **kw).meta["splits"].values())  # noqa: E731
    assert count(doc_sep="blank") == 2 and count(doc_sep="") == 2 and count(doc_sep="\\n\\n") == 2
    assert count(doc_sep="line") == 5
    assert count(doc_sep="--") == 2
    r = run(tmp_path, f, overwrite=True)  # default: the file is one document, split by position
    assert r.meta["settings"]["split"] == "position"
    docs = lm_docs(open_data_dir(r.out))
    assert docs["train"][0] + docs["val"][0] == "one\ntwo\n\nthree\n--\nfour"


def test_folders_are_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    write(tmp_path / "in" / "b.txt", "bee")
    write(tmp_path / "in" / "sub" / "a.md", "ant")
    write(tmp_path / "in" / ".hidden.txt", "hidden")
    write(tmp_path / "in" / "notes.bin", "skipped: unknown extension")
    r = run(tmp_path, tmp_path / "in", val_fraction=0)
    assert [Path(i["path"]).name for i in r.meta["inputs"]] == ["b.txt", "a.md"]
    assert lm_docs(open_data_dir(r.out))["train"] == ["bee", "ant"]


# --- cleaning ---------------------------------------------------------------------------------------------------


def test_cleaning_rules_each_counted(tmp_path):
    docs = [
        "cafe\u0301",  # NFD -> NFC
        "ctrl\x07chars\x01 here",
        "trailing   \nspaces\u00a0and\u200bzero width\n\n\n\nnewlines",
        "dup",
        "dup",
        "x",
        "a" * 50,
        "   ",
    ]
    f = write(tmp_path / "c.txt", "\n%\n".join(docs) + "\n")
    r = run(tmp_path, f, doc_sep="%", min_chars=2, max_chars=40, val_fraction=0)
    rules = r.report["rules"]
    assert rules["unicode_nfc"]["count"] == 1
    assert rules["control_chars"]["count"] == 1 and rules["control_chars"]["chars_removed"] == 2
    assert rules["whitespace"]["count"] >= 1
    assert rules["exact_duplicate"]["count"] == 1 and rules["too_short"]["count"] == 1
    assert rules["too_long"]["count"] == 1 and rules["empty"]["count"] == 1
    out = lm_docs(open_data_dir(r.out))["train"]
    assert out == ["caf\u00e9", "ctrlchars here", "trailing\nspaces andzero width\n\nnewlines", "dup"]
    assert r.report["in"]["documents"] == 8 and r.report["out"]["documents"] == 4


def test_nfkc_html_and_crlf_are_handled(tmp_path):
    f = write(tmp_path / "h.txt", "<p>Ｈｅｌｌｏ &amp; ﬁne</p><script>x=1</script>\r\nbye\r\n")
    r = run(tmp_path, f, strip_html=True, nfkc=True, val_fraction=0)
    assert lm_docs(open_data_dir(r.out))["train"] == ["Hello & fine\n\nbye"]
    assert r.report["rules"]["html_tags"]["count"] == 1 and r.report["rules"]["unicode_nfkc"]["count"] == 1
    r = run(tmp_path, f, val_fraction=0, out="plain")  # both are opt-in
    assert lm_docs(open_data_dir(r.out))["train"] == ["<p>Ｈｅｌｌｏ &amp; ﬁne</p><script>x=1</script>\nbye"]


def test_near_duplicates_are_opt_in(tmp_path):
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    f = write(tmp_path / "n.txt", f"{base}\n\n{base}!\n\nsomething entirely different about poems\n")
    r = run(tmp_path, f, doc_sep="blank", near_dup=True, val_fraction=0)
    assert r.report["rules"]["near_duplicate"]["count"] == 1 and r.meta["splits"]["train"]["documents"] == 2
    r = run(tmp_path, f, doc_sep="blank", val_fraction=0, out="o2")
    assert r.meta["splits"]["train"]["documents"] == 3


# --- encodings and bad input ------------------------------------------------------------------------------------


def test_gbk_needs_encoding_and_the_error_names_file_line_and_offset(tmp_path, capsys):
    gbk = DATA / "gbk_poems.txt"
    with pytest.raises(DataError, match=r"gbk_poems\.txt:1: byte offset 0 .*--encoding"):
        run(tmp_path, gbk)
    assert not (tmp_path / "out").exists()
    r = run(tmp_path, gbk, encoding="gbk", doc_sep="blank", val_fraction=0)
    assert lm_docs(open_data_dir(r.out))["train"] == [
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
        "春眠不觉晓，处处闻啼鸟。",
    ]


def test_undecodable_bytes_are_counted_with_their_offset_under_skip_invalid(tmp_path):
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"ok line\n" + b"bad \xff byte\n" + "好\n".encode())
    r = run(tmp_path, f, skip_invalid=True, val_fraction=0)
    rule = r.report["rules"]["undecodable_bytes"]
    assert rule["count"] == 1 and "mixed.txt:2" in rule["examples"][0] and "byte offsets 12" in rule["examples"][0]
    assert lm_docs(open_data_dir(r.out))["train"] == ["ok line\nbad  byte\n好"]


def test_bom_is_stripped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    r = run(tmp_path, f, val_fraction=0)
    assert lm_docs(open_data_dir(r.out))["train"] == ["hello"]
    assert r.report["rules"]["utf8_bom_stripped"]["count"] == 1


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bin.txt", bytes(range(256)) * 4, r"bin\.txt: looks like a binary file"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl:2: malformed JSON"),
        ("field.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"field\.jsonl:2: missing field 'text' .*--text-field"),
        ("empty.txt", b"", r"empty\.txt: no documents found"),
        ("blank.txt", b"   \n\n", r"blank\.txt: all 1 documents were dropped"),
        (
            "nocol.csv",
            b"words,id,label\nx,1,2\n",
            r"nocol\.csv:1: no text column 'text' \(columns: words, id, label\).*--text-column",
        ),
    ],
)
def test_bad_input_is_one_line_error_with_no_data_dir_left(tmp_path, capsys, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        run(tmp_path, f)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary dir left behind either
    # the CLI prints it on one line and exits non-zero, without a traceback
    code = main(["prepare", str(f), "--out", str(tmp_path / "cli"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "cli").exists()


def test_skip_invalid_counts_bad_records_and_fails_above_the_threshold(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(20)] + ["{broken", '{"other": 1}']
    f = write(tmp_path / "s.jsonl", "\n".join(lines) + "\n")
    r = run(tmp_path, f, skip_invalid=True)
    rule = r.report["rules"]["invalid_record"]
    assert rule["count"] == 2 and rule["examples"][0].startswith(f"{f}:21: malformed JSON")
    assert r.report["in"]["invalid"] == 2 and r.report["out"]["documents"] == 20
    with pytest.raises(DataError, match=r"2 of 22 records are invalid .*--max-invalid-fraction 0.05.*s\.jsonl:21"):
        run(tmp_path, f, skip_invalid=True, max_invalid_fraction=0.05, out="o2")


def test_existing_out_needs_overwrite(tmp_path):
    f = write(tmp_path / "a.txt", "hello")
    run(tmp_path, f)
    with pytest.raises(ConfigError, match="--overwrite"):
        run(tmp_path, f)
    run(tmp_path, f, overwrite=True)


def test_bad_flags_name_the_flag(tmp_path):
    f = write(tmp_path / "a.txt", "hello")
    with pytest.raises(ConfigError, match="--val-fraction"):
        run(tmp_path, f, val_fraction=1.5)
    with pytest.raises(ConfigError, match="--encoding"):
        run(tmp_path, f, encoding="nope")
    with pytest.raises(ConfigError, match="--tokenizer"):
        run(tmp_path, f, tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="plain text has no labels"):
        run(tmp_path, f, task="classify")


# --- determinism, split, streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(tokenizer="bpe", vocab_size=300, doc_sep="%"), dict(task="chat")])
def test_same_inputs_give_byte_identical_outputs(tmp_path, kw):
    if kw.get("task") == "chat":
        src = write(
            tmp_path / "c.jsonl",
            "\n".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"问题 {i}?"},
                            {"role": "assistant", "content": f"answer {i} 😀"},
                        ]
                    }
                )
                for i in range(30)
            )
            + "\n",
        )
    else:
        src = TANG
    a, b = run(tmp_path, src, out="a", **kw), run(tmp_path, src, out="b", **kw)
    files_a = sorted(p.relative_to(a.out) for p in a.out.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.out) for p in b.out.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 5
    for rel in files_a:
        assert (a.out / rel).read_bytes() == (b.out / rel).read_bytes(), rel
    c = run(tmp_path, src, out="c", seed=7, **kw)  # another seed: another split
    assert (c.out / "meta.json").read_bytes() != (a.out / "meta.json").read_bytes()


def test_split_is_seeded_and_has_a_validation_document_whenever_possible():
    assert choose_val(1, 0.1, 0).sum() == 0
    assert choose_val(2, 0.01, 0).sum() == 1 and choose_val(100, 0.1, 0).sum() == 10
    assert choose_val(3, 0.9, 0).sum() == 2  # always at least one train document
    assert (choose_val(50, 0.2, 3) == choose_val(50, 0.2, 3)).all()
    assert not (choose_val(50, 0.2, 3) == choose_val(50, 0.2, 4)).all()


def test_a_small_memory_budget_gives_the_same_tokens(tmp_path):
    text = "".join(f"Line {i}: 床前明月光 and some words\n" for i in range(6000))  # ~180k chars, one document
    f = write(tmp_path / "big.txt", text)
    big = run(tmp_path, f, out="big", tokenizer="bpe", vocab_size=400, max_memory_mb=1024)
    small = run(tmp_path, f, out="small", tokenizer="bpe", vocab_size=400, max_memory_mb=16)
    for name in ("train.bin", "val.bin"):
        assert (big.out / name).read_bytes() == (small.out / name).read_bytes()


# --- chat -------------------------------------------------------------------------------------------------------------

CHATS = {
    "messages.jsonl": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        }
    ],
    "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}],
    "alpaca.jsonl": [{"instruction": "Translate", "input": "你好", "output": "hello"}],
}


def _chat_records(d):
    return [r["messages"] for s in ("train", "val") for r in d.records(s)]


@pytest.mark.parametrize("name", list(CHATS))
def test_chat_formats_are_read_and_inferred(tmp_path, name):
    f = write(tmp_path / name, "\n".join(json.dumps(o, ensure_ascii=False) for o in CHATS[name]) + "\n")
    r = run(tmp_path, f)  # the task is inferred from the fields
    d = open_data_dir(r.out)
    assert d.task == "chat"
    (msgs,) = _chat_records(d)
    expected = {
        "messages.jsonl": CHATS[name][0].get("messages"),
        "sharegpt.jsonl": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "alpaca.jsonl": [{"role": "user", "content": "Translate\n\n你好"}, {"role": "assistant", "content": "hello"}],
    }[name]
    assert msgs == expected


def test_chat_data_dir_has_ids_and_assistant_masks(tmp_path):
    convs = [
        [
            {"role": "user", "content": f"q{i} 你好"},
            {"role": "assistant", "content": f"a{i} 😀"},
            {"role": "user", "content": "more?"},
            {"role": "assistant", "content": f"yes {i}"},
        ]
        for i in range(12)
    ]
    f = write(tmp_path / "c.jsonl", "\n".join(json.dumps({"messages": c}) for c in convs) + "\n")
    r = run(tmp_path, f, tokenizer="bpe", vocab_size=300)
    d = open_data_dir(r.out)
    tok = d.load_tokenizer()
    n = 0
    for split in ("train", "val"):
        ids, offsets, mask = d.ragged(split)
        recs = list(d.records(split))
        assert len(offsets) == len(recs) + 1 and len(mask) == len(ids)
        for i, rec in enumerate(recs):
            a, b = offsets[i], offsets[i + 1]
            exp_ids, exp_mask = cf.render(tok, rec["messages"])
            assert ids[a:b].tolist() == exp_ids and mask[a:b].tolist() == exp_mask
            trained = tok.decode([t for t, m in zip(exp_ids, exp_mask) if m])
            assert trained == "".join(
                m["content"] + cf.IM_END + "\n" for m in rec["messages"] if m["role"] == "assistant"
            )
            n += 1
        assert d.meta["splits"][split]["assistant_tokens"] == int(mask.sum())
    assert n == 12 and d.meta["splits"]["val"]["examples"] == 1


def test_chitchat_dialogues_alternate_user_and_assistant(tmp_path):
    f = write(tmp_path / "dialogs.txt", "你好\n你好呀\n在干嘛\n写代码\n\nhi\nhello\n\nlonely line\n")
    r = run(tmp_path, f, task="chat", val_fraction=0)
    msgs = _chat_records(open_data_dir(r.out))
    assert msgs[0] == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好呀"},
        {"role": "user", "content": "在干嘛"},
        {"role": "assistant", "content": "写代码"},
    ]
    assert msgs[1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert r.report["rules"]["no_assistant_reply"]["count"] == 1


@pytest.mark.parametrize(
    "obj,message",
    [
        ({"messages": [{"role": "wizard", "content": "x"}]}, r"c\.jsonl:2: .*role 'wizard'"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, r"c\.jsonl:2: .*from 'alien'"),
        ({"messages": "hello"}, r"c\.jsonl:2: 'messages' must be a non-empty list"),
        ({"instruction": "x"}, r"c\.jsonl:2: an Alpaca record needs"),
    ],
)
def test_chat_schema_errors_name_file_and_line(tmp_path, obj, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = write(tmp_path / "c.jsonl", json.dumps(good) + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(DataError, match=message):
        run(tmp_path, f, task="chat")


def test_a_pretty_printed_json_array_is_read_and_its_task_inferred(tmp_path):
    items = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    f = write(tmp_path / "alpaca.json", json.dumps(items, indent=2))
    d = open_data_dir(run(tmp_path, f, val_fraction=0).out)
    assert d.task == "chat" and [r["messages"][1]["content"] for r in d.records("train")] == ["a0", "a1", "a2"]


def test_json_array_files_report_true_line_numbers(tmp_path):
    f = write(tmp_path / "alpaca.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"alpaca\.json:3: an Alpaca record"):
        run(tmp_path, f)


def test_chat_exports_plug_in_through_personal_read_exports(tmp_path, monkeypatch):
    import types

    seen = {}

    def read_exports(paths, cfg, report):
        seen["paths"], seen["me"] = paths, cfg.me
        report.count("export.sessions", 2)
        yield {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
        yield {
            "messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}],
            "file": "x",
            "line": 9,
        }

    import owngpt.data.prepare

    fake = types.SimpleNamespace(read_exports=read_exports)
    monkeypatch.setattr(owngpt.data.prepare, "personal", fake)  # the module prepare dispatches --from to
    f = write(tmp_path / "export.txt", "whatever the export looks like")
    r = run(tmp_path, f, source_format="whatsapp", me="Zhang San")
    assert seen == {"paths": [f], "me": "Zhang San"}
    assert r.meta["task"] == "chat" and r.report["rules"]["export.sessions"]["count"] == 2
    assert r.meta["inputs"][0]["format"] == "whatsapp" and len(r.meta["inputs"][0]["sha256"]) == 64
    with pytest.raises(ConfigError, match="--from whatsapp makes chat data"):
        run(tmp_path, f, source_format="whatsapp", task="lm", out="o2")


# --- classify ------------------------------------------------------------------------------------------------------


def test_classify_from_csv_with_string_labels_and_a_label_map(tmp_path):
    rows = ["text,label"] + [f'"review {i}, really",{("pos", "neg", "meh")[i % 3]}' for i in range(30)]
    f = write(tmp_path / "r.csv", "\n".join(rows) + "\n")
    r = run(tmp_path, f)  # a label column: classify is inferred
    d = open_data_dir(r.out)
    assert d.task == "classify" and d.labels == ["meh", "neg", "pos"]
    tok = d.load_tokenizer()
    for split in ("train", "val"):
        ids, offsets, _ = d.ragged(split)
        recs, labels = list(d.records(split)), d.label_ids(split)
        assert len(recs) == len(labels) == len(offsets) - 1
        for i, rec in enumerate(recs):
            assert d.labels[labels[i]] == rec["label"] and rec["text"].startswith("review ")
            assert tok.decode(ids[offsets[i] : offsets[i + 1]].tolist()) == rec["text"]
    assert r.report["labels"] == {"meh": 10, "neg": 10, "pos": 10}


def test_classify_labels_order_integers_and_unknown_or_missing_labels(tmp_path):
    f = write(tmp_path / "l.jsonl", "\n".join(json.dumps({"text": f"t{i}", "label": i % 3 * 5}) for i in range(9)))
    assert run(tmp_path, f, out="a").meta["labels"] == ["0", "5", "10"]  # integers in numeric order
    assert run(tmp_path, f, out="b", labels=["10", "5", "0"]).meta["labels"] == ["10", "5", "0"]
    with pytest.raises(DataError, match=r"l\.jsonl:2: unknown label '5'"):
        run(tmp_path, f, out="c", labels=["0", "10"])
    g = write(tmp_path / "m.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:3: missing label 'label'"):
        run(tmp_path, g, task="classify")
    h = write(tmp_path / "t.tsv", 'sentence\tlabel\nit is "great\t1\nbad\t0\n')  # TSV: bare quotes are text
    d = open_data_dir(run(tmp_path, h, out="d", val_fraction=0).out)
    assert [r["text"] for r in d.records("train")] == ['it is "great', "bad"]


# --- tokenizer choices -------------------------------------------------------------------------------------------


def test_gpt2_and_pretrained_dir_tokenizers(tmp_path, tiny_ckpt):
    f = write(tmp_path / "a.txt", "Hello world")
    r = run(tmp_path, f, tokenizer="gpt2", val_fraction=0)
    assert open_data_dir(r.out).tokens("train").tolist() == [15496, 995, 50256]
    r = run(tmp_path, f, tokenizer=str(tiny_ckpt), val_fraction=0, out="p")
    meta = r.meta["tokenizer"]
    # recorded relative to the data dir, or by its name only: meta.json must not reveal the user's folders
    assert meta["kind"] == "pretrained" and meta["source"] in (os.path.relpath(tiny_ckpt, r.out), tiny_ckpt.name)
    assert str(tiny_ckpt.parent) not in json.dumps(r.meta)
    from owngpt.tokenizer import load_tokenizer

    orig, saved = load_tokenizer(tiny_ckpt), load_tokenizer(r.out / "tokenizer")
    assert saved.get_vocab() == orig.get_vocab() and meta["eos_token_id"] == orig.eos_token_id


def test_a_bert_style_model_dir_keeps_its_vocab_and_separates_documents_with_sep(tmp_path):
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    model = tmp_path / "bert"
    model.mkdir()
    (model / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    wordpiece = BertWordPieceTokenizer(str(model / "vocab.txt"))._tokenizer  # transformers 5 ignores vocab_file=
    specials = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, **specials).save_pretrained(model)
    (model / "config.json").write_text('{"model_type": "bert"}')
    f = write(tmp_path / "a.txt", "hello world")
    r = run(tmp_path, f, tokenizer=str(model), val_fraction=0)
    assert r.meta["tokenizer"]["kind"] == "pretrained" and r.meta["tokenizer"]["vocab_size"] == 7
    assert open_data_dir(r.out).tokens("train").tolist() == [5, 6, 3]  # hello world [SEP]


def test_a_multiline_json_object_gets_a_hint(tmp_path):
    f = write(tmp_path / "result.json", '{\n  "name": "chat",\n  "messages": []\n}\n')
    with pytest.raises(DataError, match=r"result\.json:1: one JSON object spread over many lines.*--from telegram"):
        run(tmp_path, f)


def test_cli_prints_the_report_table(tmp_path, capsys):
    code = main(["prepare", str(TANG), "--doc-sep", "%", "--tokenizer", "char", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0 and "ansi_escapes" in out and "documents" in out and "report.json" in out


def test_near_duplicates_share_one_set_of_permutations_with_the_same_signatures():
    # the oracle: a MinHash built the default way (its own seeded permutations) for each document
    import datasketch
    import numpy as np

    from owngpt.data.clean import NearDuplicates

    nd = NearDuplicates()
    for text in ("床前明月光，疑是地上霜。举头望明月，低头思故乡。", "To be, or not to be, that is the question."):
        grams = [text[i : i + 5].encode() for i in range(len(text) - 4)]
        fresh = datasketch.MinHash(num_perm=64, seed=1)
        fresh.update_batch(grams)
        shared = nd._MinHash(num_perm=64, seed=1, **nd._shared)
        shared.update_batch(grams)
        assert np.array_equal(fresh.hashvalues, shared.hashvalues)
    assert nd.check_and_add("床前明月光，疑是地上霜。举头望明月，低头思故乡。", "a:1") is None
    assert nd.check_and_add("床前明月光，疑是地上霜。举头望明月，低头思故乡！", "b:1") is not None  # a near copy


def test_a_missing_bundled_sample_says_where_owngpt_ships_it(tmp_path, monkeypatch, capsys):
    """The README's `owngpt prepare tinyshakespeare.txt ...` run in an empty folder: the error says where the
    bundled copy is, and the command with that path works."""
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "tang300.txt", "--out", "poems", "--tokenizer", "char", "--doc-sep", "%", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tang300.txt: no such file or folder; owngpt bundles a copy of tang300.txt: ")
    bundled = err.strip().rsplit(": ", 1)[1]
    assert Path(bundled).is_file() and not (tmp_path / "poems").exists()
    assert main(["prepare", bundled, "--out", "poems", "--tokenizer", "char", "--doc-sep", "%", "--quiet"]) == 0
    assert main(["prepare", "mine.txt", "--out", "x", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith("mine.txt: no such file or folder")  # no hint for other names
