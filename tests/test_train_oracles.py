"""The training loop checked against oracles that share none of its code: the raw token file, a loss written out here,
`owngpt eval`, the schedule's formula written out here, and early stopping replayed from the metrics log.

Each test names the one-line bug it was seen to catch (planted, run, reverted; see docs/testing.md).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import quick_cfg

from owngpt.cli import main
from owngpt.config import TrainConfig
from owngpt.data.datadir import open_data_dir
from owngpt.tasks.base import get_task
from owngpt.train import lr_at, train


def raw_tokens(data_dir, split: str) -> np.ndarray:
    """The split's tokens read straight from the file (dtype from meta.json), not through owngpt's reader."""
    meta = json.loads((data_dir / "meta.json").read_text())
    return np.fromfile(data_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]))


def log_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lm_batches_are_windows_of_the_raw_token_file_shifted_by_one(tiny_lm_data):
    # catches: labels = chunk[:, :-1] (the model learns to copy its input), or inputs shifted the wrong way
    data = open_data_dir(tiny_lm_data)
    T = 16
    task = get_task("lm")(data, data.load_tokenizer(), TrainConfig(task="lm", seed=5), T)
    raw = raw_tokens(tiny_lm_data, "train").astype(np.int64)
    rows = task.global_rows(3, 6)
    assert all(0 <= r <= len(raw) - T - 1 for r in rows)  # every window and its next token fit
    batch = task.collate(rows)
    for b, r in enumerate(rows):
        assert batch["input_ids"][b].tolist() == raw[r : r + T].tolist()
        assert batch["labels"][b].tolist() == raw[r + 1 : r + T + 1].tolist()
    val = raw_tokens(tiny_lm_data, "val").astype(np.int64)
    vb = task.collate(task.eval_rows("val", 0), "val")
    assert vb["input_ids"][0].tolist() == val[:T].tolist() and vb["labels"][0].tolist() == val[1 : T + 1].tolist()


def test_val_loss_equals_a_hand_loss_and_owngpt_eval_and_lr_follows_the_linear_schedule(
    tiny_lm_data, tiny_ckpt, tmp_path, capsys
):
    # catches: a wrong label shift in collate (the trainer's val loss then differs from a loss computed here from the
    # raw file and from `owngpt eval`, which reads the tokens its own way); a linear schedule that decays to 0
    T, steps, lr, min_lr, warmup = 16, 5, 2e-3, 5e-4, 1
    cfg = quick_cfg(
        tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=steps, eval_every=steps, block_size=T, eval_batches=0,
        schedule="linear", lr=lr, min_lr=min_lr, warmup_steps=warmup, dropout=0.0,
    )  # fmt: skip
    res = train(cfg)
    log = log_of(tmp_path / "run")

    # the schedule, written out: warmup to lr, then a straight line to min_lr at the last step
    for rec in (r for r in log if "lr" in r):
        s = rec["step"] - 1  # the record of step s+1 carries the lr step s trained with
        want = lr * (s + 1) / (warmup + 1) if s < warmup else lr - (s - warmup) / (steps - warmup) * (lr - min_lr)
        assert rec["lr"] == pytest.approx(want, rel=1e-9), rec

    # the loss of the final weights on the val split's non-overlapping blocks, from the raw file
    from transformers import AutoModelForCausalLM

    val = torch.from_numpy(raw_tokens(tiny_lm_data, "val").astype(np.int64))
    n_blocks = (len(val) - 1) // T
    assert n_blocks >= 2
    model = AutoModelForCausalLM.from_pretrained(res.last_checkpoint).eval()
    with torch.no_grad():
        x = torch.stack([val[i * T : i * T + T] for i in range(n_blocks)])  # (N, T)
        y = torch.stack([val[i * T + 1 : i * T + T + 1] for i in range(n_blocks)])  # (N, T) the next tokens
        hand = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
    trainer = [r for r in log if "val_loss" in r][-1]
    assert trainer["step"] == steps and trainer["val_tokens"] == n_blocks * T
    assert trainer["val_loss"] == pytest.approx(hand, rel=1e-5)

    # `owngpt eval` on the same checkpoint over the same tokens
    capsys.readouterr()
    rc = main(
        ["eval", str(res.last_checkpoint), "--data", str(tiny_lm_data), "--block-size", str(T),
         "--max-tokens", str(n_blocks * T), "--json"]
    )  # fmt: skip
    assert rc in (0, None)
    ev = json.loads(capsys.readouterr().out)
    assert ev["tokens"] == n_blocks * T
    assert ev["loss"] == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize(
    "schedule, want",
    [
        ("linear", [1.0 / 3, 2.0 / 3, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]),  # warmup 2, then a line to min_lr 0.1
        ("cosine", [1.0 / 3, 2.0 / 3, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, None, 0.1, 0.1]),
        ("constant", [1.0 / 3, 2.0 / 3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedule_by_hand(schedule, want):
    # catches: linear decay to 0 instead of min_lr; a warmup off by one; a cosine that does not end at min_lr
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, schedule=schedule)
    got = [lr_at(s, cfg, total_steps=6) for s in range(8)]
    for s, (g, w) in enumerate(zip(got, want)):
        if w is not None:
            assert g == pytest.approx(w, rel=1e-12), (s, got)
    # min_lr unset: a tenth of lr
    assert lr_at(6, TrainConfig(lr=1.0, warmup_steps=0, schedule=schedule), 6) == pytest.approx(
        1.0 if schedule == "constant" else 0.1
    )


def test_early_stopping_stops_at_the_first_evaluation_patience_allows(tiny_lm_data, tiny_ckpt, tmp_path):
    # catches: `bad_evals > patience` (one evaluation too late), a counter not reset on improvement
    patience = 2
    res = train(
        quick_cfg(
            tiny_lm_data, tmp_path / "run", tiny_ckpt, lr=5.0, grad_clip=0.0, max_steps=30, eval_every=1,
            patience=patience, eval_batches=1,
        )
    )  # fmt: skip
    evals = [(r["step"], r["val_loss"]) for r in log_of(tmp_path / "run") if "val_loss" in r]
    # replay the rule on the logged losses: stop at the first evaluation after `patience` without a new best
    best, bad, expected = math.inf, 0, None
    for step, loss in evals:
        best, bad = (loss, 0) if loss < best else (best, bad + 1)
        if bad >= patience:
            expected = step
            break
    assert expected is not None and expected < 30  # lr 5 without clipping: the loss gets worse at once
    assert res.stopped_early and res.steps == expected and evals[-1][0] == expected
