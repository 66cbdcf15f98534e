"""The machinery of the training step that keeps an accelerator busy; the loop itself stays in owngpt.train.

Three pieces, each there because the GPU would otherwise wait on the host:

  - `Prefetcher`: builds each step's batches ahead, in a background thread, from the pure `task.global_rows(step)`
    (so resume stays exact), pinned in page-locked memory on cuda so that `to_device(..., non_blocking=True)` really
    overlaps the copy with compute. The loss units of the global batch are counted there too, on the host's copy.
  - `LossMeter`: the training loss summed on the device, read (one host sync) only when the loop logs, evaluates or
    checks for divergence: a `float(loss)` per micro-batch would stall the GPU's queue every micro-batch.
  - `forward_and_loss`: the forward pass and the loss as one function, which is what `torch.compile` gets, so the
    cross-entropy over (B, T, V) logits (the biggest tensor of the step) is fused with the head instead of running
    eagerly after a compiled body. Eager mode calls the very same function uncompiled.

It is not the loop (owngpt.train), the device choice (owngpt.device) or a task (owngpt.tasks).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Batch = dict[str, Any]


@dataclass
class StepBatch:
    """This rank's share of one optimizer step's global batch, on the host."""

    step: int
    micro: list[Batch]  # grad_accum micro-batches of batch_size rows each (CPU tensors, pinned on cuda)
    units: float  # loss units (e.g. trained tokens) of this rank's micro-batches
    tokens: float  # input tokens of this rank's micro-batches (tokens/s)
    units_tensor: Any = None  # `units` as a 0-dim float64 tensor (pinned on cuda), for the all-reduce of N ranks


def build_step(task: Any, step: int, rows_per_step: int, rank: int, batch_size: int, grad_accum: int, pin: bool):
    """The batches of `step` for `rank`: rows [rank*B*A, (rank+1)*B*A) of the global batch, in micro-batches of B.

    A pure function of (task seed, step, sizes): what exact resume and N ranks == one process rely on.
    """
    rows = task.global_rows(step, rows_per_step)
    mine = rows[rank * batch_size * grad_accum :][: batch_size * grad_accum]
    micro = [task.collate(mine[i : i + batch_size], "train") for i in range(0, len(mine), batch_size)]
    units = sum(float(task.batch_units(b)) for b in micro)  # on the host copy: no device read
    tokens = sum(float(b["input_ids"].numel()) for b in micro)
    import torch

    units_tensor = torch.tensor(units, dtype=torch.float64)
    if pin:
        micro = [{k: v.pin_memory() for k, v in b.items()} for b in micro]
        units_tensor = units_tensor.pin_memory()
    return StepBatch(step, micro, units, tokens, units_tensor)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Runs `make(step)` for steps start..stop-1 in a background thread, `depth` steps ahead of the loop.

    A background thread rather than a DataLoader with workers: the batches are cheap numpy slicing (the work that
    matters is the copy, made asynchronous by pinning) and a thread shares the task's memory-mapped arrays without
    pickling them to worker processes. An exception in `make` is raised again by `get` in the loop's thread.
    """

    def __init__(self, make: Callable[[int], StepBatch], start: int, stop: int, depth: int = 2):
        self._make = make
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start, stop), name="owngpt-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, start: int, stop: int) -> None:
        try:
            for step in range(start, stop):
                if not self._put(self._make(step)):
                    return
        except BaseException as e:  # handed to the loop, which raises it where the user sees it
            self._put(_Failed(e))

    def get(self, step: int) -> StepBatch:
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        if item.step != step:  # the loop and the prefetcher walk the same range; anything else is a bug here
            raise RuntimeError(f"prefetcher out of step: built {item.step}, the loop is at {step}")
        return item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


def to_device(batch: Batch, device: Any) -> Batch:
    """A batch on `device`; asynchronous from pinned memory (cuda), a no-op on the CPU."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def loss_scale(sb: StepBatch, dist: Any, device: Any) -> Any:
    """What each micro-batch's loss sum is multiplied by before backward: world / (loss units of the global batch).

    DDP averages gradients over ranks, hence the world. One process: a host number, as the units were counted on
    the host. N processes: the ranks' counts summed by an all-reduce on the device, which the host does not wait
    for. A batch with nothing to learn (every label masked) counts as one unit: zero loss, zero gradients.
    """
    if dist.world == 1:
        return 1.0 / max(sb.units, 1.0)
    import torch
    import torch.distributed as td

    total = sb.units_tensor.to(device, non_blocking=True)
    td.all_reduce(total)
    return (dist.world / total.clamp_min(1.0)).to(torch.float32)


def forward_and_loss(task: Any, model: Any, compile: bool = False) -> Callable[[Batch], Any]:
    """`batch -> sum of the per-unit losses`: the part of the step that repeats, compiled whole when asked."""

    def step_loss(batch: Batch) -> Any:
        out = task.loss(model, batch)
        return out[0] if isinstance(out, tuple) else out  # a (sum, units) form: the sum is what counts

    if not compile:
        return step_loss
    import torch

    return torch.compile(step_loss)


class LossMeter:
    """The training loss summed on the device since the last reset; `read` is the only host sync.

    `add` takes each micro-batch's loss already divided by the global batch's loss units (what backward uses), so
    the sum over one step's micro-batches (and ranks) is that step's mean loss. float64 where the device has it
    (not mps): a window of many steps adds no rounding worth seeing.
    """

    def __init__(self, device: Any):
        import torch

        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.total = torch.zeros((), dtype=self.dtype, device=device)
        self.steps = 0
        self.tokens = 0.0  # host-side: known when the batch is built

    def add(self, loss: Any) -> None:
        self.total += loss.detach()

    def end_step(self, tokens: float) -> None:
        self.steps += 1
        self.tokens += tokens

    def read(self, dist: Any) -> tuple[float, float]:
        """(sum over the window's steps of the global batch's mean loss, tokens of all ranks): one sync."""
        if dist.world == 1:
            return float(self.total), self.tokens
        import torch
        import torch.distributed as td

        tokens = torch.tensor(self.tokens, dtype=torch.float64, device=self.total.device)
        both = torch.stack([self.total.to(torch.float64), tokens])
        td.all_reduce(both)
        loss, tokens = both.tolist()
        return loss / dist.world, tokens  # each rank added its loss * world (DDP averages over ranks)

    def reset(self) -> None:
        self.total.zero_()
        self.steps, self.tokens = 0, 0.0
