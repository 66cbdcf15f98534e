"""A training run's place in a torchrun job: the process group, and how the model is spread over the ranks.

    Dist.setup(device)          join the torchrun job if there is one (world 1 when run alone), with each rank's device
    parallelize(model, ...)     the module the loop runs forward/backward through: the model itself alone; DDP, or
                                FSDP2 with fsdp=true, under torchrun
    full_state(model, ...)      the full weights (FSDP) and name-keyed optimizer state that rank 0 saves
    unsharded_copy(model, w)    a plain CPU model holding the gathered weights, for save_pretrained

Under `torchrun --nproc_per_node N` each rank takes its slice of the same global batch (owngpt.train_step), gradients
are averaged by DDP (or FSDP), and only rank 0 logs and writes (`Dist.main`, `Dist.say`).

It is not the device choice (owngpt.device, which Dist asks for the device of a rank) nor the loop (owngpt.train).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from owngpt.device import resolve_device
from owngpt.errors import ConfigError
from owngpt.model_init import blocks


@dataclass
class Dist:
    """This process's place in a torchrun job (world 1 when run alone), and its device (owngpt.device)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it
    device: Any = None  # torch.device; set by setup (cpu when built by hand)

    def __post_init__(self) -> None:
        if self.device is None:
            import torch

            self.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def setup(device: str = "auto") -> Dist:
        """Join the torchrun job if there is one; `device` (auto | cpu | cuda | cuda:N | mps) picks each rank's
        device: under torchrun, auto and cuda give rank r the GPU LOCAL_RANK (one device per rank, NCCL)."""
        import torch.distributed as td

        if td.is_available() and td.is_initialized():  # e.g. a test that spawned the processes itself
            local = int(os.environ.get("LOCAL_RANK", td.get_rank()))
            return Dist(td.get_rank(), td.get_world_size(), local, device=resolve_device(device, local))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Dist(device=resolve_device(device))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local)
        if dev.type == "mps":
            raise ConfigError("--device mps runs one process: torch has no collective backend for Apple GPUs")
        if dev.type == "cuda":
            import torch

            torch.cuda.set_device(dev)  # NCCL's communicator and the cuda RNG state then belong to this rank's GPU
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return Dist(td.get_rank(), td.get_world_size(), local, owns_group=True, device=dev)

    def say(self, msg: str) -> None:
        """A line on stderr, from rank 0 only (N ranks would print it N times)."""
        if self.main:
            print(msg, file=sys.stderr, flush=True)

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        td.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as td

            td.destroy_process_group()


def ddp_device_ids(device: Any) -> list[int] | None:
    """DDP's `device_ids` for a module on `device`: a CUDA module's one GPU (this rank's), None on the CPU (DDP
    refuses device ids for CPU modules and, given none on a GPU, would not know which device the module is on)."""
    return [device.index] if device.type == "cuda" else None


def parallelize(model: Any, dist: Dist, fsdp: bool, lora: bool) -> Any:
    """The module the loop runs forward/backward through: `model` itself in one process; under torchrun, `model`
    wrapped by DDP, or (fsdp) sharded in place by FSDP2 and returned as is. Saving and evaluating use `model`."""
    if dist.world == 1:
        return model
    if fsdp:
        # FSDP2: each block's parameters, gradients and optimizer state sharded over the ranks (the model
        # must fit on one device only while one block is gathered)
        from torch.distributed.fsdp import fully_shard

        if lora:
            raise ConfigError(
                "fsdp with lora is not supported: LoRA already keeps the trained state small; drop fsdp=true"
            )
        for block in blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=ddp_device_ids(dist.device))


def full_state(model: Any, optimizers: Any, sharded: bool, with_optimizer: bool) -> tuple[Any, Any]:
    """(full weights, optimizer state) to save: the weights gathered on CPU when FSDP shards them (None otherwise:
    the model holds them whole), the optimizer state keyed by parameter name (None unless `with_optimizer`).

    Sharded, these are collectives: every rank must call this, though only rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if sharded:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizers, options=opts) if with_optimizer else None
        return weights, osd
    # parameter names as keys (the same form as FSDP's full state dict above), from torch's public API
    return None, get_optimizer_state_dict(model, optimizers) if with_optimizer else None


def unsharded_copy(model: Any, weights: dict[str, Any]) -> Any:
    """A plain (unsharded) CPU model holding `weights`, for save_pretrained (rank 0 of an FSDP run)."""
    import torch

    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(weights, assign=True)
    copy.tie_weights()
    copy.generation_config = model.generation_config
    return copy.eval()
