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
