"""Tests written to kill mutants that tools/mutate.py found surviving (docs/testing.md lists them)."""

from __future__ import annotations

import ast
import json
import re

import numpy as np
import pytest

import fixtures
from owngpt.config import TrainConfig
from owngpt.data.datadir import open_data_dir
from owngpt.data.privacy import id_checksum_ok, redact
from owngpt.errors import DataError
from owngpt.tasks.base import get_task


def test_an_lm_split_needs_exactly_block_size_plus_one_tokens(tmp_path):
    # kills tasks/lm `len(tokens) < block_size + 1` -> `<=` and `block_size + 1` -> `block_size - 1`
    data = open_data_dir(fixtures.write_lm_data_dir(tmp_path / "lm"))
    n_val = len(np.fromfile(tmp_path / "lm" / "val.bin", dtype=np.uint16))
    task = get_task("lm")(data, data.load_tokenizer(), TrainConfig(task="lm"), n_val - 1)
    (batch,) = [task.collate(task.eval_rows("val", 0), "val")]  # one window: T inputs and their T next tokens
    assert batch["input_ids"].shape == (1, n_val - 1)
    short = get_task("lm")(data, data.load_tokenizer(), TrainConfig(task="lm"), n_val)
    with pytest.raises(DataError, match=rf"val\.bin holds {n_val} tokens, fewer than block_size \+ 1 = {n_val + 1}"):
        short.eval_rows("val", 0)


def _lm_task(data, block_size: int, seed: int = 0):
    return get_task("lm")(data, data.load_tokenizer(), TrainConfig(task="lm", seed=seed), block_size)


def test_lm_rows_cover_every_offset_where_a_window_and_its_next_token_fit(tmp_path):
    # kills global_rows' `len - T` -> `len + T`, and a low bound of 1 (offset 0 never drawn)
    data = open_data_dir(fixtures.write_lm_data_dir(tmp_path / "lm"))
    n = len(np.fromfile(tmp_path / "lm" / "train.bin", dtype=np.uint16))
    T = 16
    task = _lm_task(data, T, seed=1)
    rows = [r for step in range(40) for r in task.global_rows(step, 500)]  # 20,000 offsets, seeded
    assert min(rows) == 0 and max(rows) == n - T - 1
    # an epoch is as many windows as cover the train tokens once, at least one
    assert task.num_train_examples() == n // T
    assert _lm_task(data, n - 1).num_train_examples() == 1


def test_lm_eval_blocks_written_out(tmp_path):
    # kills eval_rows' `(len - 1) // T` -> `(len + 1) // T` (a last window past the end)
    data = open_data_dir(fixtures.write_lm_data_dir(tmp_path / "lm"))
    n = len(np.fromfile(tmp_path / "lm" / "val.bin", dtype=np.uint16))
    for T in range(2, 41):
        task = _lm_task(data, T)
        k = max(i for i in range(n) if i * T + 1 <= n)  # the most blocks whose inputs and next tokens fit
        assert task.eval_rows("val", 0) == [i * T for i in range(k)], T
        capped = task.eval_rows("val", 3)
        assert len(capped) == min(3, k) and capped[0] == 0 and capped[-1] == (k - 1) * T  # spread, both ends kept


def test_full_width_at_signs_and_digits_are_read_as_ascii():
    # kills data/privacy's full-width map with '＠' (U+FF20) moved to another code point
    assert redact("mail a＠b.cn ok")[0] == "mail <EMAIL> ok"
    assert redact("tel １３９１２３４５６７８")[0] == "tel <PHONE>"


def _iso7064_check(body: str) -> str:
    """GB 11643's check character by ISO 7064 MOD 11-2, weights computed as 2^(17-i) mod 11 (not a table)."""
    total = sum(int(c) * pow(2, 17 - i, 11) for i, c in enumerate(body))
    return "10X98765432"[total % 11]


@pytest.mark.parametrize("body", ["11010519491231002", "44052418800101001", "37078219850724261", "51343619880101123"])
def test_id_checksum_is_iso_7064_mod_11_2(body):
    # kills a changed weight in id_checksum_ok (the standard example has a 0 where weight 10 applies)
    good = _iso7064_check(body)
    assert id_checksum_ok(body + good)
    assert not any(id_checksum_ok(body + c) for c in "0123456789X" if c != good)


def test_an_int8_checkpoint_missing_tensors_names_the_first_five(tiny_ckpt, tmp_path):
    # kills quantize's `left[:5]` -> `left[:6]`: the error names at most five missing tensors
    from safetensors.torch import load_file

    from owngpt.checkpoint import load_config
    from owngpt.errors import CheckpointError
    from owngpt.export import export
    from owngpt.quantize import build_quantized_model

    out = tmp_path / "int8"
    export(tiny_ckpt, out, "int8", measure_result=False)
    info = json.loads((out / "owngpt.json").read_text())["quantization"]
    tensors = load_file(str(out / "model.safetensors"))
    dropped = [k for k in tensors if k.endswith("ln_1.weight") or k.endswith("ln_2.weight") or "ln_f" in k]
    assert len(dropped) >= 6
    with pytest.raises(CheckpointError, match="lacks tensors") as e:
        build_quantized_model(load_config(out), {k: v for k, v in tensors.items() if k not in dropped}, info)
    named = re.search(r"lacks tensors (\[.*?\])", str(e.value)).group(1)
    assert len(ast.literal_eval(named)) == 5
