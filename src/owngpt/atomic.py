"""Write aside, then rename: the one way owngpt writes a file or a directory, so a failure never leaves half of one.

Files: `write_bytes`, `write_text`, `write_json` (or `aside` / `open_aside` for writers that need a path or a file
object, such as matplotlib's savefig or a YAML dump) write a temporary file in the same directory and `os.replace`
it over the target. An error (a full disk, a bug, Ctrl-C) removes the temporary file and leaves the old target
whole; a kill at any moment leaves either the old file or the new one. The new file gets the usual permissions
(0o666 less the umask, as `open()` gives), or `mode` when a caller keeps its files private.

Directories: `directory(out)` yields a path beside `out` to build the new directory in; when the block ends without
error it is swapped in atomically (`swap_in`: one renameat2 RENAME_EXCHANGE where the OS has it, else two renames
that `recover_old` can undo after a kill), and on any error it is removed and `out` is as it was.

`fsync=True` flushes the data to the disk before the rename (a checkpoint: losing power right after must not leave
an empty file under the new name); the small files owngpt writes skip it, as they always have.

This module is at the bottom: it imports nothing of owngpt's. Deciding *whether* an output may be replaced (the
user's own files never are) is owngpt.outdir's job, which builds on this one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "aside",
    "directory",
    "exchange",
    "is_stale",
    "open_aside",
    "recover_old",
    "swap_in",
    "usual_mode",
    "write_bytes",
    "write_json",
    "write_text",
]


def usual_mode(directory: bool = False) -> int:
    """The permissions `open()` / `mkdir()` give a new file or directory: 0o666 / 0o777 less the umask."""
    mask = os.umask(0)  # the only way to read the umask; set back at once
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


# ---------------------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def aside(path: str | os.PathLike, *, mode: int | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so tools that infer a format from it work); when the block
    ends without error it is renamed over `path`, on any error it is removed. The parent dir must exist."""
    p = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.tmp-", suffix=p.suffix, dir=p.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, usual_mode() if mode is None else mode)  # mkstemp makes files private (0o600)
        finally:
            os.close(fd)
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_aside(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
    file_mode: int | None = None,
    fsync: bool = False,
) -> Iterator[IO[Any]]:
    """`open(path, mode)` for writing, aside: the file object writes a temporary file renamed over `path` at the end."""
    binary = "b" in mode
    with aside(path, mode=file_mode, fsync=fsync) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as f:
            yield f


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically (aside, then renamed); returns the path."""
    with open_aside(path, "wb", file_mode=mode, fsync=fsync) as f:
        f.write(data)
    return Path(path)


def write_text(
    path: str | os.PathLike,
    text: str,
    *,
    encoding: str = "utf-8",
    newline: str | None = None,
    mode: int | None = None,
    fsync: bool = False,
) -> Path:
    """Write `text` to `path` atomically (aside, then renamed); returns the path."""
    with open_aside(path, "w", encoding=encoding, newline=newline, file_mode=mode, fsync=fsync) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, mode: int | None = None, fsync: bool = False) -> Path:
    """Write `obj` as UTF-8 JSON (indent 2, non-ASCII kept, a final newline) atomically; returns the path."""
    text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"  # serialised first: a bad object writes nothing
    return write_text(path, text, mode=mode, fsync=fsync)


def fsync_tree(d: str | os.PathLike) -> None:
    """fsync every file under `d` (before a rename publishes it)."""
    for f in Path(d).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------------- directories
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    Python has no binding for renameat2; ctypes reaches glibc's (2.28+). Filesystems without support answer
    EINVAL/ENOSYS/EOPNOTSUPP and the caller falls back to two renames.
    """
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, out: Path) -> None:
    """Put the finished directory `new` (a sibling of `out`) at `out`; the old `out`, if any, is removed after.

    With RENAME_EXCHANGE there is no moment without a whole `out`. Elsewhere the old one is renamed aside as
    `.NAME.old-PID` first; a kill between the two renames leaves it there, and `recover_old` puts it back.
    """
    if os.path.lexists(out) and exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old output
        return
    if os.path.lexists(out):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if os.path.lexists(old):
            shutil.rmtree(old)
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


def recover_old(out: Path) -> None:
    """Undo a swap_in cut between its two renames (no `out`, a `.NAME.old-*` beside); remove stale `.old-*` else."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return
    if not os.path.lexists(out):
        olds.pop().rename(out)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(p: Path, prefix: str) -> bool:
    """A `{prefix}PID[-...]` sibling (e.g. `.NAME.tmp-PID-xyz`) left by a process that is gone (killed mid-write)."""
    pid = p.name[len(prefix) :].split("-", 1)[0]
    return p.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid))


@contextlib.contextmanager
def directory(
    out: str | os.PathLike, *, create: bool = True, fsync: bool = False, mode: int | None = None
) -> Iterator[Path]:
    """Yield a path beside `out` to build a new directory in; on success it replaces `out` atomically (swap_in).

    The path is `.NAME.tmp-PID-xyz/NAME`: it exists when the block starts only with `create` (writers that make
    their own directory want it absent). On any error, or when the block wrote nothing, it is removed and `out` is
    as it was. Before building, a swap cut by a kill is undone (`recover_old`) and builds left by killed processes
    are removed. `fsync`: every file is flushed to disk before the swap. The new directory gets the usual
    permissions, or `mode`.
    """
    o = Path(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    recover_old(o)
    prefix = f".{o.name}.tmp-"
    for left in o.parent.glob(f"{prefix}*"):  # builds of killed processes
        if is_stale(left, prefix):
            shutil.rmtree(left, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=o.parent))
    new = stage / o.name
    try:
        if create:
            new.mkdir()
        yield new
        if not new.exists():
            raise RuntimeError(f"nothing was written for {out}")
        if fsync:
            fsync_tree(new)
        os.chmod(new, usual_mode(directory=True) if mode is None else mode)
        swap_in(new, o)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
