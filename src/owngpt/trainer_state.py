"""The trainer state that makes `owngpt train --resume` exact: written with each checkpoints/last, read back on resume.

    RUN/checkpoints/last/trainer/state.json          step, best metric and patience counter, the run's config,
                                                     optimizer param groups, python/numpy RNG states of every rank
    RUN/checkpoints/last/trainer/tensors.safetensors optimizer state (AdamW moments; Muon's momentum) by parameter
                                                     name, torch (and cuda) RNG states of every rank

Everything that decides the future of a run is there, inside checkpoints/last so that weights and trainer state are
replaced together by one rename. The learning rate is a pure function of the step (so the "scheduler" is the step)
and a task's batch at step s a pure function of (seed, s), so neither needs state of its own. Tensors go to
safetensors and the rest to JSON: nothing is unpickled on resume.

It is not the checkpoint's weights or owngpt.json (owngpt.checkpoint) nor the loop that decides when to save
(owngpt.train).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from owngpt.checkpoint import run_relative
from owngpt.config import TrainConfig
from owngpt.errors import CheckpointError
from owngpt.optim import torch_optimizers

STATE_DIR = "trainer"  # inside checkpoints/last: state.json + tensors.safetensors
STATE_VERSION = 1


# --- random number generators (dropout, and any user code) -----------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and cuda) generator states."""
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (after a JSON round trip of its python and numpy parts)."""
    import numpy as np
    import torch

    random.setstate(_tupled(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_rng(meta: dict[str, Any], tensors: dict[str, Any], rank: int, world: int) -> None:
    """Set this rank's generators as the saved run left them: its own rank's states when the world size is the
    same, else rank 0's (a resume on another number of processes cannot be exact anyway)."""
    r = rank if meta["world_size"] == world else 0
    rng = dict(meta["rng"][r], torch=tensors[f"rng/{r}/torch"])
    if f"rng/{r}/cuda" in tensors:
        rng["cuda"] = tensors[f"rng/{r}/cuda"]
    set_rng_state(rng)


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (list, tuple)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


# --- writing and reading ---------------------------------------------------------------------------------------
def state_files(state: dict[str, Any], osd: dict[str, Any], rngs: list[dict[str, Any]]) -> dict[str, bytes]:
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


def load_optimizer(
    optimizer: Any, names: list[str], meta: dict[str, Any], tensors: dict[str, Any], model: Any, sharded: bool = False
) -> None:
    """Load the saved optimizer state into `optimizer` (whose trainable parameters are `names`)."""
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


# --- the run's settings, saved with the state --------------------------------------------------------------------
# settings a resumed run may change without breaking exactness (they change how long, or what is logged)
FREE_ON_RESUME = {
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


def portable_config(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """The config saved in trainer/state.json, its paths relative to the run (data, model dir) or none."""
    saved = dataclasses.asdict(cfg)
    saved["out"] = "."
    saved["data"] = run_relative(cfg.data, out)
    if cfg.model and Path(cfg.model).exists():  # a local checkpoint, not a preset or Hub name
        saved["model"] = run_relative(cfg.model, out)
    return saved


def changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings that differ from the interrupted run's and make the resumed run differ from an uninterrupted one."""
    now = dataclasses.asdict(cfg)
    return sorted(k for k, v in saved.items() if k not in FREE_ON_RESUME and k in now and now[k] != v)
