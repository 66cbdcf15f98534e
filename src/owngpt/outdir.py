"""Where a command may write: the one place that decides whether an --out can be written and replaces it safely.

Every command that writes a directory (prepare, train, export, prune, tune) goes through here, so the rules hold
everywhere (docs/reliability.md, "Your files are never destroyed"):

1. An --out that equals, contains or lies inside one of the command's inputs (source files, the data dir, the
   checkpoint, the config file) is refused before anything is touched; symlinks are resolved first.
2. An existing, non-empty --out is replaced only with --overwrite, and only when owngpt made it and it is of the
   kind the command writes (`kind_of`: a data dir, a run, a checkpoint or export, a tune dir), recognised by the
   marker files owngpt writes. Anything else is refused, with --overwrite or without.
3. The new output is built in a sibling directory and swapped in with one atomic rename, so a failure or a kill at
   any moment leaves either the old output whole or the new one whole, never a mix and never neither.

This module is not about reading any of those formats: it only looks at their marker files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from owngpt import atomic
from owngpt.atomic import exchange, recover_old, swap_in  # noqa: F401  (importable from here, as before)
from owngpt.errors import ConfigError

# The kinds of directory owngpt makes, and how each is recognised (what kind_of returns).
DATA, RUN, CHECKPOINT, TUNE = "data", "run", "checkpoint", "tune"
DESCRIBED = {
    DATA: "a data dir (made by `owngpt prepare`)",
    RUN: "a training run (made by `owngpt train`)",
    CHECKPOINT: "a checkpoint or export (made by `owngpt train/export/prune`)",
    TUNE: "a tuning study (made by `owngpt tune`)",
}
RUN_CONFIG_HEADER = "# Resolved config of this run"  # first line of RUN/config.yaml (owngpt.config.save_config)

Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]


# ----------------------------------------------------------------------------------------------- what owngpt made
def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def kind_of(path: str | os.PathLike) -> str | None:
    """Which kind of owngpt directory `path` is (DATA, RUN, CHECKPOINT, TUNE), or None when owngpt did not make it.

    Only owngpt's own marker files count: a data dir's meta.json with format "owngpt-data"; a checkpoint's
    owngpt.json (train, export --to hf/int8, prune), or an export's report.json written by export or prune (onnx,
    gguf); a run's config.yaml with owngpt's header line; a tune dir's study.db or best.yaml beside trial_* runs.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "meta.json").is_file() and _json(p / "meta.json").get("format") == "owngpt-data":
        return DATA
    if (p / "owngpt.json").is_file():
        return CHECKPOINT
    if (p / "report.json").is_file() and _json(p / "report.json").get("command") in ("export", "prune"):
        return CHECKPOINT
    config = p / "config.yaml"
    if config.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError), open(config, encoding="utf-8") as f:
            if f.readline().startswith(RUN_CONFIG_HEADER):
                return RUN
    if (p / "study.db").is_file() or (p / "best.yaml").is_file() or any(p.glob("trial_[0-9]*")):
        return TUNE
    return None


# ------------------------------------------------------------------------------------------------- out vs inputs
def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or child.is_relative_to(parent)


def check_out(out: str | os.PathLike, inputs: Inputs, *, flag: str = "--out", suggest: str = "out") -> Path:
    """Refuse an `out` that equals, contains or lies inside one of `inputs`; returns `out` with symlinks resolved.

    `inputs` are (what, path) pairs, e.g. ("data dir (--data)", "data/x"); a None path or one that does not exist
    is skipped (a model preset's name is not a path). Both sides are resolved (symlinks included) first, so a link
    to the input is caught too. `suggest` names a sibling to propose in the message (e.g. "export").
    """
    o = _real(out)
    for what, given in inputs:
        if given is None or not os.path.lexists(Path(given).expanduser()):
            continue
        i = _real(given)
        if o == i:
            problem = f"is the {what} {given} itself"
        elif _inside(i, o):
            problem = f"contains the {what} {given}"
        elif _inside(o, i):
            problem = f"lies inside the {what} {given}"
        else:
            continue
        raise ConfigError(
            f"{f'{flag} {out}'.strip()} {problem}: writing there could replace or delete it, so nothing was "
            f"written; {_fix(o, inputs, flag, suggest)}"
        )
    return o


def check_out_file(
    path: str | os.PathLike,
    inputs: Inputs,
    *,
    ours: Callable[[Path], bool],
    what: str,
    example: str,
    flag: str = "",
) -> Path:
    """The rules above for an output that is one file (a chat transcript, predictions): refuse a folder, a path
    that is, holds or lies inside one of `inputs` (check_out), and an existing file `ours` does not recognise as
    owngpt's own `what` (an earlier one is replaced, which the commands document). Returns the path, ~ expanded."""
    p = Path(path).expanduser()
    label = f"{flag} {path}".strip()
    check_out(p, inputs, flag=flag, suggest=example)  # e.g. notes-chat.json next to the input
    if p.is_dir():
        raise ConfigError(f"{label} is a folder: choose a file name, e.g. {f'{flag} {p / example}'.strip()}")
    if os.path.lexists(p) and not ours(p):
        raise ConfigError(
            f"{label} already exists and is not {what} owngpt wrote: owngpt does not replace your files, so "
            "nothing was written; choose a new file name"
        )
    return p


def _fix(o: Path, inputs: Inputs, flag: str, suggest: str) -> str:
    """The fix for check_out's message: a concrete --out that passes the check, when one is easy to find."""
    paths = [_real(p) for _, p in inputs if p is not None and os.path.lexists(Path(p).expanduser())]
    name = f"an {flag}" if flag else "a path"
    anchors = [o] + [p for p in paths if _inside(o, p)]  # next to out, or next to the input that holds it
    for a in reversed(anchors):
        for n in range(1, 100):
            cand = a.parent / f"{a.stem if a.is_file() else a.name}-{suggest}{'' if n == 1 else n}"
            if cand.exists():
                continue
            if not any(cand == p or _inside(p, cand) or _inside(cand, p) for p in paths):
                return f"choose {name} outside your inputs, e.g. {f'{flag} {_short(cand)}'.strip()}"
    return f"choose {name} outside your inputs"


def _short(p: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(p.relative_to(Path.cwd().resolve()))
    return str(p)


def check_replaceable(
    out: str | os.PathLike, kind: str, overwrite: bool, *, flag: str = "--out", shown: str | os.PathLike | None = None
) -> bool:
    """May `out` be written? False when it does not exist or is empty, True when --overwrite replaces owngpt's
    `kind` there; otherwise a ConfigError saying why and what to do. Nothing is touched. `shown`: the path as
    the user typed it, for the message."""
    p = Path(out)
    out = shown if shown is not None else out
    if not os.path.lexists(p):
        return False
    if not p.is_dir():
        raise ConfigError(
            f"{flag} {out} is a file, not a directory: owngpt does not replace files it did not make; "
            f"choose another {flag}"
        )
    if not any(p.iterdir()):
        return False
    found = kind_of(p)
    if found != kind:
        what = DESCRIBED[found] if found else "not something owngpt made"
        raise ConfigError(
            f"{flag} {out} already exists and is {what}; this command writes {DESCRIBED[kind].split(' (')[0]}, "
            f"and owngpt replaces only its own output of that kind, even with --overwrite: "
            f"choose another {flag}, or move {out} away yourself"
        )
    if not overwrite:
        raise ConfigError(
            f"{flag} {out} already exists ({DESCRIBED[kind].split(' (')[0]}): pass --overwrite to replace it "
            f"(the old one stays whole until the new one is complete), or choose another {flag}"
        )
    return True


# ---------------------------------------------------------------------------------------------- atomic replacement
# The mechanism (a directory built aside and swapped in) is owngpt.atomic's: `replacing` adds the rules above to it.


@contextlib.contextmanager
def replacing(
    out: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool,
    inputs: Inputs = (),
    flag: str = "--out",
    suggest: str = "out",
    create: bool = False,
) -> Iterator[Path]:
    """Check `out` (check_out, check_replaceable), then yield a path beside it to build the new output in.

    The yielded path does not exist yet (writers that make their own dir, like save_checkpoint) unless `create`.
    When the block ends without error the new output is swapped in atomically (swap_in); on any error, or if the
    block wrote nothing, it is removed and `out` is as it was.
    """
    inputs = list(inputs)
    o = check_out(out, inputs, flag=flag, suggest=suggest)
    check_replaceable(o, kind, overwrite, flag=flag, shown=out)
    with contextlib.ExitStack() as stack:
        try:
            new = stack.enter_context(atomic.directory(o, create=create))
        except OSError as e:
            raise ConfigError(f"cannot write {out}: {e.strerror or e}; choose a writable {flag}") from e
        yield new


def _remove(p: Path) -> None:
    """Remove a directory owngpt set aside; a symlinked --out was set aside as the link itself: unlink only it."""
    if p.is_symlink():
        p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------- a run replaced in place
class Replacement:
    """`owngpt train --overwrite`: the old run is set aside (renamed, not deleted) while the new one starts in its
    place, and removed only once the new run has saved its first checkpoint (`commit`). If the new run fails
    before that, `rollback` puts the old run back; if it is killed, the next `owngpt train` on that --out does
    (`recover`). Training writes into its run dir as it goes, so it cannot be built aside like a data dir.
    """

    def __init__(self) -> None:
        self.out: Path | None = None
        self.aside: Path | None = None

    def set_aside(self, out: Path) -> None:
        self.out = out
        self.aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(self.aside)

    def commit(self) -> None:
        if self.aside is not None:
            _remove(self.aside)
            self.aside = None

    def rollback(self) -> None:
        if self.aside is None or self.out is None:
            return
        # what is at `out` now was made by this process since set_aside (an unfinished run): safe to remove
        if os.path.lexists(self.out):
            shutil.rmtree(self.out)
        self.aside.rename(self.out)
        self.aside = None

    @staticmethod
    def recover(out: Path, started: bool) -> str | None:
        """Clean up after a killed `--overwrite`: a new run that got going keeps its place (the old one is removed),
        one that did not is dropped and the old run put back. Returns a note for the user, or None."""
        prefix = f".{out.name}.replaced-"
        left = [p for p in out.parent.glob(f"{prefix}*") if atomic.is_stale(p, prefix)]
        if not left:
            return None
        left.sort(key=lambda p: p.stat().st_mtime)
        if started:
            for p in left:
                _remove(p)
            return None
        if os.path.lexists(out):
            if kind_of(out) != RUN and (not out.is_dir() or any(out.iterdir())):
                return None  # something else is there now: leave both alone
            shutil.rmtree(out)  # the killed run's unstarted replacement (owngpt's config.yaml, no step yet)
        left.pop().rename(out)
        for p in left:
            _remove(p)
        return f"{out}: an earlier --overwrite was interrupted before its first checkpoint; the old run is back"
