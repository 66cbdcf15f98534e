"""owngpt.distributed's Dist on its own (#25): a process's place in a torchrun job and its collectives, in one process
with torch.distributed's calls stood in for (the two-process torchrun tests in test_distributed.py take minutes;
these check which collective runs, on which ranks, with what, in milliseconds), what `parallelize` shards or wraps,
and what `full_state` asks of torch. Oracles: the calls recorded by the stand-ins and the values they return, written
in the test."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as td
import torch.distributed.checkpoint.state_dict as sd
import torch.distributed.fsdp as fsdp
import torch.nn.parallel
from transformers import GPT2Config, GPT2LMHeadModel

from owngpt.distributed import Dist, full_state, parallelize
from owngpt.errors import ConfigError


@pytest.fixture
def calls(monkeypatch):
    """torch.distributed's collectives recorded; each does what a two-rank job of ranks 0 and 1 would."""
    seen: list[tuple] = []

    def all_gather_object(out, obj):
        seen.append(("all_gather_object", len(out)))
        for r in range(len(out)):
            out[r] = (r, obj)

    def broadcast_object_list(box, src):
        seen.append(("broadcast_object_list", src))
        box[0] = f"rank {src}'s object"

    def all_reduce(t):
        seen.append(("all_reduce", t.dtype))
        t.mul_(2)  # rank 1 holds the same values

    monkeypatch.setattr(td, "barrier", lambda: seen.append(("barrier",)))
    monkeypatch.setattr(td, "all_gather_object", all_gather_object)
    monkeypatch.setattr(td, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(td, "all_reduce", all_reduce)
    return seen


def test_a_dist_built_by_hand_is_rank_0_of_1_on_the_cpu_or_on_the_device_given():
    d = Dist()
    assert (d.rank, d.world, d.local_rank, d.owns_group, d.device, d.main) == (
        0,
        1,
        0,
        False,
        torch.device("cpu"),
        True,
    )
    assert Dist(device=torch.device("meta")).device == torch.device("meta")
    assert not Dist(rank=1, world=2).main


def test_two_ranks_run_each_collective_and_one_process_none(calls):
    two = Dist(rank=1, world=2)
    two.barrier()
    assert two.gather("mine") == [(0, "mine"), (1, "mine")]
    assert two.broadcast("mine") == "rank 0's object"  # every rank gets rank 0's
    assert two.all_sum([1.0, 2.5]) == [2.0, 5.0]
    assert calls == [
        ("barrier",),
        ("all_gather_object", 2),
        ("broadcast_object_list", 0),
        ("all_reduce", torch.float64),
    ]
    calls.clear()
    one = Dist()
    one.barrier()
    assert one.gather("mine") == ["mine"] and one.broadcast("mine") == "mine" and one.all_sum([1.0, 2.5]) == [1.0, 2.5]
    assert calls == []


def test_only_rank_0_says_anything(capsys):
    Dist(rank=1, world=2).say("from rank 1")
    Dist(rank=0, world=2).say("from rank 0")
    assert capsys.readouterr().err == "from rank 0\n"


@pytest.mark.parametrize("world", ["1", "2"])
def test_setup_joins_a_torchrun_job_of_two_with_gloo_on_the_cpu_and_runs_alone_otherwise(monkeypatch, world):
    joined = []
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(td, "is_initialized", lambda: False)
    monkeypatch.setattr(td, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(td, "get_rank", lambda: 1)
    monkeypatch.setattr(td, "get_world_size", lambda: 2)
    d = Dist.setup("cpu")
    if world == "1":
        assert joined == [] and (d.rank, d.world, d.owns_group) == (0, 1, False)
    else:
        assert joined == ["gloo"]
        assert (d.rank, d.world, d.local_rank, d.owns_group, d.device) == (1, 2, 1, True, torch.device("cpu"))


def _gpt2(layers: int = 3) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=layers, n_head=2))


def test_parallelize_shards_each_block_then_the_model_under_fsdp_and_wraps_in_ddp_otherwise(monkeypatch):
    """Under torchrun with fsdp=true every transformer block is sharded on its own, then the whole model (its
    embeddings and head), and the model itself comes back; without fsdp it is wrapped in DDP with no device ids on
    the CPU; alone, it is the model itself. torch's fully_shard and DDP are stood in for by recorders (the
    two-process runs in test_distributed.py train through the real ones)."""
    sharded: list = []
    wrapped: list = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module: sharded.append(module))

    class RecordingDDP:
        def __init__(self, module, device_ids):
            wrapped.append((module, device_ids))

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
    model = _gpt2()
    two = Dist(rank=1, world=2)
    assert parallelize(model, two, fsdp=True, lora=False) is model
    assert [id(m) for m in sharded] == [*(id(b) for b in model.transformer.h), id(model)]
    assert wrapped == []

    sharded.clear()
    ddp = parallelize(model, two, fsdp=False, lora=False)
    assert isinstance(ddp, RecordingDDP) and wrapped == [(model, None)] and sharded == []

    wrapped.clear()
    assert parallelize(model, Dist(), fsdp=True, lora=False) is model
    assert parallelize(model, Dist(), fsdp=False, lora=True) is model
    assert sharded == [] and wrapped == []

    with pytest.raises(ConfigError, match="fsdp with lora is not supported"):
        parallelize(model, two, fsdp=True, lora=True)
    assert sharded == []


def test_full_state_gathers_fsdps_shards_whole_on_the_cpu_and_names_the_optimizer_state(monkeypatch):
    """Sharded (FSDP), the weights and the optimizer state are asked of torch whole (full_state_dict) and on the CPU
    (cpu_offload: a GPU need not hold a second full copy; rank 0 alone receives it); unsharded, the model holds its
    weights (None) and the optimizer state is torch's, keyed by parameter name. torch's two getters are stood in for
    when sharded (a real FSDP needs a process group); the unsharded state is the real one."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    asked: list = []
    real_optimizer_state = sd.get_optimizer_state_dict

    def model_state(m, options):
        asked.append(("weights", options.full_state_dict, options.cpu_offload))
        return {"w": "gathered"}

    def optimizer_state(m, o, options=None):
        if options is None:
            return real_optimizer_state(m, o)
        asked.append(("optimizer", options.full_state_dict, options.cpu_offload))
        return {"state": "gathered"}

    monkeypatch.setattr(sd, "get_model_state_dict", model_state)
    monkeypatch.setattr(sd, "get_optimizer_state_dict", optimizer_state)
    assert full_state(model, opt, sharded=True, with_optimizer=True) == ({"w": "gathered"}, {"state": "gathered"})
    assert asked == [("weights", True, True), ("optimizer", True, True)]
    asked.clear()
    assert full_state(model, opt, sharded=True, with_optimizer=False) == ({"w": "gathered"}, None)
    assert asked == [("weights", True, True)]
    asked.clear()
    weights, osd = full_state(model, opt, sharded=False, with_optimizer=True)
    assert weights is None and asked == []
    assert sorted(osd["state"]) == ["bias", "weight"]
    assert torch.equal(osd["state"]["weight"]["exp_avg"], opt.state[model.weight]["exp_avg"])
    assert full_state(model, opt, sharded=False, with_optimizer=False) == (None, None)
