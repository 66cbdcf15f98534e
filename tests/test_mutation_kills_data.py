"""Tests written to kill mutants of owngpt.data.* that tools/mutate.py found surviving (docs/testing.md lists them).

Oracles: numpy's own integer ranges, the data dir's files edited by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fixtures
from owngpt.data.datadir import open_data_dir, token_dtype
from owngpt.errors import DataError


@pytest.mark.parametrize("vocab", [2, 255, 65535, 65536, 65537, 100_000, 2**31])
def test_token_dtype_is_the_smallest_that_holds_every_id(vocab):
    # ids are 0 .. vocab - 1; kills `vocab_size <= 65536` -> `<= 65537` (id 65536 wrapped to 0 in uint16)
    dt = token_dtype(vocab)
    assert np.iinfo(dt).max >= vocab - 1
    assert dt == (np.uint16 if vocab - 1 <= np.iinfo(np.uint16).max else np.uint32)


def _lm(tmp_path):
    path = fixtures.write_lm_data_dir(tmp_path / "lm")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    return path, meta


def test_a_token_id_equal_to_the_vocab_size_is_refused(tmp_path):
    # an id past the last embedding row; kills `top >= vocab_size` -> `>`
    path, meta = _lm(tmp_path)
    vocab = meta["tokenizer"]["vocab_size"]
    ids = np.fromfile(path / "train.bin", dtype=np.uint16)
    ids[5] = vocab - 1  # the last id is fine
    ids.tofile(path / "train.bin")
    open_data_dir(path)
    ids[5] = vocab
    ids.tofile(path / "train.bin")
    with pytest.raises(DataError, match=rf"train\.bin holds token id {vocab}, but the tokenizer has {vocab} tokens"):
        open_data_dir(path)


def test_a_split_recorded_with_zero_tokens_must_be_empty(tmp_path):
    # meta.json's count 0 is a count like any other (not "unknown"); kills `v >= 0` -> `v >= 1` in the count reader
    path, meta = _lm(tmp_path)
    n = len(np.fromfile(path / "val.bin", dtype=np.uint16))
    meta["splits"]["val"]["tokens"] = 0
    (path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(DataError, match=rf"val\.bin holds {n} items where meta\.json records 0"):
        open_data_dir(path)


def test_a_chat_token_id_past_the_vocabulary_is_refused(tmp_path):
    # kills _verify_ragged's `self._verify_ids(ids_f)` dropped (chat and classify dirs were never checked)
    from train_helpers import write_chat_data_dir

    path = write_chat_data_dir(tmp_path / "chat", 2, 1)
    vocab = json.loads((path / "meta.json").read_text(encoding="utf-8"))["tokenizer"]["vocab_size"]
    ids = np.fromfile(path / "train.ids.bin", dtype=np.uint16)
    ids[3] = vocab
    ids.tofile(path / "train.ids.bin")
    with pytest.raises(DataError, match=rf"train\.ids\.bin holds token id {vocab}"):
        open_data_dir(path)


def test_only_a_classify_dir_has_its_labels_checked(tmp_path):
    # a file that is not part of a chat dir's format is not read as one (kills `task == "classify" and exists` -> or)
    from train_helpers import write_chat_data_dir

    path = write_chat_data_dir(tmp_path / "chat", 2, 1)
    np.save(path / "train.labels.npy", np.zeros(7, dtype=np.int64))  # a stray file of the wrong shape
    assert open_data_dir(path).task == "chat"
    # in a classify dir the same file is refused
    cls = fixtures.write_classify_data_dir(tmp_path / "cls", [("a", "x"), ("b", "y")], [("c", "x")])
    np.save(cls / "train.labels.npy", np.zeros(7, dtype=np.int64))
    with pytest.raises(DataError, match=r"train\.labels\.npy has \(7,\) labels for 2 examples"):
        open_data_dir(cls)


def test_label_ids_of_a_language_modelling_dir_name_the_task_needed(tmp_path):
    # kills label_ids' `self._expect("classify")` dropped (a FileNotFoundError traceback instead)
    path, _ = _lm(tmp_path)
    with pytest.raises(DataError, match="holds 'lm' data, but this needs classify data"):
        open_data_dir(path).label_ids("train")


# --- data/prepare ---------------------------------------------------------------------------------------------------


def _prepare(tmp_path, name, content, sources_override=None, **kw):
    from owngpt.data.prepare import PrepareConfig, prepare

    if sources_override:
        sources = [str(s) for s in sources_override]
    else:
        (tmp_path / name).write_text(content, encoding="utf-8")
        sources = [str(tmp_path / name)]
    kw.setdefault("tokenizer", "char")
    cfg = PrepareConfig(sources=sources, out=str(tmp_path / "out"), progress=False, quiet=True, **kw)
    return prepare(cfg)


def test_lm_meta_counts_are_the_counts_of_the_token_files(tmp_path):
    # oracle: the .bin files read back (each document ends with one end-of-text). Kills the chars count starting at 1
    # in the LM writer.
    docs = "\n\n".join(f"document number {i} has some words" for i in range(12)) + "\n"
    r = _prepare(tmp_path, "a.txt", docs, val_fraction=0.25, doc_sep="blank")
    meta = json.loads((r.out / "meta.json").read_text(encoding="utf-8"))
    eos = meta["tokenizer"]["eos_token_id"]
    tok = open_data_dir(r.out).load_tokenizer()
    total = 0
    for split in ("train", "val"):
        ids = np.fromfile(r.out / f"{split}.bin", dtype=meta["dtype"])
        assert meta["splits"][split]["tokens"] == len(ids)
        assert meta["splits"][split]["documents"] == int((ids == eos).sum()) > 0
        ends = np.flatnonzero(ids == eos)
        texts = [tok.decode(ids[a + 1 if k else 0 : b].tolist()) for k, (a, b) in enumerate(zip([0, *ends], ends))]
        assert meta["splits"][split]["chars"] == sum(len(t) for t in texts)
        total += meta["splits"][split]["documents"]
    assert total == 12


def test_chat_meta_counts_are_the_counts_of_the_ragged_files(tmp_path):
    # kills the chat writer's `tokens -=` and `chars -=`
    from owngpt.chat_format import render_text

    convs = [
        {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"hi there {i}"}]}
        for i in range(10)
    ]
    r = _prepare(tmp_path, "c.jsonl", "\n".join(json.dumps(c) for c in convs) + "\n", val_fraction=0.2)
    meta = json.loads((r.out / "meta.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):
        ids = np.fromfile(r.out / f"{split}.ids.bin", dtype=meta["dtype"])
        mask = np.fromfile(r.out / f"{split}.mask.bin", dtype=np.uint8)
        idx = np.load(r.out / f"{split}.idx.npy")
        st = meta["splits"][split]
        assert (st["examples"], st["tokens"], st["assistant_tokens"]) == (len(idx) - 1, len(ids), int(mask.sum()))
        # chars: the conversations written out as text (chat_format.render_text), read back from the jsonl
        recs = [json.loads(line) for line in open(r.out / f"{split}.jsonl", encoding="utf-8") if line.strip()]
        assert st["chars"] == sum(len(render_text(x["messages"])) for x in recs) > 0


def test_classify_meta_and_report_count_examples_and_every_label(tmp_path):
    # kills the classify writer's chars count starting at 1, and a label never seen reported as 1
    rows = "\n".join(json.dumps({"text": f"text {i}", "label": ("a", "b")[i % 2]}) for i in range(10))
    r = _prepare(tmp_path, "l.jsonl", rows + "\n", labels=["a", "b", "never"], val_fraction=0.2)
    meta = json.loads((r.out / "meta.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):
        recs = [json.loads(line) for line in open(r.out / f"{split}.jsonl", encoding="utf-8") if line.strip()]
        assert meta["splits"][split]["examples"] == len(recs) == len(np.load(r.out / f"{split}.labels.npy"))
        assert meta["splits"][split]["chars"] == sum(len(x["text"]) for x in recs)
    assert r.report["labels"] == {"a": 5, "b": 5, "never": 0}


def test_a_chat_export_is_recorded_with_its_size_and_checksum(tmp_path):
    # meta.json's inputs name each file read with its size and SHA-256 (computed here with hashlib). Chat exports are
    # read by their own reader, so prepare checksums them itself: kills its byte count starting at 1.
    import hashlib

    export = tmp_path / "WhatsApp Chat with Wang Wei.txt"
    export.write_text(
        "".join(f"01/02/2024, 10:{m:02d} - {who}: line {m}\n" for m in range(12) for who in ("Wang Wei", "Zhang San")),
        encoding="utf-8",
    )
    r = _prepare(tmp_path, "", "", source_format="whatsapp", me="Zhang San", sources_override=[export])
    (rec,) = json.loads((r.out / "meta.json").read_text(encoding="utf-8"))["inputs"]
    data = export.read_bytes()
    assert (rec["bytes"], rec["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


# --- data/privacy ---------------------------------------------------------------------------------------------------


def test_full_width_letters_are_read_as_their_ascii_letters():
    # oracle: unicodedata's NFKC maps each full-width letter to its ASCII letter; an address written in full-width
    # letters (any of the 52) is redacted like the ASCII one. Kills data/privacy's map `ord("A") + i` -> `- i`.
    import string
    import unicodedata

    from owngpt.data.privacy import redact

    for c in string.ascii_letters:
        wide = chr(ord(c) - 0x21 + 0xFF01)
        assert unicodedata.normalize("NFKC", wide) == c
        text = f"mail {wide * 3}＠{wide}x.com ok"
        assert redact(text)[0] == "mail <EMAIL> ok", (c, redact(text)[0])


@pytest.mark.parametrize("region", ["SH", "FK", "SB", "VU"])
def test_a_five_digit_local_phone_number_is_redacted_in_its_region(region):
    # oracle: libphonenumber's own example number of the region, five digits long (the rule skips texts with fewer
    # than five digits: no phone number is shorter). Kills `digits < 5` -> `<= 5`.
    import phonenumbers

    from owngpt.data.privacy import redact

    number = str(phonenumbers.example_number(region).national_number)
    assert len(number) == 5
    text, counts = redact(f"call {number} now", region=region)
    assert (text, counts["PHONE"]) == ("call <PHONE> now", 1)


def test_im_ids_are_counted_once_each():
    # the report counts each redaction (kills the IM count's `+=` -> `-=`)
    from owngpt.data.privacy import redact

    text, counts = redact("qq: 12345678, wechat: abc_123, wechat tomorrow")
    assert "12345678" not in text and "abc_123" not in text and "tomorrow" in text
    assert counts["IM"] == 2


def test_a_one_letter_name_is_pseudonymized_as_a_whole_word():
    # kills Pseudonymizer.apply's boundary test on the name's second character (`n[0]` -> `n[1]`: IndexError for a
    # one-letter name, and no left boundary for "x王Wei"-like names)
    from owngpt.data.privacy import Pseudonymizer

    p = Pseudonymizer()
    assert p.name("K") == "Person 1" and p.name("王Wei") == "Person 2"
    assert p.apply("K: OK, ask K.") == "Person 1: OK, ask Person 1."
    assert p.apply("x王Wei and Wei") == "xPerson 2 and Wei"  # a CJK start needs no word boundary on its left


# --- fresh sample (seed 1) of data/datadir --------------------------------------------------------------------------


def test_a_ragged_writer_has_written_everything_when_close_returns(tmp_path):
    # kills RaggedWriter.close's `self._ids.close()` dropped (a few small arrays stay in the file's buffer)
    from owngpt.data.datadir import RaggedWriter

    w = RaggedWriter(tmp_path, "train", np.uint16, with_mask=True)
    rows = [[1, 2, 3], [4], [5, 6]]
    for r in rows:
        w.add(r, [1] * len(r))
    assert w.close() == 3
    assert np.fromfile(tmp_path / "train.ids.bin", dtype=np.uint16).tolist() == [1, 2, 3, 4, 5, 6]
    assert np.fromfile(tmp_path / "train.mask.bin", dtype=np.uint8).tolist() == [1] * 6
    assert np.load(tmp_path / "train.idx.npy").tolist() == [0, 3, 4, 6]


def test_a_missing_ids_file_is_refused_as_holding_no_tokens(tmp_path):
    # a missing ids file holds no tokens, which its index contradicts. Kills _verify_size's size of a missing file
    # `0` -> `1` (refused for the wrong reason: "not a whole number of token ids")
    from train_helpers import write_chat_data_dir

    path = write_chat_data_dir(tmp_path / "chat", 2, 1)
    (path / "train.ids.bin").unlink()
    with pytest.raises(DataError, match=r"train\.idx\.npy does not index train\.ids\.bin"):
        open_data_dir(path)


def test_index_and_label_files_are_never_unpickled(tmp_path):
    # owngpt never unpickles user files: an .npy holding pickled objects is refused even when the dir is opened
    # without verification. Kills `allow_pickle=False` -> True in ragged() and label_ids().
    cls = fixtures.write_classify_data_dir(tmp_path / "cls", [("a", "x"), ("b", "y")], [("c", "x")])
    data = open_data_dir(cls, verify=False)
    np.save(cls / "train.idx.npy", np.array([0, {"pickled": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        data.ragged("train")
    np.save(cls / "train.labels.npy", np.array([0, {"pickled": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        data.label_ids("train")


def test_prepare_bounds_are_inclusive_where_documented_and_mixed_tasks_refused(tmp_path):
    # --max-invalid-fraction accepts [0, 1] (kills the upper bound `<= 1` -> `<= 2`); files that infer two different
    # tasks are refused (kills `len(tasks) > 1` -> `> 2`)
    from owngpt.data.prepare import PrepareConfig, validate
    from owngpt.errors import ConfigError

    def cfg(**kw):
        return PrepareConfig(sources=["x"], out=str(tmp_path / "o"), **kw)

    validate(cfg(max_invalid_fraction=1.0))
    with pytest.raises(ConfigError, match="--max-invalid-fraction 1.5"):
        validate(cfg(max_invalid_fraction=1.5))
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "l.jsonl").write_text(json.dumps({"text": "hi", "label": "a"}) + "\n")
    with pytest.raises(
        ConfigError, match=r"the inputs hold different kinds of data \(.*c\.jsonl: chat; .*l\.jsonl: classify\)"
    ):
        _prepare(tmp_path, "", "", sources_override=[tmp_path / "c.jsonl", tmp_path / "l.jsonl"])


def test_a_gpt2_dir_tokenizer_reads_the_vocab_and_merges_in_that_dir(tmp_path):
    # `--tokenizer gpt2:DIR` takes DIR/vocab.json and DIR/merges.txt. A small GPT-2-format pair (the 256 byte
    # characters, end-of-text and a few merges of our own) must be the tokenizer written, not the bundled GPT-2
    # vocabulary: oracle, owngpt.tokenizer.gpt2_tokenizer on the two files named explicitly. Kills the vocabulary's
    # default `vocab or DIR/vocab.json` -> `vocab and ...` (the bundled vocab.json with DIR's merges).
    from tokenizers import pre_tokenizers

    from owngpt.tokenizer import gpt2_tokenizer

    d = tmp_path / "mybpe"
    d.mkdir()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("o", "r"), ("Ġ", "w"), ("Ġw", "or")]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    text = "the words of the world\n\nthe other words\n"
    r = _prepare(tmp_path, "a.txt", text, tokenizer=f"gpt2:{d}", val_fraction=0.0, doc_sep="blank")
    written = open_data_dir(r.out).load_tokenizer()
    expected = gpt2_tokenizer(d / "vocab.json", d / "merges.txt")
    assert len(written) == len(expected) < 300  # not GPT-2's 50,257
    probe = " the world of words"
    assert written.encode(probe, add_special_tokens=False) == expected.encode(probe, add_special_tokens=False)
    meta = json.loads((r.out / "meta.json").read_text(encoding="utf-8"))
    assert "vocab.json" in meta["tokenizer"]["source"] and "bundled" not in meta["tokenizer"]["source"]


def test_prepare_closes_every_file_it_writes(tmp_path):
    # A file left open is flushed only when the garbage collector gets to it (CPython: at once; PyPy, or a reference
    # kept by a traceback: later, after meta.json says the split is written). Python reports it as a ResourceWarning
    # when the object dies. Kills the classify writer's `jsonl[s].close()` dropped. (Only the files prepare writes
    # into the data dir are checked.)
    import gc
    import warnings

    rows = "\n".join(json.dumps({"text": f"text {i}", "label": ("a", "b")[i % 2]}) for i in range(10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        _prepare(tmp_path, "l.jsonl", rows + "\n", val_fraction=0.2)
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not [m for m in unclosed if ".jsonl" in m or ".bin" in m or ".labels" in m], unclosed


def test_the_bpe_trainer_reads_a_long_document_in_bounded_pieces(tmp_path, monkeypatch):
    # The byte-level BPE trainer holds each text it pre-tokenizes in memory many times over, so prepare hands it a long
    # document in pieces of at most 4,096 characters at the smallest memory budget; the pieces, joined, are the
    # document (oracle: the text written). Kills the piece size `chunk_chars // 16` -> `* 16` (one 20,000-character
    # piece). The trainer itself is the real one, given the pieces the spy saw.
    from owngpt import tokenizer as T

    real, seen = T.train_bpe, []

    def spy(texts, **kw):
        seen.extend(texts)
        return real(iter(seen), **kw)

    monkeypatch.setattr(T, "train_bpe", spy)
    words = " ".join(f"word{i % 97} and more{i % 13}" for i in range(1200)) + "\n"
    assert len(words) > 20_000
    _prepare(tmp_path, "a.txt", words, tokenizer="bpe", vocab_size=300, val_fraction=0.0, max_memory_mb=16)
    assert max(len(t) for t in seen) <= 4096 and len(seen) >= 5
    assert "".join(seen).strip() == words.strip()
