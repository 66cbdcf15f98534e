"""owngpt.trainer_state on its own (#25): the files a checkpoint's trainer state is written to and read back from, each
rank's generators restored from them, the optimizer state loaded by parameter name, a state of another version or
for other parameters refused, the run's config with portable paths, and the settings that break an exact resume.
Oracles: the draws of generators seeded by hand, torch's own optimizer state, the config written out in the test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from owngpt.config import TrainConfig
from owngpt.errors import CheckpointError
from owngpt.trainer_state import (
    STATE_DIR,
    changed_settings,
    load_optimizer,
    portable_config,
    read_state,
    restore_rng,
    rng_state,
    state_files,
)


def _seeded(seed: int) -> dict:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    np.random.randn(1)  # an odd number of Gaussians: numpy's state then holds the cached second one
    return rng_state()


def _draws() -> list[float]:
    return [random.random(), *np.random.randn(3).tolist(), *torch.rand(2).tolist()]


def _write(ckpt: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(data)
    return ckpt


def _tiny_model_and_adamw() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    return model, opt


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(5, 3, generator=g)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _state(world: int = 2) -> dict:
    return {"step": 7, "best_metric": 1.5, "best_step": 6, "bad_evals": 1, "metric": "val_loss", "world_size": world}


def test_each_rank_restores_its_own_generators_and_another_world_size_rank_0s(tmp_path):
    """Two ranks saved their generators; read back from the files: the same number of processes restores each rank's
    own states, another number restores rank 0's on every rank (owngpt.train's resume contract)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _tiny_model_and_adamw()
    _one_step(model, opt, 0)
    rngs = [_seeded(10), _seeded(20)]
    want = []
    for seed in (10, 20):
        _seeded(seed)
        want.append(_draws())
    assert want[0] != want[1]
    ckpt = _write(tmp_path / "last", state_files(_state(), get_optimizer_state_dict(model, opt), rngs))
    meta, tensors = read_state(ckpt)
    assert meta["step"] == 7 and meta["world_size"] == 2 and meta["version"] == 1
    for rank, world, which in [(0, 2, 0), (1, 2, 1), (0, 1, 0), (0, 3, 0), (2, 3, 0)]:
        _seeded(99)  # anything else
        restore_rng(meta, tensors, rank, world)
        assert _draws() == want[which], (rank, world)


def test_the_optimizer_state_comes_back_by_parameter_name_exactly(tmp_path):
    """AdamW's moments and step count after a save and a read equal the optimizer's own; the next step is then the
    one the uninterrupted optimizer takes (oracle: torch's optimizer, stepped on)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _tiny_model_and_adamw()
    for s in range(2):
        _one_step(model, opt, s)
    ckpt = _write(tmp_path / "last", state_files(_state(1), get_optimizer_state_dict(model, opt), [rng_state()]))
    meta, tensors = read_state(ckpt)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(meta["param_names"]) == sorted(names)

    model2, opt2 = _tiny_model_and_adamw()
    model2.load_state_dict(model.state_dict())
    load_optimizer(opt2, names, meta, tensors, model2)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        a, b = opt.state[p], opt2.state[p2]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    _one_step(model, opt, 5)
    _one_step(model2, opt2, 5)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)


def test_a_state_for_other_parameters_or_of_another_version_is_refused(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _tiny_model_and_adamw()
    _one_step(model, opt, 0)
    ckpt = _write(tmp_path / "last", state_files(_state(1), get_optimizer_state_dict(model, opt), [rng_state()]))
    meta, tensors = read_state(ckpt)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(CheckpointError, match="optimizer state is for other trainable parameters"):
        load_optimizer(opt, names[1:], meta, tensors, model)

    path = ckpt / STATE_DIR / "state.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps(dict(saved, version=2)))
    with pytest.raises(CheckpointError, match="trainer state version 2 is not 1") as e:
        read_state(ckpt)
    assert str(ckpt / STATE_DIR) in str(e.value)


def test_a_cuda_generator_is_saved_for_the_ranks_that_had_one(tmp_path):
    cpu = rng_state()
    cpu.pop("cuda", None)
    gpu = dict(cpu, torch=cpu["torch"].clone(), cuda=torch.tensor([1, 2, 3], dtype=torch.uint8))
    files = state_files(_state(), {"state": {}, "param_groups": []}, [cpu, gpu])
    meta, tensors = read_state(_write(tmp_path / "last", files))
    assert sorted(tensors) == ["rng/0/torch", "rng/1/cuda", "rng/1/torch"]
    assert tensors["rng/1/cuda"].tolist() == [1, 2, 3]
    assert [sorted(r) for r in meta["rng"]] == [["numpy", "python"], ["numpy", "python"]]


def test_the_saved_config_names_a_preset_as_it_is_and_local_paths_relative_to_the_run(tmp_path):
    out, data, model = tmp_path / "runs" / "a", tmp_path / "data", tmp_path / "ckpt"
    model.mkdir()
    cfg = TrainConfig(data=str(data), out=str(out), model="tiny", lr=1e-3)
    saved = portable_config(cfg, out)
    assert (saved["out"], saved["data"], saved["model"], saved["lr"]) == (".", "../../data", "tiny", 1e-3)
    saved = portable_config(TrainConfig(data=str(data), out=str(out), model=str(model)), out)
    assert saved["model"] == "../../ckpt"


def test_the_settings_that_break_an_exact_resume_are_named_and_the_free_ones_are_not():
    cfg = TrainConfig(data="d", out="o", model="tiny", lr=1e-3, seed=5)
    saved = json.loads(json.dumps(portable_config(cfg, Path("o"))))
    assert changed_settings(saved, cfg) == []
    later = TrainConfig(data="d2", out="o2", model="tiny", lr=2e-3, seed=6, max_steps=99, eval_every=7, patience=3)
    assert changed_settings(saved, later) == ["lr", "seed"]
    # a setting this version does not know (a state saved by another owngpt) is passed over, not a KeyError
    assert changed_settings(dict(saved, retired_setting=1), cfg) == []
