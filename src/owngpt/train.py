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

from owngpt.config import TrainConfig, save_config
from owngpt.errors import CheckpointError, ConfigError, DataError
from owngpt.optim import build_optimizer, check_saved_optimizer, resolve_optimizer, set_lr
from owngpt.optim import describe as describe_optimizer

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
    """This process's place in a torchrun job (world 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def setup() -> Dist:
        import torch
        import torch.distributed as td

        if td.is_available() and td.is_initialized():  # e.g. a test that spawned the processes itself
            return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", td.get_rank())))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Dist()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        td.init_process_group(backend)
        return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group=True)

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

    @property
    def device(self):
        import torch

        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

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


def named_optimizer_state(optimizer: Any, names: list[str]) -> dict[str, Any]:
    """optimizer.state_dict() with parameter names instead of indexes (the form FSDP's full state dict has)."""
    sd = optimizer.state_dict()
    return {
        "state": {names[i]: st for i, st in sd["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]],
    }


def _state_files(state: dict[str, Any], osd: dict[str, Any], rngs: list[dict[str, Any]]) -> dict[str, bytes]:
    """The trainer state as files for the checkpoint: tensors in safetensors (no pickle), the rest in JSON.

    `osd` is the optimizer state keyed by parameter name (see named_optimizer_state).
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
    optimizer: Any, names: list[str], meta: dict[str, Any], tensors: dict[str, Any], fsdp_model: Any = None
) -> None:
    if sorted(meta["param_names"]) != sorted(names):
        raise CheckpointError(
            "the checkpoint's optimizer state is for other trainable parameters (was freezing or "
            "LoRA changed?): resume with the run's original settings"
        )
    named = _named_saved_state(meta, tensors)
    if fsdp_model is not None:  # FSDP: torch shards the full state over the ranks
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(fsdp_model, optimizer, named, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(names)}
    optimizer.load_state_dict(
        {
            "state": {index[n]: st for n, st in named["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in named["param_groups"]],
        }
    )


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
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
        except ImportError:  # pragma: no cover - tensorboard is a dependency; stay usable without it
            self.tb = None

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
def _prepare_run_dir(out: Path, cfg: TrainConfig, dist: Dist) -> Path | None:
    """Check the run dir; returns checkpoints/last to resume from (or None). Nothing is deleted here."""
    last = out / "checkpoints" / "last"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    used = out.exists() and any(out.iterdir())
    if cfg.resume:
        if (last / "config.json").exists():
            return last
        if used and not (out / "config.yaml").exists():
            raise ConfigError(f"--resume: {out} is not an owngpt run dir (no config.yaml, no checkpoints/last)")
        _say(dist, f"--resume: no checkpoint in {out} yet, starting from step 0")
        return None
    if used and not cfg.overwrite:
        raise ConfigError(
            f"--out {out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    return None


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
}


def _changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    now = dataclasses.asdict(cfg)
    return sorted(k for k, v in saved.items() if k not in _FREE_ON_RESUME and k in now and now[k] != v)


def _recover_interrupted_save(ckpts: Path) -> None:
    """A kill between save_checkpoint's two renames leaves `.last.old-PID` and no `last`: put it back."""
    for name in ("last", "best"):
        if not (ckpts / name).exists():
            old = sorted(ckpts.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
            if old and (old[-1] / "config.json").exists():
                old[-1].rename(ckpts / name)


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
    dist = Dist.setup()
    try:
        return _train(dataclasses.replace(cfg), list(callbacks), dist)
    finally:
        dist.close()


def _train(cfg: TrainConfig, callbacks: list[Callback], dist: Dist) -> TrainResult:
    import numpy as np
    import torch

    from owngpt.checkpoint import load_model, save_checkpoint
    from owngpt.data.datadir import open_data_dir
    from owngpt.model_init import apply_lora, build_model, check_tokenizer, freeze, merged_copy
    from owngpt.models import resolve_model_source
    from owngpt.tasks.base import get_task

    cfg.validate()
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
    check_tokenizer(tokenizer, data.path, source, _model_vocab(source, tokenizer))
    task = task_cls(data, tokenizer, cfg, block_size)
    metric = cfg.metric or task.metric
    higher = _metric_direction(task, metric)

    if dist.main and cfg.resume:
        _recover_interrupted_save(out / "checkpoints")
    dist.barrier()
    resume_dir = _prepare_run_dir(out, cfg, dist)
    dist.barrier()  # every rank has looked at the run dir before rank 0 writes into it
    state_meta, state_tensors = read_state(resume_dir) if resume_dir is not None else (None, None)
    if dist.main:
        if cfg.overwrite and not cfg.resume and out.exists():
            shutil.rmtree(out)
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

    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

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

            fwd = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)

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
        _load_optimizer(optimizer, names, state_meta, state_tensors, raw if sharded else None)
        step, best, best_step = state_meta["step"], state_meta["best_metric"], state_meta["best_step"]
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
    data_summary = {
        "path": str(Path(cfg.data).absolute()),
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
            osd = get_optimizer_state_dict(raw, optimizer, options=opts) if with_state else None
        else:
            full_weights, osd = None, named_optimizer_state(optimizer, names) if with_state else None
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
        meta = {
            "task": cfg.task,
            "source": source.to_dict(),
            "source_description": source.describe(),
            "step": step,
            "metrics": metrics,
            "block_size": block_size,
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
                "config": dataclasses.asdict(cfg),
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
    window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0.0, time.perf_counter()
    raw.train()
    try:
        while step < total_steps:
            # learning rate of this step (a pure function of the step, see lr_at)
            lr = lr_at(step, cfg, total_steps)
            set_lr(optimizer, lr, lr_scales)

            # this step's global batch; this rank takes rows [rank*B*A, (rank+1)*B*A), in micro-batches of B
            rows = task.global_rows(step, rows_per_step)
            mine = rows[dist.rank * cfg.batch_size * cfg.grad_accum :][: cfg.batch_size * cfg.grad_accum]
            micro = [task.collate(mine[i : i + cfg.batch_size], "train") for i in range(0, len(mine), cfg.batch_size)]
            micro = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro]
            local_units = sum(task.batch_units(b) for b in micro)
            local_tokens = sum(float(b["input_ids"].numel()) for b in micro)
            (global_units,) = dist.all_sum([local_units])
            global_units = max(global_units, 1.0)  # a batch with nothing to learn (all masked) gives zero grads

            loss_sum = 0.0
            for i, batch in enumerate(micro):
                # DDP all-reduces gradients on backward; skip that for all but the last micro-batch
                sync = i == len(micro) - 1 or dist.world == 1
                ctx = fwd.no_sync() if not sync and hasattr(fwd, "no_sync") else contextlib.nullcontext()
                with ctx:
                    with autocast:
                        out_loss = task.loss(fwd, batch)
                        if isinstance(out_loss, tuple):  # (sum, units) form: the sum is what counts
                            out_loss = out_loss[0]
                    # sum over the global batch's units; DDP then averages over ranks, hence the * world
                    (out_loss * (dist.world / global_units)).backward()
                loss_sum += float(out_loss.detach())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # ---- logging (the loss of the whole global batch) --------------------------------------------------------
            loss_total, tokens = dist.all_sum([loss_sum, local_tokens])
            train_loss = loss_total / global_units
            window_loss, window_steps, window_tokens = (
                window_loss + train_loss,
                window_steps + 1,
                window_tokens + tokens,
            )
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                dt = max(time.perf_counter() - window_t0, 1e-9)
                rec = {
                    "step": step,
                    "train_loss": window_loss / window_steps,
                    "lr": lr,
                    "tokens_per_s": window_tokens / dt,
                }
                bar.set_postfix(loss=f"{rec['train_loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                log.write(rec)
                window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0.0, time.perf_counter()
            if not math.isfinite(train_loss):
                raise ConfigError(
                    f"the training loss became {train_loss} at step {step}: lower --lr or keep "
                    "grad_clip on; checkpoints/last holds the last good weights"
                )

            # ---- evaluation, checkpoints, early stopping -------------------------------------------------------------
            if step % cfg.eval_every == 0 or step == total_steps:
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
                save(last_dir, metrics, with_state=True)  # last first: it is what --resume needs
                if improved:
                    save(best_dir, metrics, with_state=False)
                if dist.main:
                    for cb in callbacks:
                        cb(step, metrics)
                if cfg.patience is not None and bad_evals >= cfg.patience and step < total_steps:
                    stopped_early = True
                    if dist.main:
                        bar.write(f"early stop: {metric} did not improve for {bad_evals} evaluations", file=sys.stderr)
                    break
    finally:
        bar.close()
        log.close()

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
