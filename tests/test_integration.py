"""Cross-module checks: the stages hand each other what they promise."""

import pytest

import fixtures
from owngpt.config import TrainConfig
from owngpt.errors import CheckpointError


def test_training_from_an_int8_export_is_refused_with_the_reason(tiny_ckpt, tmp_path):
    from owngpt.export import export
    from owngpt.train import train

    export(tiny_ckpt, tmp_path / "int8", "int8", measure_result=False)
    data = fixtures.write_lm_data_dir(tmp_path / "data")
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), model=str(tmp_path / "int8"), max_steps=1, block_size=16
    )
    with pytest.raises(CheckpointError, match="int8 export"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prune_command_line_runs(tiny_ckpt, tmp_path):
    """The CLI path (flags -> prune()), not only the function: every flag the command reads must exist."""
    from owngpt.checkpoint import is_checkpoint
    from owngpt.cli import main

    assert (
        main(
            [
                "prune",
                str(tiny_ckpt),
                "--out",
                str(tmp_path / "p"),
                "--sparsity",
                "0.5",
                "--structured",
                "mlp",
                "--no-measure",
            ]
        )
        == 0
    )
    assert is_checkpoint(tmp_path / "p")
