"""The report of an `owngpt tune` study: `OUT/best.yaml` (a config `owngpt train --config` takes), `OUT/summary.md`
and `OUT/summary.csv` (every trial, its state, value and parameters), the plots `OUT/history.png` and
`OUT/importances.png`, and the summary table printed at the end.
"""

from __future__ import annotations

import csv
import io
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt import atomic
from owngpt.console import say_above_bar
from owngpt.tune.space import format_value


@dataclass
class TuneResult:
    """What a search produced. `best_*` are None when no trial completed."""

    study_name: str
    storage: str
    metric: str
    direction: str
    n_finished: int
    n_complete: int
    n_pruned: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    best_config: Path | None
    summary: Path
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def write_report(
    study: Any,
    out: Path,
    *,
    metric: str,
    direction: str,
    url: str,
    command: str,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Write OUT/best.yaml, OUT/summary.md, OUT/summary.csv and the PNG plots of a study; print the summary table."""
    import yaml

    log = log or say_above_bar
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    best = None
    if complete:
        best = study.best_trial
    notes: list[str] = []

    best_path = None
    if best is not None:
        cfg = dict(best.user_attrs.get("config") or {})
        if cfg:
            cfg["out"] = str(out / "best_run")
            cfg["resume"] = False
            cfg["overwrite"] = False
            cfg["extra"] = {
                **(cfg.get("extra") or {}),
                "tune": {"study": study.study_name, "storage": url, "trial": best.number, metric: best.value},
            }
            params = ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
            header = (
                f"# Best config of the Optuna study '{study.study_name}' ({url}), found by:\n"
                f"#   {command}\n"
                f"# trial {best.number}: {metric} = {best.value:.6g} ({direction}) with {params}\n"
                f"# {len(complete)} complete and {len(pruned)} pruned trials. The trial budget was max_steps="
                f"{cfg.get('max_steps')}, epochs={cfg.get('epochs')}: raise them for a longer run.\n"
                f"# Train it: owngpt train --config {out / 'best.yaml'}\n"
            )
            best_path = out / "best.yaml"
            atomic.write_text(best_path, header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        else:
            notes.append(f"trial {best.number} has no stored config (it was not created by owngpt tune)")

    names = list(dict.fromkeys(k for t in trials for k in t.params))
    header_row = ["trial", "state", metric, *names, "steps", "seconds", "run_dir"]
    rows = []
    for t in trials:
        value = (
            t.value
            if t.value is not None
            else (t.intermediate_values[t.last_step] if t.last_step is not None else None)
        )
        rows.append(
            [
                t.number,
                t.state.name + (" (best)" if best is not None and t.number == best.number else ""),
                "" if value is None else f"{value:.5g}",
                *[format_value(t.params[k]) if k in t.params else "" for k in names],
                t.user_attrs.get("steps", "" if t.last_step is None else t.last_step),
                t.user_attrs.get("seconds", ""),
                t.user_attrs.get("run_dir", ""),
            ]
        )

    plots: dict[str, Path] = {}
    plots_note = _plots(study, out, plots, metric)
    notes += plots_note

    table = "| " + " | ".join(map(str, header_row)) + " |\n|" + "---|" * len(header_row) + "\n"
    table += "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows)
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    md = [
        f"# Study '{study.study_name}'",
        "",
        f"- storage: `{url}`",
        f"- command: `{command}`",
        f"- objective: {direction} {metric} (a trial's value is its best evaluation; pruned trials show their last)",
        "- trials: " + ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n),
    ]
    if best is not None:
        md.append(
            f"- best: trial {best.number}, {metric} = {best.value:.6g}, "
            + ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
        )
        if best_path:
            md.append(f"- best config: `{best_path}` (`owngpt train --config {best_path}`)")
    else:
        md.append("- best: none (no trial completed)")
    md += ["", table]
    for name, path in plots.items():
        md.append(f"![{name}]({path.name})")
    md += [f"Note: {n}" for n in notes]
    atomic.write_text(out / "summary.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header_row)
    writer.writerows(rows)
    atomic.write_text(out / "summary.csv", buf.getvalue())

    print(table, end="")
    if best is not None:
        print(f"best: trial {best.number}, {metric} {best.value:.6g}; config {best_path}")
    for n in notes:
        log(f"note: {n}")
    return TuneResult(
        study_name=study.study_name,
        storage=url,
        metric=metric,
        direction=direction,
        n_finished=len(complete) + len(pruned),
        n_complete=len(complete),
        n_pruned=len(pruned),
        best_value=None if best is None else best.value,
        best_params={} if best is None else dict(best.params),
        best_trial=None if best is None else best.number,
        best_config=best_path,
        summary=out / "summary.md",
        plots=plots,
        notes=notes,
    )


def _plots(study: Any, out: Path, plots: dict[str, Path], metric: str) -> list[str]:
    """Optuna's matplotlib plots: optimization history and parameter importances. Failures become notes."""
    notes: list[str] = []
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return ["no plots: matplotlib is not installed (pip install matplotlib)"]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    jobs = [("history", ovm.plot_optimization_history, 1), ("importances", ovm.plot_param_importances, 2)]
    # optuna's plots call plt.style.use("ggplot"), which changes matplotlib's settings for the whole process (every
    # later loss.png or report plot of the same process would come out in its style): restored when they are done
    with matplotlib.rc_context():
        for name, fn, needed in jobs:
            if len(complete) < needed:
                notes.append(
                    f"no {name} plot: it needs at least {needed} complete trial(s), the study has {len(complete)}"
                )
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = fn(study, target_name=metric)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                path = out / f"{name}.png"
                try:
                    with atomic.aside(path) as tmp:
                        fig.savefig(tmp, dpi=100, format="png")
                finally:
                    plt.close(fig)
                plots[name] = path
            except Exception as e:  # e.g. importances of a study whose parameters never varied
                notes.append(f"no {name} plot: {type(e).__name__}: {e}")
    return notes


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed, for the header of best.yaml."""
    argv = list(sys.argv if argv is None else argv)
    argv[0] = "owngpt" if argv and Path(argv[0]).name in ("owngpt", "__main__.py", "cli.py") else argv[0]
    return shlex.join(argv)
