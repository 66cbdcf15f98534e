"""The data dir's reading contract, written against the classes of mutants that survived in data/datadir (#25).

Every check `open_data_dir` makes, from both sides, on data dirs of the three tasks made by `owngpt prepare`: each
recorded file missing, resized or changed; the counts meta.json records; the index, mask and label files; meta.json's
own fields; the accessors' answers on empty and missing splits; the writers' bytes. Oracles: hashlib and os.walk
over the files, numpy reading the files back, json.dumps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from owngpt.data import datadir
from owngpt.data.datadir import RaggedWriter, file_records, open_data_dir, write_json
from owngpt.data.prepare import PrepareConfig, prepare
from owngpt.errors import DataError


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One small data dir per task, made by prepare (char tokenizer): copy before editing."""
    base = tmp_path_factory.mktemp("datadirs")
    inputs = {
        "lm": ("a.txt", "\n\n".join(f"document {i} 文" for i in range(8)) + "\n", dict(doc_sep="blank")),
        "chat": (
            "c.jsonl",
            "".join(
                json.dumps(
                    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                )
                + "\n"
                for i in range(8)
            ),
            {},
        ),
        "classify": (
            "l.jsonl",
            "".join(json.dumps({"text": f"t {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)),
            {},
        ),
    }
    out = {}
    for task, (name, content, kw) in inputs.items():
        (base / name).write_text(content, encoding="utf-8")
        cfg = PrepareConfig(
            sources=[str(base / name)], out=str(base / task), tokenizer="char", val_fraction=0.25, progress=False,
            quiet=True, **kw,
        )  # fmt: skip
        out[task] = prepare(cfg).out
    return out


def _copy(made, task, tmp_path, files=True) -> Path:
    d = tmp_path / task
    shutil.copytree(made[task], d)
    if not files:  # a data dir written before meta.json recorded its files: only the count checks apply
        _edit_meta(d, lambda m: m.pop("files"))
    return d


def _edit_meta(d: Path, change) -> None:
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    change(meta)
    (d / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def _refused(d: Path, starts: str, **kw) -> str:
    with pytest.raises(DataError) as e:
        open_data_dir(d, **kw)
    assert str(e.value).startswith(starts), str(e.value)
    return str(e.value)


# --- meta["files"]: presence, size, hash --------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["lm", "chat", "classify"])
def test_file_records_are_every_file_below_but_meta_report_and_hidden_ones(made, task, tmp_path):
    d = _copy(made, task, tmp_path)
    (d / ".scratch").write_bytes(b"left by an editor")  # hidden at the top: not part of the data
    want = {}
    for root, _, names in os.walk(d):
        for n in names:
            rel = (Path(root) / n).relative_to(d).as_posix()
            if rel not in ("meta.json", "report.json") and not rel.startswith("."):
                data = (Path(root) / n).read_bytes()
                want[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert file_records(d) == want
    assert want == json.loads((d / "meta.json").read_text(encoding="utf-8"))["files"]
    assert any(rel.startswith("tokenizer/") for rel in want) and {"meta.json", "report.json"} <= set(os.listdir(d))
    assert sorted(file_records(d)) == list(file_records(d))  # sorted: the same meta.json on every machine


@pytest.mark.parametrize("task", ["lm", "chat", "classify"])
def test_every_recorded_file_is_checked_for_presence_size_and_content(made, task, tmp_path):
    d = _copy(made, task, tmp_path)
    open_data_dir(d).verify(hashes=True)
    recorded = json.loads((d / "meta.json").read_text(encoding="utf-8"))["files"]
    assert len(recorded) >= 4
    for rel, rec in recorded.items():
        f = d / rel
        original = f.read_bytes()
        f.unlink()
        _refused(d, f"{f} is missing; ")
        f.write_bytes(original + b"\n")
        _refused(d, f"{f} has {rec['bytes'] + 1} bytes where meta.json records {rec['bytes']}; ")
        changed = original[:-1] + bytes([original[-1] ^ 1])
        f.write_bytes(changed)
        _refused(d, f"{f}: its SHA-256 differs from the one meta.json records; ")
        open_data_dir(d, verify=False)  # not checked when not asked
        f.write_bytes(original)
    open_data_dir(d)


def test_hashes_are_checked_while_the_dir_is_small_and_always_when_asked(made, tmp_path, monkeypatch):
    d = _copy(made, "classify", tmp_path)
    total = sum(r["bytes"] for r in json.loads((d / "meta.json").read_text(encoding="utf-8"))["files"].values())
    f = d / "train.jsonl"
    data = f.read_bytes()
    f.write_bytes(data.replace(b"t 0", b"t 9", 1))  # same size, other content
    monkeypatch.setattr(datadir, "HASH_CHECK_MAX_BYTES", total)  # at the bound: still hashed
    _refused(d, f"{f}: its SHA-256 differs")
    monkeypatch.setattr(datadir, "HASH_CHECK_MAX_BYTES", total - 1)  # past it: sizes only
    open_data_dir(d)
    with pytest.raises(DataError, match="SHA-256 differs"):
        open_data_dir(d, verify=False).verify(hashes=True)
    monkeypatch.setattr(datadir, "HASH_CHECK_MAX_BYTES", 1 << 40)
    open_data_dir(d, verify=False).verify(hashes=False)


def test_meta_files_must_be_an_object(made, tmp_path):
    d = _copy(made, "lm", tmp_path)
    _edit_meta(d, lambda m: m.update(files=["train.bin"]))
    _refused(d, f"{d / 'meta.json'}: 'files' must be an object; ")


# --- the counts meta.json records (checked in every dir, with or without "files") ----------------------------------


def test_lm_token_files_must_hold_the_recorded_counts_of_whole_ids(made, tmp_path):
    d = _copy(made, "lm", tmp_path, files=False)
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    n = meta["splits"]["val"]["tokens"]
    assert n == len(np.fromfile(d / "val.bin", dtype=meta["dtype"])) > 0
    with open(d / "val.bin", "ab") as f:
        f.write(b"\x00")
    _refused(d, f"{d / 'val.bin'} has {2 * n + 1} bytes, not a whole number of 2-byte token ids")
    with open(d / "val.bin", "ab") as f:
        f.write(b"\x00")
    _refused(d, f"{d / 'val.bin'} holds {n + 1} items where meta.json records {n} (cut short?)")
    # a count that is not a count (a bool, negative, text) is read as unknown: only whole ids are required
    for unknown in (True, -1, "7"):
        _edit_meta(d, lambda m, u=unknown: m["splits"]["val"].update(tokens=u))
        open_data_dir(d)
    # a missing split file is left to the reader that needs it
    (d / "val.bin").unlink()
    data = open_data_dir(d)
    with pytest.raises(DataError, match=r"val\.bin is missing: the data dir is incomplete"):
        data.tokens("val")


@pytest.mark.parametrize("task", ["chat", "classify"])
def test_an_index_must_index_its_ids_as_meta_json_describes(made, task, tmp_path):
    d = _copy(made, task, tmp_path, files=False)
    idx_f, ids_f = d / "train.idx.npy", d / "train.ids.bin"
    good = np.load(idx_f)
    n_ids, n_ex = int(good[-1]), len(good) - 1
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    assert (meta["splits"]["train"]["tokens"], meta["splits"]["train"]["examples"]) == (n_ids, n_ex)
    bad_index = f"{idx_f} does not index train.ids.bin as meta.json describes; "
    for bad in (
        np.concatenate([[1], good[1:]]),  # does not start at 0
        np.concatenate([good[:-1], [n_ids + 1]]),  # does not end at the ids' end
        np.concatenate([good[:-1], [n_ids - 1]]),
        good.reshape(1, -1),  # not one-dimensional
        good.astype(np.float64),  # not integers
        np.zeros(0, dtype=np.int64),  # not even the leading 0
        np.concatenate([good[:1], good]),  # one example more than meta.json records
    ):
        np.save(idx_f, bad)
        _refused(d, bad_index)
    np.save(idx_f, good[:, None].astype(np.int32).ravel())  # any integer type with the right values is fine
    open_data_dir(d)
    idx_f.write_bytes(b"not an npy file")
    _refused(d, f"{idx_f} is not a readable .npy file (")
    np.save(idx_f, good)
    # the example count is checked only when meta.json records one
    _edit_meta(d, lambda m: m["splits"]["train"].pop("examples"))
    np.save(idx_f, np.concatenate([good[:1], good]))
    if task == "classify":  # one label per example
        labels = np.load(d / "train.labels.npy")
        np.save(d / "train.labels.npy", np.concatenate([labels[:1], labels]))
    open_data_dir(d)
    np.save(idx_f, good)
    # ids: whole ids, the recorded count
    with open(ids_f, "ab") as f:
        f.write(b"\x00\x00")
    _refused(d, f"{ids_f} holds {n_ids + 1} items where meta.json records {n_ids}")


def test_a_chat_mask_has_one_byte_per_token(made, tmp_path):
    d = _copy(made, "chat", tmp_path, files=False)
    mask_f = d / "val.mask.bin"
    n = len(np.fromfile(d / "val.ids.bin", dtype=np.uint16))
    assert mask_f.stat().st_size == n > 0
    with open(mask_f, "ab") as f:
        f.write(b"\x01")
    _refused(d, f"{mask_f} holds {n + 1} items where meta.json records {n}")
    mask_f.write_bytes(mask_f.read_bytes()[: n - 1])
    _refused(d, f"{mask_f} holds {n - 1} items where meta.json records {n}")


def test_classify_labels_have_one_int_per_example(made, tmp_path):
    d = _copy(made, "classify", tmp_path, files=False)
    labels_f = d / "val.labels.npy"
    good = np.load(labels_f)
    n = len(np.load(d / "val.idx.npy")) - 1
    assert good.shape == (n,) and n > 0
    np.save(labels_f, np.concatenate([good, good[:1]]))
    _refused(d, f"{labels_f} has ({n + 1},) labels for {n} examples; ")
    np.save(labels_f, good.reshape(1, -1))
    _refused(d, f"{labels_f} has (1, {n}) labels for {n} examples; ")
    labels_f.write_bytes(b"garbage")
    _refused(d, f"{labels_f} is not a readable .npy file (")
    np.save(labels_f, good)
    assert open_data_dir(d).label_ids("val").tolist() == good.tolist()


# --- meta.json itself -------------------------------------------------------------------------------------------


META_CASES = [
    (lambda m: m.update(format="other"), "format 'other' v1 is not one this owngpt reads (owngpt-data v1)"),
    (lambda m: m.update(version=2), "format 'owngpt-data' v2 is not one this owngpt reads"),
    (lambda m: m.update(version="1"), "format 'owngpt-data' v1 is not one this owngpt reads"),
    (lambda m: m.update(task="translate"), "unknown task 'translate'; expected one of lm, chat, classify"),
    (lambda m: m.pop("task"), "unknown task None"),
    (lambda m: m["tokenizer"].update(vocab_size=0), "no valid tokenizer.vocab_size"),
    (lambda m: m["tokenizer"].update(vocab_size="300"), "no valid tokenizer.vocab_size"),
    (lambda m: m.update(tokenizer=[1]), "no valid tokenizer.vocab_size"),
    (lambda m: m.update(dtype="int64"), "dtype 'int64' is not uint16 or uint32"),
    (lambda m: m.update(dtype=None), "dtype None is not uint16 or uint32"),
    (lambda m: m.update(dtype=[1, 2]), "dtype [1, 2] is not uint16 or uint32"),
    (lambda m: m.update(splits=[]), "'splits' must be an object"),
]


@pytest.mark.parametrize("case", range(len(META_CASES)))
def test_each_meta_json_field_is_checked_and_named(made, tmp_path, case):
    change, message = META_CASES[case]
    d = _copy(made, "lm", tmp_path)
    _edit_meta(d, change)
    _refused(d, f"{d / 'meta.json'}: {message}")


def test_what_is_not_a_data_dir_is_named(made, tmp_path):
    _refused(tmp_path / "nowhere", f"{tmp_path / 'nowhere'} is not a directory: pass the --out of `owngpt prepare`")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", f"{tmp_path / 'empty'} has no meta.json: it is not a data dir")
    d = _copy(made, "lm", tmp_path)
    (d / "meta.json").write_text("{not json", encoding="utf-8")
    _refused(d, f"{d / 'meta.json'} is unreadable (")
    (d / "meta.json").write_text("[1, 2]", encoding="utf-8")
    _refused(d, f"{d / 'meta.json'} is not a JSON object")
    # the smallest vocabulary meta.json may record is one token (its ids are checked against it on verify)
    d1 = _copy(made, "lm", tmp_path / "one-token")
    _edit_meta(d1, lambda m: m["tokenizer"].update(vocab_size=1))
    assert open_data_dir(d1, verify=False).vocab_size == 1
    # version 0 (written before the field existed) and the current version are read
    for version in (0, datadir.VERSION):
        d2 = _copy(made, "chat", tmp_path / f"v{version}")
        _edit_meta(d2, lambda m, v=version: m.update(version=v))
        assert open_data_dir(d2).task == "chat"


# --- the accessors --------------------------------------------------------------------------------------------------


def test_accessors_read_what_the_files_hold_and_name_the_task_they_need(made, tmp_path):
    lm, chat, cls = (open_data_dir(made[t]) for t in ("lm", "chat", "classify"))
    assert (lm.task, chat.task, cls.task) == ("lm", "chat", "classify")
    assert lm.dtype == np.dtype(np.uint16) and lm.vocab_size == len(lm.load_tokenizer())
    assert cls.labels == ["a", "b"] and lm.labels == [] and chat.labels == []
    assert lm.tokenizer_path == made["lm"] / "tokenizer"
    for d in (lm, chat, cls):
        assert d.has_split("train") and d.has_split("val") and not d.has_split("test")
    # the flat stream and the ragged arrays are the files' contents
    assert lm.tokens("val").tolist() == np.fromfile(made["lm"] / "val.bin", dtype=np.uint16).tolist()
    ids, offsets, mask = chat.ragged("train")
    assert ids.tolist() == np.fromfile(made["chat"] / "train.ids.bin", dtype=np.uint16).tolist()
    assert offsets.tolist() == np.load(made["chat"] / "train.idx.npy").tolist()
    assert mask.tolist() == np.fromfile(made["chat"] / "train.mask.bin", dtype=np.uint8).tolist()
    assert cls.ragged("train")[2] is None  # classify has no mask
    recs = list(cls.records("val"))
    assert recs == [json.loads(line) for line in open(made["classify"] / "val.jsonl", encoding="utf-8")]
    assert [cls.labels[i] for i in cls.label_ids("val")] == [r["label"] for r in recs]
    assert list(cls.records("test")) == []
    # each accessor names the task it needs and the flag that makes it
    with pytest.raises(DataError) as e:
        chat.tokens("train")
    assert str(e.value) == (
        f"{made['chat']} holds 'chat' data, but this needs lm data: prepare it with `owngpt prepare ... --task lm`"
    )
    with pytest.raises(DataError) as e:
        lm.ragged("train")
    assert str(e.value).endswith("needs chat or classify data: prepare it with `owngpt prepare ... --task chat`")
    with pytest.raises(DataError, match="needs classify data"):
        chat.label_ids("train")


def test_empty_and_missing_splits(made, tmp_path):
    d = _copy(made, "lm", tmp_path, files=False)
    (d / "val.bin").write_bytes(b"")
    _edit_meta(d, lambda m: m["splits"]["val"].update(tokens=0, documents=0))
    data = open_data_dir(d)
    empty = data.tokens("val")
    assert empty.dtype == np.uint16 and empty.shape == (0,)
    assert not data.has_split("val") and data.has_split("train")
    c = _copy(made, "classify", tmp_path, files=False)
    _edit_meta(c, lambda m: m["splits"]["val"].update(examples=0))
    assert not open_data_dir(c, verify=False).has_split("val")
    _edit_meta(c, lambda m: m["splits"]["val"].pop("examples"))
    assert not open_data_dir(c, verify=False).has_split("val")  # no count recorded: nothing to read
    _edit_meta(c, lambda m: m["splits"]["val"].update(examples=1))
    assert open_data_dir(c, verify=False).has_split("val")  # one example is a split
    _edit_meta(c, lambda m: m["splits"]["val"].pop("examples"))
    (c / "val.idx.npy").unlink()
    data = open_data_dir(c)  # a split without its index is left to the reader that needs it
    with pytest.raises(DataError, match=r"val\.idx\.npy is missing: the data dir is incomplete"):
        data.ragged("val")
    (c / "train.ids.bin").unlink()
    _edit_meta(c, lambda m: m["splits"]["train"].pop("tokens"))
    np.save(c / "train.idx.npy", np.zeros(1, dtype=np.int64))
    _edit_meta(c, lambda m: m["splits"]["train"].pop("examples"))
    np.save(c / "train.labels.npy", np.zeros(0, dtype=np.int64))
    ids, offsets, mask = open_data_dir(c).ragged("train")
    assert ids.shape == (0,) and ids.dtype == np.uint16 and offsets.tolist() == [0] and mask is None


# --- the writers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [True, False])
def test_a_ragged_writer_writes_exactly_the_rows_it_is_given(tmp_path, with_mask):
    rows = [[5, 6, 7], [], [65535], list(range(40))]
    masks = [[1, 0, 1], [], [1], [i % 2 for i in range(40)]]
    w = RaggedWriter(tmp_path, "train", np.uint16, with_mask=with_mask)
    for r, m in zip(rows, masks):
        w.add(r, m if with_mask else None)
    assert w.close() == len(rows)
    assert np.fromfile(tmp_path / "train.ids.bin", dtype=np.uint16).tolist() == [t for r in rows for t in r]
    offsets = np.load(tmp_path / "train.idx.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, 3, 3, 4, 44]
    if with_mask:
        assert np.fromfile(tmp_path / "train.mask.bin", dtype=np.uint8).tolist() == [t for m in masks for t in m]
    else:
        assert not (tmp_path / "train.mask.bin").exists()


def test_a_ragged_writer_refuses_a_mask_of_another_length(tmp_path):
    w = RaggedWriter(tmp_path, "val", np.uint32, with_mask=True)
    with pytest.raises(ValueError, match="mask and ids differ in length"):
        w.add([1, 2, 3], [1, 1])
    w.close()


def test_write_json_writes_readable_utf8_with_a_final_newline_and_no_temp_file(tmp_path):
    obj = {"名字": "数据", "n": [1, 2], "nested": {"a": None}}
    write_json(tmp_path / "x.json", obj)
    assert (tmp_path / "x.json").read_bytes() == (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode()
    assert os.listdir(tmp_path) == ["x.json"]
    write_json(tmp_path / "x.json", {"replaced": True})  # over an existing file
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == {"replaced": True}
