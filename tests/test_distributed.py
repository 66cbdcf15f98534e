"""Scale-out on this CPU: `torchrun --nproc_per_node 2` (gloo) equals one process with the same global batch,
and a 2-process run resumes, with DDP and with FSDP (the FSDP run is stopped after one step and resumed: its
optimizer state goes through torch's full state dict and back into the shards). Each rank seeds its generators as
written by hand. Chat data, so the loss normalisation over masked tokens across ranks is exercised."""

from __future__ import annotations

import subprocess
import sys

from train_helpers import quick_cfg, weights, write_chat_data_dir

from owngpt.train import train


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "owngpt",
        "train",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def assert_each_rank_seeded_its_generators(ckpt, seed: int, world: int) -> None:
    """Each rank's saved generators are, by hand, python's and numpy's seeded with `seed` and torch's with
    `seed + rank` (dropout masks differ per rank, as in one big batch), untouched by a run without dropout."""
    import json
    import random

    import numpy as np
    import torch
    from safetensors.torch import load_file

    meta = json.loads((ckpt / "trainer" / "state.json").read_text())
    tensors = load_file(ckpt / "trainer" / "tensors.safetensors")
    assert meta["world_size"] == world and len(meta["rng"]) == world
    random.seed(seed)
    python = json.loads(json.dumps(random.getstate()))
    np.random.seed(seed)
    numpy_key = np.random.get_state()[1].tolist()
    for rank in range(world):
        assert meta["rng"][rank]["python"] == python
        assert meta["rng"][rank]["numpy"][1] == numpy_key
        expected = torch.Generator().manual_seed(seed + rank).get_state()
        assert torch.equal(tensors[f"rng/{rank}/torch"], expected), f"rank {rank}'s torch generator"


def test_two_processes_equal_one_with_the_same_global_batch_and_resume(tmp_path, tiny_ckpt):
    data = write_chat_data_dir(tmp_path / "chat", n_train=13)  # 13: epochs wrap inside a global batch
    common = [
        "--data",
        str(data),
        "--model",
        str(tiny_ckpt),
        "--task",
        "chat",
        "--block-size",
        "48",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--eval-every",
        "2",
        "--seed",
        "9",
        "--lr",
        "1e-3",
        "warmup_steps=0",
        "schedule=constant",
        "eval_batches=1",
        "dropout=0.0",
        "--device",
        "cpu",  # gloo on any machine: the comparison is with a one-process CPU run
    ]
    out = tmp_path / "ddp"
    first = torchrun(*common, "--max-steps", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    assert_each_rank_seeded_its_generators(out / "checkpoints" / "last", seed=9, world=2)
    second = torchrun(*common, "--max-steps", "4", "--out", str(out), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 2" in second.stderr
    # each rank got its own generators back on resume (dropout 0: nothing drew from them since)
    assert_each_rank_seeded_its_generators(out / "checkpoints" / "last", seed=9, world=2)
    assert second.stderr.count("done: 4 steps") == 1  # only rank 0 talks

    # one process, batch 2 x 2 ranks = 4 rows per micro-batch, the same accumulation
    one = train(
        quick_cfg(
            data,
            tmp_path / "one",
            tiny_ckpt,
            task="chat",
            block_size=48,
            batch_size=4,
            grad_accum=2,
            eval_every=2,
            seed=9,
            lr=1e-3,
            max_steps=4,
            eval_batches=1,
        )
    )
    a, b = weights(out / "checkpoints" / "last"), weights(one.last_checkpoint)
    start = weights(tiny_ckpt)
    assert a.keys() == b.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained (4 Adam steps of lr 1e-3)
    # Gradients agree to float precision (~1e-8); Adam divides by sqrt(v), which amplifies that noise on the
    # elements with tiny gradients, so weights are compared at a tolerance well below one step's change (lr)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_fsdp_two_processes_equal_one_and_resume(tmp_path, tiny_ckpt, tiny_lm_data):
    # stopped after one step and resumed: the optimizer state saved in full and loaded back into the shards
    # (catches a sharded or otherwise wrong state-dict option on either side: the second step would differ)
    common = [
        "--data",
        str(tiny_lm_data),
        "--model",
        str(tiny_ckpt),
        "--block-size",
        "32",
        "--eval-every",
        "2",
        "--seed",
        "5",
        "warmup_steps=0",
        "schedule=constant",
        "eval_batches=1",
        "fsdp=true",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
    ]
    first = torchrun(*common, "--batch-size", "2", "--max-steps", "1", "--out", str(tmp_path / "fsdp"))
    assert first.returncode == 0, first.stderr[-3000:]
    run = torchrun(*common, "--batch-size", "2", "--max-steps", "2", "--out", str(tmp_path / "fsdp"), "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from step 1" in run.stderr
    one = train(
        quick_cfg(
            tiny_lm_data,
            tmp_path / "one",
            tiny_ckpt,
            batch_size=4,
            eval_every=2,
            seed=5,
            max_steps=2,
            eval_batches=1,
            lr=1e-3,
        )
    )
    a, b = weights(tmp_path / "fsdp" / "checkpoints" / "last"), weights(one.last_checkpoint)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (tmp_path / "fsdp/checkpoints/last/trainer/tensors.safetensors").exists()
