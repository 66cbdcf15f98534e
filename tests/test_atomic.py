"""owngpt.atomic: files and directories are written aside and renamed into place, so a failure at any point leaves
the old file or directory whole and nothing of the attempt behind."""

import json
import os
import stat

import pytest

from owngpt import atomic


class Boom(Exception):
    pass


def names(d):
    return sorted(p.name for p in d.iterdir())


def mode_of(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_writes_bytes_text_and_json(tmp_path):
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic.write_text(tmp_path / "t.txt", "héllo\n")
    atomic.write_json(tmp_path / "j.json", {"k": "é", "n": [1]})
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "j.json").read_text(encoding="utf-8")
    assert text == json.dumps({"k": "é", "n": [1]}, ensure_ascii=False, indent=2) + "\n" and "é" in text
    assert names(tmp_path) == ["b.bin", "j.json", "t.txt"]  # no temporary file left


def test_new_files_get_the_usual_permissions_or_the_mode_asked(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "usual.txt", "x")
        atomic.write_text(tmp_path / "private.txt", "x", mode=0o600)
    finally:
        os.umask(mask)
    assert mode_of(tmp_path / "usual.txt") == 0o644  # as open() gives, not mkstemp's 0o600
    assert mode_of(tmp_path / "private.txt") == 0o600


def test_a_failure_mid_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("old contents", encoding="utf-8")
    with pytest.raises(Boom), atomic.open_aside(f) as out:
        out.write("half of the new")
        raise Boom
    assert f.read_text(encoding="utf-8") == "old contents"
    assert names(tmp_path) == ["notes.txt"]


def test_an_object_that_is_not_json_writes_nothing(tmp_path):
    f = tmp_path / "x.json"
    f.write_text("{}\n")
    with pytest.raises(TypeError):
        atomic.write_json(f, {"bad": object()})
    assert f.read_text() == "{}\n" and names(tmp_path) == ["x.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    f = tmp_path / "x.json"
    f.write_text("old")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(OSError):
        atomic.write_json(f, {"new": 1})
    assert f.read_text() == "old" and names(tmp_path) == ["x.json"]


def test_aside_keeps_the_suffix_for_tools_that_infer_a_format(tmp_path):
    with atomic.aside(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".plot.png.tmp-")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png" and names(tmp_path) == ["plot.png"]


def test_fsync_flushes_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    atomic.write_text(tmp_path / "a", "x")
    assert synced == []  # small files skip it, as they always did
    atomic.write_text(tmp_path / "b", "x", fsync=True)
    assert len(synced) == 1


# ----------------------------------------------------------------------------------------------------- directories
def test_directory_is_built_aside_and_swapped_in(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "v").write_text("old")
    with atomic.directory(out) as new:
        assert new.is_dir() and new.name == "out" and new.parent.name.startswith(".out.tmp-")
        (new / "v").write_text("new")
        assert (out / "v").read_text() == "old"  # nothing is visible before the block ends
    assert (out / "v").read_text() == "new" and names(tmp_path) == ["out"]


def test_a_failure_while_building_a_directory_leaves_the_old_one_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "v").write_text("old")
    with pytest.raises(Boom), atomic.directory(out) as new:
        (new / "v").write_text("half")
        raise Boom
    assert names(out) == ["v"] and (out / "v").read_text() == "old" and names(tmp_path) == ["out"]


def test_a_directory_block_that_wrote_nothing_replaces_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "v").write_text("old")
    with pytest.raises(RuntimeError, match="nothing was written"), atomic.directory(out, create=False):
        pass
    assert (out / "v").read_text() == "old" and names(tmp_path) == ["out"]


def test_builds_left_by_killed_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".out.tmp-999999999-abc"  # no such pid
    live = tmp_path / f".out.tmp-{os.getpid()}-xyz"  # this process: may be building right now
    dead.mkdir()
    live.mkdir()
    with atomic.directory(tmp_path / "out") as new:
        (new / "v").write_text("x")
    assert names(tmp_path) == [live.name, "out"]


def test_directory_mode_and_fsync(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    mask = os.umask(0o022)
    try:
        with atomic.directory(tmp_path / "a") as new:
            (new / "f").write_text("x")
        with atomic.directory(tmp_path / "b", fsync=True, mode=0o700) as new:
            (new / "f").write_text("x")
            (new / "g").write_text("y")
    finally:
        os.umask(mask)
    assert mode_of(tmp_path / "a") == 0o755 and mode_of(tmp_path / "b") == 0o700
    assert len(synced) == 2  # every file of the fsync'd directory, none of the other
