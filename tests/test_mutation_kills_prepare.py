"""`owngpt prepare`'s whole contract, written against the classes of mutants that survived in data/prepare (#25).

Fresh mutation samples of data/prepare kept finding the same untested behaviours: the settings' documented bounds,
the numbers in report.json and meta.json, the messages of its refusals, the position split of a single document and
its progress bars. Each test here pins one of those as a whole, with oracles computed in the test: the data dir's
files read back, the saved tokenizer run on the dropped texts, the inputs as written."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from owngpt.data.datadir import open_data_dir
from owngpt.data.prepare import PrepareConfig, prepare, validate
from owngpt.errors import ConfigError, DataError


def _run(tmp_path, *sources, out="out", **kw):
    kw.setdefault("tokenizer", "char")
    kw.setdefault("progress", False)
    kw.setdefault("quiet", True)
    return prepare(PrepareConfig(sources=[str(s) for s in sources], out=str(tmp_path / out), **kw))


# --- the settings' bounds ---------------------------------------------------------------------------------------

# (settings, None = accepted | the start of the ConfigError's message). Each bound appears from both sides: the
# last value `owngpt prepare --help` accepts and the first it refuses.
BOUNDS = [
    (dict(task="lm"), None),
    (dict(task="chat"), None),
    (dict(task="classify"), None),
    (dict(task="lmm"), "--task lmm"),
    (dict(format="jsonl"), None),
    (dict(format="docx"), "--format docx"),
    (dict(val_fraction=0.0), None),
    (dict(val_fraction=0.999), None),
    (dict(val_fraction=1.0), "--val-fraction 1.0"),
    (dict(val_fraction=-0.01), "--val-fraction -0.01"),
    (dict(max_invalid_fraction=0.0), None),
    (dict(max_invalid_fraction=1.0), None),
    (dict(max_invalid_fraction=-0.1), "--max-invalid-fraction -0.1"),
    (dict(max_invalid_fraction=1.01), "--max-invalid-fraction 1.01"),
    (dict(near_dup_threshold=1.0), None),
    (dict(near_dup_threshold=0.01), None),
    (dict(near_dup_threshold=0.0), "--near-dup-threshold 0.0"),
    (dict(near_dup_threshold=1.01), "--near-dup-threshold 1.01"),
    (dict(min_chars=0), None),
    (dict(min_chars=-1), "--min-chars must be >= 0"),
    (dict(min_chars=0, max_chars=1), None),  # the shortest text a data dir can hold: one character
    (dict(min_chars=0, max_chars=0), "--min-chars must be >= 0"),
    (dict(min_chars=5, max_chars=5), None),
    (dict(min_chars=5, max_chars=4), "--min-chars must be >= 0"),
    (dict(max_memory_mb=16), None),
    (dict(max_memory_mb=15), "--max-memory-mb 15"),
    (dict(vocab_size=260), None),
    (dict(vocab_size=1 << 20), None),
    (dict(vocab_size=259), "--vocab-size 259"),
    (dict(vocab_size=(1 << 20) + 1), "--vocab-size 1048577"),
    (dict(vocab_size=300, tokenizer="char"), "--vocab-size applies to --tokenizer bpe only"),
    (dict(source_format="whatsapp"), None),
    (dict(source_format="whatsapp", task="chat"), None),
    (dict(source_format="skype"), "--from skype"),
    (dict(source_format="csv", task="lm"), "--from csv makes chat data"),
    (dict(source_format="csv", region="XX"), "--region"),
    (dict(encoding="gbk"), None),
    (dict(encoding="no-such-codec"), "--encoding"),
]


@pytest.mark.parametrize("settings,refused", BOUNDS, ids=[str(s) for s, _ in BOUNDS])
def test_each_setting_is_accepted_up_to_its_documented_bound_and_refused_past_it(tmp_path, settings, refused):
    cfg = PrepareConfig(sources=["x.txt"], out=str(tmp_path / "o"), **settings)
    if refused is None:
        validate(cfg)
    else:
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        assert str(e.value).startswith(refused), str(e.value)


def test_inputs_and_out_are_required():
    with pytest.raises(ConfigError, match="no inputs"):
        validate(PrepareConfig(sources=[], out="o"))
    with pytest.raises(ConfigError, match="--out DATA_DIR is required"):
        validate(PrepareConfig(sources=["x"], out=""))


# --- report.json and meta.json: every count, against the files read back ------------------------------------------


def _split_texts(out, meta, split):
    """The texts a split holds, read back from the data dir's own files (not from prepare's counters)."""
    task = meta["task"]
    if task == "lm":
        tok = open_data_dir(out).load_tokenizer()
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        ends = np.flatnonzero(ids == meta["tokenizer"]["eos_token_id"])
        starts = [0, *(ends + 1)][: len(ends)]
        return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, ends)], int(len(ids))
    recs = [json.loads(line) for line in open(out / f"{split}.jsonl", encoding="utf-8")]
    n_tokens = int(len(np.fromfile(out / f"{split}.ids.bin", dtype=meta["dtype"])))
    if task == "chat":
        from owngpt.chat_format import render_text

        return [render_text(r["messages"]) for r in recs], n_tokens
    return [r["text"] for r in recs], n_tokens


# Each case: the input file, what prepare reads from it (valid records as read, before cleaning: a blank-separated
# text document keeps its lines' newlines), which of those cleaning drops, and the invalid records skipped.
ZH = "文档"  # non-ASCII text, so characters and UTF-8 bytes differ


def _lm_case():
    kept = [f"{ZH} {i} holds ü words" for i in range(10)]
    read = [d + "\n" for d in [*kept[:4], kept[3], *kept[4:], "ab"]]  # an exact duplicate and a too-short one
    return "a.txt", "\n".join(read), read, [kept[3] + "\n", "ab\n"], 0, dict(doc_sep="blank", min_chars=3)


def _chat_case():
    convs = [
        [{"role": "user", "content": f"{ZH} {i}?"}, {"role": "assistant", "content": f"答 {i} ü"}] for i in range(9)
    ]
    rows = [*convs[:5], convs[2], *convs[5:]]  # one duplicate conversation
    lines = [json.dumps({"messages": c}, ensure_ascii=False) for c in rows]
    return "c.jsonl", "\n".join(lines) + "\n", rows, [convs[2]], 0, dict(val_fraction=0.25)


def _classify_case():
    rows = [{"text": f"{ZH} {i} ü", "label": ("neg", "pos", "mid")[i % 3]} for i in range(11)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(4, json.dumps({"text": "no label here"}))  # invalid: skipped and counted
    lines.insert(7, json.dumps(rows[1], ensure_ascii=False))  # a duplicate: dropped by cleaning
    read = [*rows[:6], rows[1], *rows[6:]]
    return "l.jsonl", "\n".join(lines) + "\n", read, [rows[1]], 1, dict(skip_invalid=True, val_fraction=0.3)


@pytest.mark.parametrize("case", [_lm_case, _chat_case, _classify_case], ids=["lm", "chat", "classify"])
def test_the_report_and_meta_count_what_was_read_dropped_and_written(tmp_path, case):
    from owngpt.chat_format import render_text

    name, content, read, dropped, n_invalid, kw = case()
    (tmp_path / name).write_text(content, encoding="utf-8")
    r = _run(tmp_path, tmp_path / name, **kw)
    meta = json.loads((r.out / "meta.json").read_text(encoding="utf-8"))
    assert r.report == json.loads((r.out / "report.json").read_text(encoding="utf-8")) and r.meta == meta
    task = meta["task"]
    n_key = "documents" if task == "lm" else "examples"
    tok = open_data_dir(r.out).load_tokenizer()

    def chars(x):  # the characters of one record as prepare counts them: a text, or a conversation's contents
        if isinstance(x, str):
            return len(x)
        if "text" in x:
            return len(x["text"])
        return sum(len(m["content"]) for m in x)

    def tokens(x):  # the tokens a dropped record would have given (a conversation as chat_format renders it)
        text = x if isinstance(x, str) else x.get("text") if isinstance(x, dict) else render_text(x)
        return len(tok.encode(text, add_special_tokens=False))

    n_docs = n_tokens = n_chars = 0
    for split in ("train", "val"):
        texts, n_ids = _split_texts(r.out, meta, split)
        st = meta["splits"][split]
        assert st[n_key] == len(texts) > 0, split
        assert st["tokens"] == n_ids
        assert st["chars"] == sum(len(t) for t in texts)
        assert st["bytes"] == sum(len(t.encode("utf-8")) for t in texts) > st["chars"]
        if task == "chat":
            mask = np.fromfile(r.out / f"{split}.mask.bin", dtype=np.uint8)
            assert st["assistant_tokens"] == int(mask.sum()) > 0
        assert r.report["splits"][split] == {"documents": len(texts), "tokens": n_ids, "chars": st["chars"]}
        n_docs += len(texts)
        n_tokens += n_ids - (len(texts) if task == "lm" else 0)  # lm: without the end-of-text after each document
    kept = list(read)
    for x in dropped:
        kept.remove(x)
    # what cleaning keeps of a record: an lm document loses its trailing newline
    n_chars = sum(len(x.strip()) if task == "lm" else chars(x) for x in kept)
    assert n_docs == len(read) - len(dropped)
    assert r.report["task"] == task and r.report["files"] == 1
    assert r.report["unit"] == {"lm": "documents", "chat": "conversations", "classify": "examples"}[task]
    assert r.report["out"] == {"documents": n_docs, "chars": n_chars, "tokens": n_tokens}
    assert r.report["in"] == {
        "documents": len(read),
        "invalid": n_invalid,
        "chars": sum(chars(x) for x in read),
        "tokens": n_tokens + sum(tokens(x) for x in dropped),
    }
    if task == "classify":
        from collections import Counter

        counts = Counter(x["label"] for x in read)
        counts.subtract(Counter(x["label"] for x in dropped))
        assert r.report["labels"] == {k: counts[k] for k in sorted(counts)} == {"mid": 3, "neg": 4, "pos": 4}
        assert meta["labels"] == ["mid", "neg", "pos"]
        for split in ("train", "val"):
            recs = [json.loads(line) for line in open(r.out / f"{split}.jsonl", encoding="utf-8")]
            ids = np.load(r.out / f"{split}.labels.npy")
            assert [meta["labels"][i] for i in ids] == [x["label"] for x in recs]


# --- a single document is split by position ---------------------------------------------------------------------


@pytest.mark.parametrize("val_fraction", [0.25, 0.0])
def test_a_single_document_is_split_by_position(tmp_path, val_fraction):
    # nanoGPT's split of one text: train is its first (1 - val_fraction) characters, val the rest; meta.json says so.
    # With val_fraction 0 there is nothing to split: everything is train.
    doc = "".join(f"line {i}: {ZH} ü\n" for i in range(40)).strip()
    (tmp_path / "one.txt").write_text(doc, encoding="utf-8")
    r = _run(tmp_path, tmp_path / "one.txt", val_fraction=val_fraction)
    meta = json.loads((r.out / "meta.json").read_text(encoding="utf-8"))
    cut = int(len(doc) * (1 - val_fraction))
    assert 0 < cut <= len(doc)
    texts = {s: _split_texts(r.out, meta, s)[0] for s in ("train", "val")}
    if val_fraction:
        assert texts == {"train": [doc[:cut]], "val": [doc[cut:]]}
        assert meta["settings"]["split"] == "position"
    else:
        assert texts == {"train": [doc], "val": []}
        assert "split" not in meta["settings"]


# --- progress bars --------------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("task", ["lm", "chat"])
def test_progress_bars_count_every_record_on_a_terminal_unless_turned_off(tmp_path, monkeypatch, task):
    # On a terminal prepare shows one bar per pass, each counting every record; --no-progress and --quiet show none.
    # tqdm draws at most every 0.1 s: drawing at every update makes the counts visible whatever the machine's speed.
    import functools
    import sys

    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", functools.partial(tqdm.tqdm, mininterval=0, miniters=1))
    if task == "lm":
        name, content, n = "a.txt", "\n\n".join(f"doc {i} words" for i in range(7)) + "\n", 7
        kw, second = dict(doc_sep="blank"), r"tokenize: 100%\|#+\| 7/7 "
    else:
        rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(6)]
        name, content, n = "c.jsonl", "".join(json.dumps({"messages": m}) + "\n" for m in rows), 6
        kw, second = {}, r"render: 100%\|#+\| 6/6 "
    (tmp_path / name).write_text(content, encoding="utf-8")
    shown = {}
    for label, flags in [("default", {}), ("no-progress", dict(progress=False)), ("quiet", dict(quiet=True))]:
        err = _Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        _run(tmp_path, tmp_path / name, out=label, **{"progress": True, "quiet": False, **kw, **flags})
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        shown[label] = err.getvalue()
    import re

    assert re.search(rf"read\+clean: {n}rec ", shown["default"]), shown["default"][-300:]
    assert re.search(second, shown["default"]), shown["default"][-300:]
    assert shown["no-progress"] == shown["quiet"] == ""


# --- what a refusal says ------------------------------------------------------------------------------------------


def test_refusals_name_the_inputs_the_limit_and_the_first_bad_record(tmp_path, monkeypatch):
    # the inputs are named as given on the command line (relative here)
    monkeypatch.chdir(tmp_path)
    # no documents: the first three inputs are named, then "..." when there are more
    empties = []
    for name in "abcd":
        (tmp_path / f"{name}.txt").write_text("", encoding="utf-8")
        empties.append(f"{name}.txt")
    with pytest.raises(DataError) as e:
        _run(tmp_path, *empties)
    assert str(e.value).startswith("a.txt, b.txt, c.txt ...: no documents found in the input")
    assert "--doc-sep" in str(e.value)
    with pytest.raises(DataError) as e:
        _run(tmp_path, *empties[:3])
    assert str(e.value).startswith("a.txt, b.txt, c.txt: no documents found")
    # everything dropped: the rules that dropped them, with their counts
    (tmp_path / "short.txt").write_text("ab\n\ncd\n\nab\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        _run(tmp_path, "short.txt", doc_sep="blank", min_chars=3)
    assert str(e.value).startswith("short.txt: all 3 documents were dropped by cleaning (too_short 3)")
    # a label outside --labels: the record, and the labels allowed
    rows = [{"text": f"t{i}", "label": "a"} for i in range(3)] + [{"text": "t9", "label": "zzz"}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    with pytest.raises(DataError) as e:
        _run(tmp_path, "l.jsonl", labels=["a", "b"])
    assert str(e.value) == "l.jsonl:4: unknown label 'zzz': --labels allows a, b"
    # too many invalid records: how many, the share, the limit and the first one
    with pytest.raises(DataError) as e:
        _run(tmp_path, "l.jsonl", labels=["a", "b"], skip_invalid=True, max_invalid_fraction=0.2)
    assert str(e.value) == (
        "1 of 4 records are invalid (25.0%, above --max-invalid-fraction 0.2); the first: "
        "l.jsonl:4: unknown label 'zzz': --labels allows a, b"
    )
    # at exactly the limit it is accepted: 1 of 4 is 0.25
    r = _run(tmp_path, "l.jsonl", labels=["a", "b"], skip_invalid=True, max_invalid_fraction=0.25)
    assert r.report["in"]["invalid"] == 1


# --- bounded memory ---------------------------------------------------------------------------------------------


def test_the_tokenizer_gets_batches_bounded_by_the_memory_budget(tmp_path, monkeypatch):
    # --max-memory-mb M: texts go to the tokenizer in batches of M * 1024 characters (tokenizing holds ~130 bytes a
    # character: a batch costs about a third of the budget); a longer document is cut into pieces that, joined, are
    # the document. Counting the tokens of dropped records flushes a batch once it reaches that size, so its last piece
    # may take it past the bound, never to twice it. Spy on the real encoder. 128 MB: 131,072 characters.
    from owngpt import tokenizer as T
    from owngpt.data import prepare as prepare_module

    real, batches = T.encode_batch, []

    def spy(enc, texts):
        batches.append(list(texts))
        return real(enc, texts)

    monkeypatch.setattr(prepare_module, "encode_batch", spy)  # where prepare looks it up
    doc = " ".join(f"w{i % 1000}" for i in range(200_000))  # about 1M characters, one document
    bound = 128 * 1024
    assert len(doc) > 4 * bound
    # the document twice: the second copy is dropped as a duplicate, and its tokens are counted for the report
    big = _write(tmp_path / "big.txt", doc + "\n\n" + doc + "\n")
    r = _run(tmp_path, big, val_fraction=0.0, max_memory_mb=128, doc_sep="blank")
    sizes = [sum(len(t) for t in b) for b in batches]
    k = next(i for i in range(len(sizes) + 1) if sum(sizes[:i]) >= len(doc))  # the written document's batches
    written, counted = batches[:k], batches[k:]
    assert "".join(t for b in written for t in b) == doc and max(sizes[:k]) <= bound and k >= 4
    assert "".join(t for b in counted for t in b) in (doc, doc + "\n") and max(sizes[k:]) < 2 * bound
    assert r.meta["splits"]["train"]["chars"] == len(doc) and r.report["rules"]["exact_duplicate"]["count"] == 1


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path
