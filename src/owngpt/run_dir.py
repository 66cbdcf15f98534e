"""The checks a training run makes on its run dir (--out) before it writes there, and the repairs after a kill.

    prepare_run_dir             resume from checkpoints/last, start afresh, replace a run (--overwrite) or refuse
    recover_interrupted_save    what a killed process left: an --overwrite or a checkpoint save cut short
    reconcile_best              on resume: checkpoints/best never older than the best step the run reports
    check_writable              --out can be written (before the first file goes there)

The run dir's layout is in owngpt.train's docstring. The rules every command's --out follows (refuse what owngpt
did not make, replace by one rename) are owngpt.outdir's; this module applies them to a run, whose checkpoints a
killed process may have left half-swapped. Only rank 0 changes files; every rank reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from owngpt import atomic
from owngpt.atomic import recover_old
from owngpt.checkpoint import read_meta
from owngpt.config import TrainConfig
from owngpt.distributed import Dist
from owngpt.errors import ConfigError
from owngpt.outdir import RUN, Replacement, check_replaceable, kind_of
from owngpt.trainer_state import STATE_DIR


def prepare_run_dir(out: Path, cfg: TrainConfig, dist: Dist) -> tuple[Path | None, bool]:
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
        dist.say(f"--resume: no checkpoint in {out} yet, starting from step 0")
        return None, False
    if not used:
        return None, False
    if kind_of(out) == RUN and not run_started(out):
        dist.say(f"{out}: the run there stopped before its first step; starting it again in place")
        return None, False
    if kind_of(out) == RUN and not cfg.overwrite:
        raise ConfigError(
            f"--out {out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    return None, check_replaceable(out, RUN, cfg.overwrite)


def run_started(out: Path) -> bool:
    """Whether a run dir holds any progress: a checkpoint or a logged step."""
    ckpts = out / "checkpoints"
    if any((ckpts / n / "config.json").exists() for n in ("last", "best")):
        return True
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def recover_interrupted_save(out: Path, dist: Dist) -> None:
    """Leftovers of a killed process, before anything else looks at the run dir: an `--overwrite` cut short
    (owngpt.outdir.Replacement.recover), a save cut between two renames where the OS has no atomic exchange
    (`.last.old-PID` and no `last`: put back), and `.best.old-*` copies that are no longer needed."""
    note = Replacement.recover(out, run_started(out))
    if note:
        dist.say(note)
    for name in ("last", "best", "merged"):
        recover_old(out / "checkpoints" / name)


def reconcile_best(ckpts: Path, state: dict[str, Any], metric: str, dist: Dist) -> tuple[Any, Any]:
    """(best metric, best step) to resume with, such that checkpoints/best is never older than what is reported.

    Best is saved before last, so a kill between the two leaves best ahead of last (the replay saves it again).
    A run saved the other way round (older owngpt) can be cut with last saying "best at step N" and best still
    holding an earlier step: when last is itself that step, best is restored from it; otherwise the run reports
    what best really holds.
    """

    best, best_step = state["best_metric"], state["best_step"]
    best_dir = ckpts / "best"
    held = read_meta(best_dir).get("step") if (best_dir / "config.json").exists() else None
    if best_step is None or (held is not None and held >= best_step):
        return best, best_step
    if best_step == state["step"]:  # checkpoints/last holds the best weights: copy them (without trainer state)
        if dist.main:  # checkpoints are private to their owner (save_checkpoint's mode)
            with atomic.directory(best_dir, create=False, mode=0o700) as tmp:
                shutil.copytree(ckpts / "last", tmp, ignore=shutil.ignore_patterns(STATE_DIR))
        dist.say(f"checkpoints/best held step {held}, not the best step {best_step}: restored from checkpoints/last")
        return best, best_step
    if held is None:
        dist.say(f"warning: checkpoints/best (step {best_step}) is missing; the next improvement saves it again")
        return None, None
    value = read_meta(best_dir).get("metrics", {}).get(metric)
    dist.say(f"warning: checkpoints/best holds step {held}, not {best_step} (a save was cut short): resuming with it")
    return value, held


def check_writable(out: Path) -> None:
    """Create --out if needed and refuse it, with the fix, when nothing can be written there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable directory") from e
