"""The training loop shared by every task (lm, chat, mmi, classify): one explicit, linear loop, nanoGPT-style.

    train(cfg) ->  setup (data, tokenizer, model, optimizer, maybe resume)
               ->  for each optimizer step: global batch -> this rank's micro-batches -> forward/backward
                   -> clip -> optimizer step (AdamW, or Muon + AdamW: owngpt.optim); log;
                   every eval_every steps: evaluate, save last/best, early stop
               ->  final evaluation and save

What a task contributes (data, loss, metrics) is behind `owngpt.tasks.base.Task`; models come from transformers
(`owngpt.model_init`); checkpoints are Hugging Face dirs written atomically by `owngpt.checkpoint`. Around the loop,
one module per job: `owngpt.distributed` (the torchrun job, DDP/FSDP), `owngpt.train_step` (batches built ahead,
the loss kept on the device), `owngpt.trainer_state` (what --resume reads), `owngpt.run_log` (metrics.jsonl, tb/,
loss.png), `owngpt.run_dir` (the checks on --out before anything is written).

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
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt.chat_format import CHAT_TEMPLATE
from owngpt.checkpoint import check_adapter_dir, load_model, read_meta, run_relative, save_checkpoint, training_meta
from owngpt.config import TrainConfig, save_config
from owngpt.data.datadir import open_data_dir
from owngpt.device import Placement, announce, autocast_dtype, configure_matmul
from owngpt.distributed import Dist, full_state, parallelize, unsharded_copy
from owngpt.errors import ConfigError, DataError
from owngpt.model_init import (
    apply_lora,
    build_model,
    check_tokenizer,
    freeze,
    merged_copy,
    model_vocab,
    resolve_block_size,
    trained_context_after,
)
from owngpt.models import resolve_model_source
from owngpt.optim import build_optimizer, check_saved_optimizer, resolve_optimizer, set_lr, torch_optimizers
from owngpt.optim import describe as describe_optimizer
from owngpt.outdir import Replacement, check_out
from owngpt.report import report_after_run
from owngpt.run_dir import check_writable, prepare_run_dir, reconcile_best, recover_interrupted_save
from owngpt.run_log import RunLog
from owngpt.tasks.base import get_task
from owngpt.train_step import LossMeter, Prefetcher, build_step, forward_and_loss, loss_scale, to_device
from owngpt.trainer_state import (
    changed_settings,
    load_optimizer,
    portable_config,
    read_state,
    restore_rng,
    rng_state,
    state_files,
)

Callback = Callable[[int, dict], None]
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


# --- the best checkpoint -----------------------------------------------------------------------------------
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
        report_after_run(result.run_dir)
    return result


def _train(cfg: TrainConfig, callbacks: list[Callback], dist: Dist, guard: Replacement) -> TrainResult:
    import numpy as np
    import torch

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
        tokenizer.chat_template = CHAT_TEMPLATE  # stored in the checkpoint for apply_chat_template
    source = resolve_model_source(cfg.model)
    cfg.optimizer = resolve_optimizer(cfg, source.pretrained)  # `auto` -> adamw | muon, recorded in config.yaml
    block_size = resolve_block_size(cfg.block_size, source)
    cfg.block_size = block_size
    trained_ctx = trained_context_after(source, block_size)
    check_tokenizer(tokenizer, data.path, source, model_vocab(source, tokenizer))
    task = task_cls(data, tokenizer, cfg, block_size)
    metric = cfg.metric or task.metric
    higher = _metric_direction(task, metric)

    # an --out that is or holds the data or the model would be overwritten or deleted: refused before any write
    check_out(out, [("data dir (--data)", cfg.data), ("model (--model)", source.path)], suggest="new")
    if dist.main:
        recover_interrupted_save(out, dist)
    dist.barrier()
    resume_dir, replace = prepare_run_dir(out, cfg, dist)
    dist.barrier()  # every rank has looked at the run dir before rank 0 writes into it
    state_meta, state_tensors = read_state(resume_dir) if resume_dir is not None else (None, None)
    if dist.main:
        if replace:  # set aside, not deleted, until the new run has saved a checkpoint (owngpt.outdir.Replacement)
            guard.set_aside(out)
        check_writable(out)
        for stale in out.glob("checkpoints/.*.tmp-*"):  # a save interrupted by a kill: never the real checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        save_config(cfg, out / "config.yaml", notes=[f"model: {source.describe()}"])
    dist.barrier()

    # ---- model -------------------------------------------------------------------------------------------------
    dist.say(f"model: {source.describe()}")
    kind = "classify" if task.model_kind == "sequence_classification" else "lm"
    if resume_dir is not None and not cfg.lora:
        model = load_model(resume_dir, task=kind)  # the exact weights of the checkpoint
    else:
        model = build_model(source, tokenizer, task, cfg)
    if hasattr(task, "prepare_model"):
        task.prepare_model(model)  # task-specific surgery (e.g. classify: freeze the body)
    frozen = freeze(model, cfg.freeze_embeddings, cfg.freeze_layers)
    if frozen:
        dist.say(f"frozen: {len(frozen)} parameter tensors")
    if cfg.lora:
        model = apply_lora(model, cfg, task.model_kind)
        if resume_dir is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            check_adapter_dir(resume_dir / "adapter")  # a truncated adapter: an error naming it, not a traceback
            set_peft_model_state_dict(model, load_file(resume_dir / "adapter" / "adapter_model.safetensors"))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = dist.device
    model.to(device)
    raw = model  # the module we save and evaluate (DDP/compile wrap it for training only)
    n_params = sum(p.numel() for p in raw.parameters())
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    dist.say(f"parameters: {n_params:,} ({n_train:,} trained); block size {block_size}; task {cfg.task}")
    if n_train == 0:
        raise ConfigError("nothing to train: every parameter is frozen")

    placement = Placement(device, autocast_dtype(device, cfg.precision))
    configure_matmul(device)
    if dist.main:
        announce(placement, cfg.device)
    autocast = placement.autocast()

    fwd = parallelize(raw, dist, cfg.fsdp, cfg.lora)  # under torchrun: DDP, or FSDP2 sharding `raw` in place
    if cfg.compile and dist.world > 1:
        fwd = torch.compile(fwd)  # DDP/FSDP: compile the wrapped module (torch splits its graph at gradient buckets)
    # forward + loss, the part of the step that repeats: compiled as one function when alone (see train_step)
    step_loss = forward_and_loss(task, fwd, compile=cfg.compile and dist.world == 1)

    sharded = dist.world > 1 and cfg.fsdp
    optimizer, names, lr_scales = build_optimizer(raw, cfg, device.type, sharded)  # AdamW, or Muon + AdamW
    dist.say(describe_optimizer(cfg, optimizer))

    # ---- length of the run ----------------------------------------------------------------------------------------
    rows_per_step = cfg.batch_size * cfg.grad_accum * dist.world  # the global batch
    total_steps = cfg.max_steps or task.steps_for_epochs(cfg.epochs or 1.0, rows_per_step)
    eval_split = "val" if task.has_val() else "train"
    if eval_split == "train":
        dist.say("warning: no validation split; evaluating on the train split")

    # ---- resume -------------------------------------------------------------------------------------------------
    step, best, best_step, bad_evals = 0, None, None, 0
    if state_meta is not None:
        check_saved_optimizer(state_meta.get("config", {}), cfg.optimizer)
        load_optimizer(optimizer, names, state_meta, state_tensors, raw, sharded)
        step = state_meta["step"]
        best, best_step = reconcile_best(out / "checkpoints", state_meta, metric, dist)
        bad_evals = state_meta["bad_evals"]
        restore_rng(state_meta, state_tensors, dist.rank, dist.world)  # dropout goes on as it would have
        dist.say(f"resuming from step {step} ({resume_dir})")
        changed = changed_settings(state_meta.get("config", {}), cfg)
        if changed:
            dist.say(
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
        rngs = dist.gather(rng_state()) if with_state else []
        # full weights (FSDP: gathered) and optimizer state; collectives when sharded: every rank takes part
        full_weights, osd = full_state(raw, torch_optimizers(optimizer), sharded, with_state)
        if not dist.main:
            return
        if full_weights is not None:
            to_save = unsharded_copy(raw, full_weights)
        else:
            to_save = merged_copy(raw) if cfg.lora else raw
        gen = to_save.generation_config if getattr(to_save, "can_generate", lambda: False)() else None
        eos = task.generation_eos_ids()
        if gen is not None and eos:
            gen.eos_token_id = eos if len(eos) > 1 else eos[0]
            gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        if gen is not None:  # transformers' own generate stops at the trained context (docs/architecture.md)
            gen.max_length = trained_ctx
        meta = training_meta(
            task=cfg.task,
            source=_portable_source(source, out),
            step=step,
            metrics=metrics,
            block_size=block_size,
            trained_context=trained_ctx,
            lora=cfg.lora,
            data=data_summary,
            task_meta=task.checkpoint_meta(),
        )
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
                "config": portable_config(cfg, out),
            }
            extra.update(state_files(state, osd, rngs))
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
        last_metrics = read_meta(last_dir).get("metrics", {})  # the run had already finished
    dist.say(
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
