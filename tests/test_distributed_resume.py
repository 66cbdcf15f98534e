"""A two-process run with dropout, stopped and resumed, equals the same run uninterrupted: each rank must get its own
RNG state back (dropout masks differ per rank). The oracle is the uninterrupted two-process run itself, not one
process, so dropout can stay on.
"""

from __future__ import annotations

from test_distributed import torchrun
from train_helpers import weights


def test_two_process_resume_with_dropout_restores_each_ranks_rng(tmp_path, tiny_ckpt, tiny_lm_data):
    # catches: every rank restoring rank 0's RNG state (invisible with dropout 0, or when compared with one process)
    common = [
        "--data", str(tiny_lm_data), "--model", str(tiny_ckpt), "--block-size", "32", "--batch-size", "2",
        "--eval-every", "2", "--seed", "4", "--lr", "1e-3", "warmup_steps=0", "schedule=constant", "eval_batches=1",
        "dropout=0.2",
    ]  # fmt: skip
    whole = torchrun(*common, "--max-steps", "4", "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = torchrun(*common, "--max-steps", "2", "--out", str(tmp_path / "parts"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(*common, "--max-steps", "4", "--out", str(tmp_path / "parts"), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 2" in second.stderr

    a, b = weights(tmp_path / "whole/checkpoints/last"), weights(tmp_path / "parts/checkpoints/last")
    start = weights(tiny_ckpt)
    assert a.keys() == b.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained
    # the same processes, reductions and masks: equal to float noise, far below one step's change (lr 1e-3)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
