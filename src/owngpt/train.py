"""The training loop shared by every task (lm, chat, mmi, classify): one explicit, linear loop, nanoGPT-style.

    train(cfg) ->  setup (data, tokenizer, model, optimizer, maybe resume)
               ->  for each optimizer step: global batch -> this rank's micro-batches -> forward/backward
                   -> clip -> optimizer step (AdamW, or Muon + AdamW: owngpt.optim); log;
                   every eval_every steps: evaluate, save last/best, early stop
               ->  final evaluation and save

What a task contributes (data, loss, metrics) is behind `owngpt.tasks.base.Task`; models come from transformers
(`owngpt.model_init`); checkpoints are Hugging Face dirs written atomically by `owngpt.checkpoint`.

The run dir:

    RUN/config.yaml          the resolved config (a valid --config)
    RUN/metrics.jsonl        one JSON object per log line ("train_loss") and per evaluation ("val_loss", ...)
    RUN/loss.png             train and validation curves, redrawn at each evaluation
    RUN/tb/                  TensorBoard event files
    RUN/checkpoints/last/    the latest checkpoint + trainer/ (optimizer, RNG states, step): what --resume reads
    RUN/checkpoints/best/    the best checkpoint by the task's metric (val_loss, or e.g. accuracy for classify)
    RUN/checkpoints/merged/  LoRA runs with merge_lora: the merged model alone

Exact resume. Everything that decides the future of a run is saved at each checkpoint, inside checkpoints/last so
that weights and trainer state are replaced together by one rename: weights, optimizer state (AdamW moments; Muon's
momentum), step (the learning rate is a pure function of the step, so the "scheduler" is the step),
python/numpy/torch RNG states of every rank (dropout), best metric and patience counter. The data position needs no state: a task's batch at step s is a pure
function of (seed, s). So a run killed at any moment and resumed ends with the same weights, bitwise, on CPU.

Scale-out. Under `torchrun --nproc_per_node N` each rank takes its slice of the same global batch
(batch_size x grad_accum x N rows), gradients are averaged by DDP (or FSDP), and every micro-batch's loss sum is
divided by the number of loss units (trained tokens, examples) of the whole global batch, times N because DDP
averages over ranks: N processes compute the same update as one process with an N-times bigger batch.
Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt.checkpoint import run_relative
from owngpt.config import TrainConfig, save_config
from owngpt.device import Placement, announce, autocast_dtype, configure_matmul
from owngpt.errors import CheckpointError, ConfigError, DataError
from owngpt.optim import build_optimizer, check_saved_optimizer, resolve_optimizer, set_lr, torch_optimizers
from owngpt.optim import describe as describe_optimizer
from owngpt.outdir import RUN, Replacement, check_out, check_replaceable, kind_of, recover_old, swap_in
from owngpt.train_step import LossMeter, Prefetcher, build_step, forward_and_loss, loss_scale, to_device

Callback = Callable[[int, dict], None]
STATE_DIR = "trainer"  # inside checkpoints/last: state.json + tensors.safetensors
STATE_VERSION = 1
LOSS_METRICS = ("val_loss", "val_ppl")


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_metric: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's metrics
    steps: int = 0
    stopped_early: bool = False


# --- distributed setup -------------------------------------------------------------------------------------------
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

        from owngpt.device import resolve_device

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


# --- the learning rate -----------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine / linear decay to min_lr (or constant). nanoGPT's schedule, a function of step."""
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr - ratio * (cfg.lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)


# --- trainer state (resume) ------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(_tupled(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (list, tuple)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _state_files(state: dict[str, Any], osd: dict[str, Any], rngs: list[dict[str, Any]]) -> dict[str, bytes]:
    """The trainer state as files for the checkpoint: tensors in safetensors (no pickle), the rest in JSON.

    `osd` is the optimizer state keyed by parameter name (torch.distributed.checkpoint's get_optimizer_state_dict).
    """
    from safetensors.torch import save as st_save

    tensors = {}
    for name, pstate in osd["state"].items():
        for key, value in pstate.items():
            if hasattr(value, "detach"):
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().contiguous().clone()
    groups = osd["param_groups"]
    names = [n for g in groups for n in g["params"]]
    for r, rng in enumerate(rngs):
        tensors[f"rng/{r}/torch"] = rng["torch"]
        if "cuda" in rng:
            tensors[f"rng/{r}/cuda"] = rng["cuda"]
    meta = dict(
        state,
        version=STATE_VERSION,
        param_names=names,
        param_groups=_jsonable(groups),
        rng=[{k: v for k, v in rng.items() if k in ("python", "numpy")} for rng in rngs],
    )
    return {f"{STATE_DIR}/state.json": json.dumps(meta).encode(), f"{STATE_DIR}/tensors.safetensors": st_save(tensors)}


def read_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, tensors) of a checkpoint's trainer state, with a clear error when missing or corrupt."""
    from safetensors.torch import load_file

    d = ckpt / STATE_DIR
    try:
        meta = json.loads((d / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(d / "tensors.safetensors")
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{ckpt} has no trainer state ({d}): it cannot be resumed; start again with "
            "--overwrite, or fine-tune from it with --model"
        ) from e
    except Exception as e:  # safetensors raises its own error types on truncated files
        raise CheckpointError(f"{d} is corrupt ({e}): start again with --overwrite") from e
    if meta.get("version") != STATE_VERSION:
        raise CheckpointError(f"{d}/state.json: trainer state version {meta.get('version')} is not {STATE_VERSION}")
    return meta, tensors


def _named_saved_state(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, k = key[len("optim/") :].rsplit("/", 1)
            state.setdefault(name, {})[k] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _load_optimizer(
    optimizer: Any, names: list[str], meta: dict[str, Any], tensors: dict[str, Any], model: Any, sharded: bool = False
) -> None:
    if sorted(meta["param_names"]) != sorted(names):
        raise CheckpointError(
            "the checkpoint's optimizer state is for other trainable parameters (was freezing or "
            "LoRA changed?): resume with the run's original settings"
        )
    named = _named_saved_state(meta, tensors)
    # torch's name-keyed optimizer state, for one process as for FSDP (which shards the full state over the ranks)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if sharded else None
    set_optimizer_state_dict(model, torch_optimizers(optimizer), named, options=options)


# --- observability ---------------------------------------------------------------------------------------------
class RunLog:
    """metrics.jsonl, TensorBoard and loss.png (rank 0 only; other ranks get a no-op instance)."""

    def __init__(self, run_dir: Path, active: bool, resume_step: int | None):
        self.run_dir, self.active = run_dir, active
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if not active:
            return
        f = run_dir / "metrics.jsonl"
        if resume_step is not None and f.exists():
            # the killed run may have logged steps after its last checkpoint: they are replayed, so drop them
            for line in f.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.history.append(rec)
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")
        os.replace(tmp, f)
        # TensorBoard event files through tensorboardX (a core dependency of ~5 MB: protobuf, no TensorBoard server,
        # grpcio or werkzeug; docs/benchmarks.md has the install sizes); torch's writer where only tensorboard is
        # installed; no events at all without either (metrics.jsonl has the same numbers)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            try:
                from torch.utils.tensorboard import SummaryWriter  # type: ignore[no-redef]
            except ImportError:
                SummaryWriter = None  # type: ignore[assignment,misc]
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step) if SummaryWriter is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.history.append(record)
        try:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise CheckpointError(
                f"cannot write {self.run_dir / 'metrics.jsonl'}: {e.strerror or e} (disk full?); "
                "checkpoints/last is intact: free space and continue with --resume"
            ) from e
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def plot(self) -> None:
        """loss.png: train and validation loss against step (matplotlib's object API: no global backend)."""
        if not self.active:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            pts = [(r["step"], r[key]) for r in self.history if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_", " "), markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.run_dir / "loss.png.tmp"
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, self.run_dir / "loss.png")
        except OSError as e:
            raise CheckpointError(
                f"cannot write {self.run_dir / 'loss.png'}: {e.strerror or e} (disk full?); "
                "checkpoints/last is intact: free space and continue with --resume"
            ) from e

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _say(dist: Dist, msg: str) -> None:
    if dist.main:
        print(msg, file=sys.stderr, flush=True)


# --- setup helpers -----------------------------------------------------------------------------------------------
def _prepare_run_dir(out: Path, cfg: TrainConfig, dist: Dist) -> tuple[Path | None, bool]:
    """Check the run dir; returns (checkpoints/last to resume from or None, whether --overwrite replaces a run).
    Nothing is deleted here; an --out owngpt did not make is refused (owngpt.outdir.check_replaceable)."""
    last = out / "checkpoints" / "last"
    if os.path.lexists(out) and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory: choose another --out")
    used = out.exists() and any(out.iterdir())
    if cfg.resume:
        if (last / "config.json").exists():
            return last, False
        if used and kind_of(out) != RUN:
            raise ConfigError(
                f"--resume: {out} is not an owngpt run dir (no config.yaml, no checkpoints/last): "
                "choose the --out of the run to continue, or a new --out"
            )
        _say(dist, f"--resume: no checkpoint in {out} yet, starting from step 0")
        return None, False
    if not used:
        return None, False
    if kind_of(out) == RUN and not _run_started(out):
        _say(dist, f"{out}: the run there stopped before its first step; starting it again in place")
        return None, False
    if kind_of(out) == RUN and not cfg.overwrite:
        raise ConfigError(
            f"--out {out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    return None, check_replaceable(out, RUN, cfg.overwrite)


def _run_started(out: Path) -> bool:
    """Whether a run dir holds any progress: a checkpoint or a logged step."""
    ckpts = out / "checkpoints"
    if any((ckpts / n / "config.json").exists() for n in ("last", "best")):
        return True
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


# settings a resumed run may change without breaking exactness (they change how long, or what is logged)
_FREE_ON_RESUME = {
    "max_steps",
    "epochs",
    "eval_every",
    "eval_batches",
    "log_every",
    "patience",
    "resume",
    "overwrite",
    "extra",
    "out",
    "data",
    "model",
    "merge_lora",
    "metric",
    "report",
}


def _portable_source(source: Any, out: Path) -> dict[str, Any]:
    """owngpt.json's "source" and "source_description" without the user's absolute paths (run-relative or none)."""
    rel = run_relative(source.path, out) if source.kind == "local" else None
    info = {**source.to_dict(), "path": rel}
    if source.kind == "local":
        info["name"] = rel if rel is not None else Path(source.name).name
        return {"source": info, "source_description": f"pretrained: local checkpoint {info['name']}"}
    if source.kind == "hub":
        return {"source": info, "source_description": f"pretrained: Hub model '{source.name}'"}
    return {"source": info, "source_description": source.describe()}


def _portable_config(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """The config saved in trainer/state.json, its paths relative to the run (data, model dir) or none."""
    saved = dataclasses.asdict(cfg)
    saved["out"] = "."
    saved["data"] = run_relative(cfg.data, out)
    if cfg.model and Path(cfg.model).exists():  # a local checkpoint, not a preset or Hub name
        saved["model"] = run_relative(cfg.model, out)
    return saved


def _changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    now = dataclasses.asdict(cfg)
    return sorted(k for k, v in saved.items() if k not in _FREE_ON_RESUME and k in now and now[k] != v)


def _recover_interrupted_save(out: Path, dist: Dist) -> None:
    """Leftovers of a killed process, before anything else looks at the run dir: an `--overwrite` cut short
    (owngpt.outdir.Replacement.recover), a save cut between two renames where the OS has no atomic exchange
    (`.last.old-PID` and no `last`: put back), and `.best.old-*` copies that are no longer needed."""
    note = Replacement.recover(out, _run_started(out))
    if note:
        _say(dist, note)
    for name in ("last", "best", "merged"):
        recover_old(out / "checkpoints" / name)


def _reconcile_best(ckpts: Path, state: dict[str, Any], metric: str, dist: Dist) -> tuple[Any, Any]:
    """(best metric, best step) to resume with, such that checkpoints/best is never older than what is reported.

    Best is saved before last, so a kill between the two leaves best ahead of last (the replay saves it again).
    A run saved the other way round (older owngpt) can be cut with last saying "best at step N" and best still
    holding an earlier step: when last is itself that step, best is restored from it; otherwise the run reports
    what best really holds.
    """
    from owngpt.checkpoint import read_meta

    best, best_step = state["best_metric"], state["best_step"]
    best_dir = ckpts / "best"
    held = read_meta(best_dir).get("step") if (best_dir / "config.json").exists() else None
    if best_step is None or (held is not None and held >= best_step):
        return best, best_step
    if best_step == state["step"]:  # checkpoints/last holds the best weights: copy them (without trainer state)
        if dist.main:
            import tempfile

            tmp = Path(tempfile.mkdtemp(prefix=".best.tmp-", dir=ckpts))
            shutil.rmtree(tmp)
            shutil.copytree(ckpts / "last", tmp, ignore=shutil.ignore_patterns(STATE_DIR))
            swap_in(tmp, best_dir)
        _say(dist, f"checkpoints/best held step {held}, not the best step {best_step}: restored from checkpoints/last")
        return best, best_step
    if held is None:
        _say(dist, f"warning: checkpoints/best (step {best_step}) is missing; the next improvement saves it again")
        return None, None
    value = read_meta(best_dir).get("metrics", {}).get(metric)
    _say(dist, f"warning: checkpoints/best holds step {held}, not {best_step} (a save was cut short): resuming with it")
    return value, held


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable directory") from e


def _resolve_block_size(cfg: TrainConfig, source: Any) -> int:
    from owngpt.checkpoint import load_config
    from owngpt.model_init import check_block_size, model_context

    context = source.preset["n_positions"] if source.kind == "preset" else model_context(load_config(source.path))
    block = cfg.block_size or min(context or 256, 256)
    check_block_size(block, context, source)
    return block


def _trained_context(source: Any, block_size: int) -> int:
    """The longest window this model has been trained on: this run's block, or more if it started from a checkpoint
    trained on longer ones (fine-tuning GPT-2 on blocks of 256 keeps its 1024 trained positions)."""
    if source.kind == "preset":
        return block_size
    from owngpt.checkpoint import load_config, read_meta
    from owngpt.generation import trained_context

    return max(block_size, trained_context(read_meta(source.path), load_config(source.path)))


def _model_vocab(source: Any, tokenizer: Any) -> int:
    from owngpt.checkpoint import load_config

    if source.kind == "preset":
        return len(tokenizer)
    return int(getattr(load_config(source.path), "vocab_size", 0) or 0) or len(tokenizer)


def _metric_direction(task: Any, metric: str) -> bool:
    """True when a higher value of `metric` is better."""
    if metric == task.metric:
        return task.greater_is_better
    return not (metric in LOSS_METRICS or metric.endswith("loss"))


def _ddp_device_ids(device: Any) -> list[int] | None:
    """DDP's `device_ids` for a module on `device`: a CUDA module's one GPU (this rank's), None on the CPU (DDP
    refuses device ids for CPU modules and, given none on a GPU, would not know which device the module is on)."""
    return [device.index] if device.type == "cuda" else None


def _improves(new: float | None, best: float | None, higher: bool) -> bool:
    if new is None or math.isnan(new):
        return False
    if best is None:
        return True
    return new > best if higher else new < best


# --- the training function -----------------------------------------------------------------------------------------
def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train as `cfg` says and return where the checkpoints are. Callbacks run after each evaluation (rank 0)
    as `cb(step, metrics)` and may raise to stop the run (the exception propagates; checkpoints so far stay)."""
    dist = Dist.setup(cfg.device)
    guard = Replacement()
    try:
        result = _train(dataclasses.replace(cfg), list(callbacks), dist, guard)
        # every rank done with the group before any destroys it: a rank that tore gloo down while its peer still
        # had work in flight aborted at exit once ("terminate called without an active exception", rank 1)
        dist.barrier()
    except BaseException:
        if dist.main:
            guard.rollback()  # --overwrite failed before its first checkpoint: the old run comes back whole
        raise
    finally:
        dist.close()
    if cfg.report and dist.main:  # report.html + report.md; a failure there is a warning, never the run's
        from owngpt.report import report_after_run

        report_after_run(result.run_dir)
    return result


def _train(cfg: TrainConfig, callbacks: list[Callback], dist: Dist, guard: Replacement) -> TrainResult:
    import numpy as np
    import torch

    from owngpt.checkpoint import load_model, save_checkpoint
    from owngpt.data.datadir import open_data_dir
    from owngpt.model_init import apply_lora, build_model, check_tokenizer, freeze, merged_copy
    from owngpt.models import resolve_model_source
    from owngpt.tasks.base import get_task

    cfg.validate()
    if cfg.cv:
        raise ConfigError("cv=K trains K runs: call owngpt.cv.cross_validate (as `owngpt train ... cv=K` does)")
    if not cfg.data:
        raise ConfigError("no data: pass --data DATA_DIR (made by `owngpt prepare`)")
    if not cfg.out:
        raise ConfigError("no run dir: pass --out RUN_DIR")
    out = Path(cfg.out)

    # ---- data, task, tokenizer, model source: every check before anything is written --------------------------
    data = open_data_dir(cfg.data)
    task_cls = get_task(cfg.task)
    if data.task not in task_cls.data_tasks:
        raise DataError(
            f"--task {cfg.task} needs {' or '.join(task_cls.data_tasks)} data, but {data.path} holds "
            f"'{data.task}' data: prepare it with `owngpt prepare ... --task {task_cls.data_tasks[0]}` "
            f"or train with --task {data.task}"
        )
    tokenizer = data.load_tokenizer()
    if cfg.task == "chat" and not getattr(tokenizer, "chat_template", None):
        from owngpt.chat_format import CHAT_TEMPLATE

        tokenizer.chat_template = CHAT_TEMPLATE  # stored in the checkpoint for apply_chat_template
    source = resolve_model_source(cfg.model)
    cfg.optimizer = resolve_optimizer(cfg, source.pretrained)  # `auto` -> adamw | muon, recorded in config.yaml
    block_size = _resolve_block_size(cfg, source)
    cfg.block_size = block_size
    trained_ctx = _trained_context(source, block_size)
    check_tokenizer(tokenizer, data.path, source, _model_vocab(source, tokenizer))
    task = task_cls(data, tokenizer, cfg, block_size)
    metric = cfg.metric or task.metric
    higher = _metric_direction(task, metric)

    # an --out that is or holds the data or the model would be overwritten or deleted: refused before any write
    check_out(out, [("data dir (--data)", cfg.data), ("model (--model)", source.path)], suggest="new")
    if dist.main:
        _recover_interrupted_save(out, dist)
    dist.barrier()
    resume_dir, replace = _prepare_run_dir(out, cfg, dist)
    dist.barrier()  # every rank has looked at the run dir before rank 0 writes into it
    state_meta, state_tensors = read_state(resume_dir) if resume_dir is not None else (None, None)
    if dist.main:
        if replace:  # set aside, not deleted, until the new run has saved a checkpoint (owngpt.outdir.Replacement)
            guard.set_aside(out)
        _check_writable(out)
        for stale in out.glob("checkpoints/.*.tmp-*"):  # a save interrupted by a kill: never the real checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        save_config(cfg, out / "config.yaml", notes=[f"model: {source.describe()}"])
    dist.barrier()

    # ---- model -------------------------------------------------------------------------------------------------
    _say(dist, f"model: {source.describe()}")
    kind = "classify" if task.model_kind == "sequence_classification" else "lm"
    if resume_dir is not None and not cfg.lora:
        model = load_model(resume_dir, task=kind)  # the exact weights of the checkpoint
    else:
        model = build_model(source, tokenizer, task, cfg)
    if hasattr(task, "prepare_model"):
        task.prepare_model(model)  # task-specific surgery (e.g. classify: freeze the body)
    frozen = freeze(model, cfg.freeze_embeddings, cfg.freeze_layers)
    if frozen:
        _say(dist, f"frozen: {len(frozen)} parameter tensors")
    if cfg.lora:
        model = apply_lora(model, cfg, task.model_kind)
        if resume_dir is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            from owngpt.checkpoint import check_adapter_dir

            check_adapter_dir(resume_dir / "adapter")  # a truncated adapter: an error naming it, not a traceback
            set_peft_model_state_dict(model, load_file(resume_dir / "adapter" / "adapter_model.safetensors"))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = dist.device
    model.to(device)
    raw = model  # the module we save and evaluate (DDP/compile wrap it for training only)
    n_params = sum(p.numel() for p in raw.parameters())
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    _say(dist, f"parameters: {n_params:,} ({n_train:,} trained); block size {block_size}; task {cfg.task}")
    if n_train == 0:
        raise ConfigError("nothing to train: every parameter is frozen")

    placement = Placement(device, autocast_dtype(device, cfg.precision))
    configure_matmul(device)
    if dist.main:
        announce(placement, cfg.device)
    autocast = placement.autocast()

    fwd = raw
    if dist.world > 1:
        if cfg.fsdp:
            # FSDP2: each block's parameters, gradients and optimizer state sharded over the ranks (the model
            # must fit on one device only while one block is gathered)
            from torch.distributed.fsdp import fully_shard

            from owngpt.model_init import blocks

            if cfg.lora:
                raise ConfigError(
                    "fsdp with lora is not supported: LoRA already keeps the trained state small; drop fsdp=true"
                )
            for block in blocks(raw):
                fully_shard(block)
            fully_shard(raw)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            fwd = DDP(raw, device_ids=_ddp_device_ids(device))
    if cfg.compile and dist.world > 1:
        fwd = torch.compile(fwd)  # DDP/FSDP: compile the wrapped module (torch splits its graph at gradient buckets)
    # forward + loss, the part of the step that repeats: compiled as one function when alone (see train_step)
    step_loss = forward_and_loss(task, fwd, compile=cfg.compile and dist.world == 1)

    sharded = dist.world > 1 and cfg.fsdp
    optimizer, names, lr_scales = build_optimizer(raw, cfg, device.type, sharded)  # AdamW, or Muon + AdamW
    _say(dist, describe_optimizer(cfg, optimizer))

    # ---- length of the run ----------------------------------------------------------------------------------------
    rows_per_step = cfg.batch_size * cfg.grad_accum * dist.world  # the global batch
    total_steps = cfg.max_steps or task.steps_for_epochs(cfg.epochs or 1.0, rows_per_step)
    eval_split = "val" if task.has_val() else "train"
    if eval_split == "train":
        _say(dist, "warning: no validation split; evaluating on the train split")

    # ---- resume -------------------------------------------------------------------------------------------------
    step, best, best_step, bad_evals = 0, None, None, 0
    if state_meta is not None:
        check_saved_optimizer(state_meta.get("config", {}), cfg.optimizer)
        _load_optimizer(optimizer, names, state_meta, state_tensors, raw, sharded)
        step = state_meta["step"]
        best, best_step = _reconcile_best(out / "checkpoints", state_meta, metric, dist)
        bad_evals = state_meta["bad_evals"]
        r = dist.rank if state_meta["world_size"] == dist.world else 0
        rng = dict(state_meta["rng"][r], torch=state_tensors[f"rng/{r}/torch"])
        if f"rng/{r}/cuda" in state_tensors:
            rng["cuda"] = state_tensors[f"rng/{r}/cuda"]
        _set_rng_state(rng)
        _say(dist, f"resuming from step {step} ({resume_dir})")
        changed = _changed_settings(state_meta.get("config", {}), cfg)
        if changed:
            _say(
                dist,
                f"warning: settings differ from the interrupted run ({', '.join(changed)}): the result will "
                "not equal an uninterrupted run",
            )
    else:
        # seed every generator a run may touch (dropout; python and numpy for any user code)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + dist.rank)  # dropout masks differ per rank, as in one big batch

    log = RunLog(out, dist.main, step if state_meta is not None else None)
    # paths relative to the run or none (owngpt.checkpoint.run_relative): checkpoints are shared, folders are not
    data_summary = {
        "path": run_relative(cfg.data, out),
        "task": data.task,
        "tokenizer": data.meta.get("tokenizer"),
        "splits": data.meta.get("splits"),
    }
    last_dir, best_dir = out / "checkpoints" / "last", out / "checkpoints" / "best"

    def save(path: Path, metrics: dict[str, Any], with_state: bool, adapter: bool = cfg.lora) -> None:
        """A Hugging Face checkpoint of the current weights (+ trainer state); rank 0 writes, all ranks gather RNG."""
        rngs = dist.gather(_rng_state()) if with_state else []
        if sharded:  # gather full weights and optimizer state (collectives: every rank takes part)
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_weights = get_model_state_dict(raw, options=opts)
            osd = get_optimizer_state_dict(raw, torch_optimizers(optimizer), options=opts) if with_state else None
        else:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            # parameter names as keys (the same form as FSDP's full state dict above), from torch's public API
            full_weights, osd = None, get_optimizer_state_dict(raw, torch_optimizers(optimizer)) if with_state else None
        if not dist.main:
            return
        if full_weights is not None:
            to_save = _cpu_copy(raw, full_weights)
        else:
            to_save = merged_copy(raw) if cfg.lora else raw
        gen = to_save.generation_config if getattr(to_save, "can_generate", lambda: False)() else None
        eos = task.generation_eos_ids()
        if gen is not None and eos:
            gen.eos_token_id = eos if len(eos) > 1 else eos[0]
            gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        if gen is not None:  # transformers' own generate stops at the trained context (docs/architecture.md)
            gen.max_length = trained_ctx
        meta = {
            "task": cfg.task,
            **_portable_source(source, out),
            "step": step,
            "metrics": metrics,
            "block_size": block_size,
            "trained_context": trained_ctx,
            "lora": cfg.lora,
            "data": data_summary,
            **task.checkpoint_meta(),
        }
        extra: dict[str, bytes] = {}
        if adapter:
            extra.update(_adapter_files(raw))
        if with_state:
            state = {
                "step": step,
                "total_steps": total_steps,
                "best_metric": best,
                "best_step": best_step,
                "bad_evals": bad_evals,
                "metric": metric,
                "world_size": dist.world,
                "config": _portable_config(cfg, out),
            }
            extra.update(_state_files(state, osd, rngs))
        with _quiet_transformers():
            save_checkpoint(path, to_save, tokenizer, meta, extra)

    def evaluate() -> dict[str, float]:
        raw.eval()
        with torch.no_grad(), autocast:
            metrics = task.evaluate(
                raw, cfg.eval_batches, cfg.batch_size, **({"split": eval_split} if eval_split != "val" else {})
            )
        raw.train()
        return {k: float(v) for k, v in metrics.items()}

    # ---- the loop ---------------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not dist.main,
        file=sys.stderr,
        dynamic_ncols=True,
        desc=f"train {cfg.task}",
        unit="step",
    )
    last_metrics: dict[str, float] = {}
    stopped_early = False
    # No host syncs between log steps: the loss accumulates on the device (LossMeter) and batches are built ahead
    # in a thread (Prefetcher), pinned on cuda and copied asynchronously; see owngpt.train_step.
    meter, window_t0 = LossMeter(device), time.perf_counter()
    batches = Prefetcher(
        lambda s: build_step(task, s, rows_per_step, dist.rank, cfg.batch_size, cfg.grad_accum, placement.pin_memory),
        step,
        total_steps,
    )
    raw.train()
    try:
        while step < total_steps:
            # learning rate of this step (a pure function of the step, see lr_at)
            lr = lr_at(step, cfg, total_steps)
            set_lr(optimizer, lr, lr_scales)

            # this step's share of the global batch (a pure function of the step), built ahead
            sb = batches.get(step)
            micro = [to_device(b, device) for b in sb.micro]
            scale = loss_scale(sb, dist, device)  # world / loss units of the whole global batch
            for i, batch in enumerate(micro):
                # DDP all-reduces gradients on backward; skip that for all but the last micro-batch
                sync = i == len(micro) - 1 or dist.world == 1
                ctx = fwd.no_sync() if not sync and hasattr(fwd, "no_sync") else contextlib.nullcontext()
                with ctx:
                    with autocast:
                        scaled = step_loss(batch) * scale
                    scaled.backward()
                meter.add(scaled)  # stays on the device until a log step
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            meter.end_step(sb.tokens)
            bar.update(1)

            # ---- logging (the loss of the whole global batch): the only reads of the device between evaluations
            log_now = step % cfg.log_every == 0 or step == total_steps
            eval_now = step % cfg.eval_every == 0 or step == total_steps
            if log_now or eval_now:
                loss_total, tokens = meter.read(dist)
                if not math.isfinite(loss_total):
                    kept = "; checkpoints/last holds the last good weights" if last_dir.is_dir() else ""
                    raise ConfigError(
                        f"the training loss became {loss_total / meter.steps} by step {step}: lower --lr or keep "
                        f"grad_clip on{kept}"
                    )
            if log_now:
                dt = max(time.perf_counter() - window_t0, 1e-9)
                rec = {"step": step, "train_loss": loss_total / meter.steps, "lr": lr, "tokens_per_s": tokens / dt}
                bar.set_postfix(loss=f"{rec['train_loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                log.write(rec)
                meter.reset()
                window_t0 = time.perf_counter()

            # ---- evaluation, checkpoints, early stopping -------------------------------------------------------------
            if eval_now:
                eval_t0 = time.perf_counter()
                metrics = evaluate()
                if metric not in metrics:
                    raise ConfigError(f"metric={metric!r}: the {cfg.task} task reports {', '.join(metrics)}")
                last_metrics = metrics
                improved = _improves(metrics[metric], best, higher)
                if improved:
                    best, best_step, bad_evals = metrics[metric], step, 0
                else:
                    bad_evals += 1
                log.write({"step": step, **metrics})
                log.plot()
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                if dist.main:
                    bar.write(f"step {step}: {shown}{' (best)' if improved else ''}", file=sys.stderr)
                if improved:  # best before last: a kill between them leaves best ahead of last, never behind
                    save(best_dir, metrics, with_state=False)
                save(last_dir, metrics, with_state=True)
                guard.commit()  # a run replaced by --overwrite is deleted once this one has a checkpoint
                window_t0 += time.perf_counter() - eval_t0  # tokens/s counts training time only
                if dist.main:
                    for cb in callbacks:
                        cb(step, metrics)
                if cfg.patience is not None and bad_evals >= cfg.patience and step < total_steps:
                    stopped_early = True
                    if dist.main:
                        bar.write(f"early stop: {metric} did not improve for {bad_evals} evaluations", file=sys.stderr)
                    break
    finally:
        batches.close()
        bar.close()
        log.close()

    guard.commit()  # the new run is complete even if it never evaluated (nothing to keep the old one for)
    if cfg.lora and cfg.merge_lora:
        save(out / "checkpoints" / "merged", last_metrics, with_state=False, adapter=False)
    if not last_metrics and state_meta is not None:
        from owngpt.checkpoint import read_meta

        last_metrics = read_meta(last_dir).get("metrics", {})  # the run had already finished
    _say(
        dist,
        f"done: {step} steps; best {metric} {best if best is not None else float('nan'):.4f} at step "
        f"{best_step}; checkpoints in {out / 'checkpoints'}",
    )
    return TrainResult(
        run_dir=out,
        last_checkpoint=last_dir if last_dir.exists() else None,
        best_checkpoint=best_dir if best_dir.exists() else None,
        best_metric=best,
        metrics=last_metrics,
        steps=step,
        stopped_early=stopped_early,
    )


def _cpu_copy(model: Any, weights: dict[str, Any]) -> Any:
    """A plain (unsharded) CPU model holding `weights`, for save_pretrained (rank 0 of an FSDP run)."""
    import torch

    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(weights, assign=True)
    copy.tie_weights()
    copy.generation_config = model.generation_config
    return copy.eval()


@contextlib.contextmanager
def _quiet_transformers():
    """No "Writing model shards" progress bar inside ours."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _adapter_files(peft_model: Any) -> dict[str, bytes]:
    """The LoRA adapter on its own (peft's format), under adapter/ in the checkpoint.

    Not at the top level: transformers, finding adapter_config.json next to config.json, would load the adapter on
    top of the merged weights and apply the deltas twice.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        return {f"adapter/{f.name}": f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}
