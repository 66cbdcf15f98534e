"""A training run's record: RUN/metrics.jsonl, RUN/tb/ (TensorBoard) and RUN/loss.png, written by rank 0.

    RUN/metrics.jsonl    one JSON object per log line ("train_loss", "lr", "tokens_per_s") and per evaluation
                         ("val_loss", ...), each with its "step"; a resumed run first drops the lines the killed run
                         logged after its last checkpoint (they are replayed)
    RUN/tb/              the same numbers as TensorBoard event files
    RUN/loss.png         train and validation loss against step, redrawn at each evaluation

It is not what is logged or when (the loop, owngpt.train) nor the end-of-run report (owngpt.report).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from owngpt import atomic
from owngpt.errors import CheckpointError


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
        atomic.write_text(f, "".join(json.dumps(r) + "\n" for r in self.history))
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
        try:
            with atomic.aside(self.run_dir / "loss.png") as tmp:
                fig.savefig(tmp, format="png")
        except OSError as e:
            raise CheckpointError(
                f"cannot write {self.run_dir / 'loss.png'}: {e.strerror or e} (disk full?); "
                "checkpoints/last is intact: free space and continue with --resume"
            ) from e

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
