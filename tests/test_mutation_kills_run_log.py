"""owngpt.run_log on its own (#25): what metrics.jsonl holds after a fresh start and after a resume, the TensorBoard
scalars and when they reach the disk, loss.png (its pixels, and the figure it was saved from), and the errors that
name the file that could not be written. Oracles: the lines written in the test, the event files decoded with
tensorboardX's protobuf (not owngpt's code), the PNG's pixels read with Pillow, the record written in the test."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from owngpt.errors import CheckpointError
from owngpt.run_log import RunLog


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in RUN/tb's event files: TFRecord framing (length, crc, data, crc) around Event protobufs."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_a_resume_keeps_the_lines_up_to_its_step_and_drops_the_replayed_ones(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [{"step": 2, "train_loss": 3.0}, {"step": 4, "val_loss": 2.5}, {"step": 6, "train_loss": 2.0}]
        )
        + "{cut short\n",  # a line a kill left half written
        encoding="utf-8",
    )
    log = RunLog(tmp_path, True, 4)
    log.write({"step": 5, "train_loss": 1.0})
    log.close()
    want = [{"step": 2, "train_loss": 3.0}, {"step": 4, "val_loss": 2.5}, {"step": 5, "train_loss": 1.0}]
    assert _lines(tmp_path) == want
    assert log.history == want  # what loss.png draws


@pytest.mark.parametrize("resume_step", [0, 3])
def test_a_resume_drops_only_the_lines_of_replayed_steps_and_keeps_a_line_without_a_step(tmp_path, resume_step):
    """Only the steps after the checkpoint are replayed, so only their lines go; a record that names no step (a note
    added by hand) belongs to none of them and stays, whatever the step resumed from, even step 0."""
    note = {"note": "lr raised by hand"}
    lines = [note, {"step": 0, "val_loss": 3.0}, {"step": 1, "train_loss": 2.5}, {"step": 4, "train_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    log = RunLog(tmp_path, True, resume_step)
    log.close()
    want = [r for r in lines if r.get("step") is None or r["step"] <= resume_step]
    assert want[0] == note and len(want) == (2 if resume_step == 0 else 3)
    got = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert got == want and log.history == want


def test_a_fresh_start_begins_an_empty_record_and_a_resume_without_one_starts_it(tmp_path):
    # a run restarted in place (it had logged nothing worth keeping) does not read the old file at all
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9, "train_loss": 1.0}) + "\n", encoding="utf-8")
    RunLog(tmp_path, True, None).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    # a resume whose run dir has no metrics.jsonl (deleted by hand): an empty one, not a FileNotFoundError
    other = tmp_path / "other"
    other.mkdir()
    log = RunLog(other, True, 3)
    log.close()
    assert (other / "metrics.jsonl").read_text() == "" and log.history == []


def test_tensorboard_gets_each_finite_number_but_the_step(tmp_path):
    log = RunLog(tmp_path, True, None)
    log.write({"step": 3, "train_loss": 1.5, "lr": 0.25, "tokens_per_s": 100})
    log.write({"step": 4, "val_loss": math.nan, "accuracy": 0.5, "note": "text"})
    log.close()
    assert _scalars(tmp_path) == {
        "train_loss": [(3, 1.5)],
        "lr": [(3, 0.25)],
        "tokens_per_s": [(3, 100.0)],
        "accuracy": [(4, 0.5)],
    }
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3, 4]


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the empty record's legend: nothing to name
def test_loss_png_draws_the_train_and_validation_curves_at_700_by_400(tmp_path):
    """loss.png is 700 x 400 and each curve changes it (compared with the plot of an empty record, pixel by pixel:
    colours and styles are matplotlib's, whatever its settings)."""
    from PIL import Image

    def pixels(run: Path) -> list:
        img = Image.open(run / "loss.png").convert("RGB")
        assert img.size == (700, 400)
        return list(img.getdata())

    empty = tmp_path / "empty"
    empty.mkdir()
    log = RunLog(empty, True, None)
    log.plot()
    log.close()
    log = RunLog(tmp_path, True, None)
    for s in range(1, 6):
        log.write({"step": s, "train_loss": 3.0 - s * 0.4})
    log.plot()
    only_train = pixels(tmp_path)
    for s in (2, 4):
        log.write({"step": s, "val_loss": 2.0 - s * 0.1})
    log.plot()
    log.close()
    both = pixels(tmp_path)
    assert pixels(empty) != only_train != both


def test_a_rank_other_than_0_writes_nothing(tmp_path):
    log = RunLog(tmp_path, False, None)
    log.write({"step": 1, "train_loss": 1.0})
    log.plot()
    log.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["metrics.jsonl", "loss.png"])
def test_a_file_that_cannot_be_written_is_named_with_the_way_to_continue(tmp_path, what):
    log = RunLog(tmp_path, True, None)
    if what == "metrics.jsonl":
        (tmp_path / what).unlink()
    (tmp_path / what).mkdir()  # a directory in its place: the write fails with an OSError, like a full disk
    with pytest.raises(CheckpointError) as e:
        log.write({"step": 1, "train_loss": 1.0})
        log.plot()
    log.close()
    msg = str(e.value)
    assert msg.startswith(f"cannot write {tmp_path / what}: ") and msg.endswith("continue with --resume")


def test_loss_png_is_loss_against_step_with_its_axes_named_a_grid_and_a_legend(tmp_path, monkeypatch):
    """What loss.png shows, read from the matplotlib figure it was saved from (not the pixels): each curve's points
    are the record's, the axes say "step" and "loss", the grid is drawn, the legend names both curves."""
    from matplotlib.figure import Figure

    saved: list = []
    savefig = Figure.savefig

    def recording(self, *args, **kwargs):
        saved.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    log = RunLog(tmp_path, True, None)
    for s in range(1, 6):
        log.write({"step": s, "train_loss": 3.0 - s * 0.5, "lr": 0.1})
    for s in (2, 4):
        log.write({"step": s, "val_loss": 2.5 - s * 0.25})
    log.plot()
    log.close()
    assert (tmp_path / "loss.png").stat().st_size > 0 and len(saved) == 1
    (ax,) = saved[0].axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "loss")
    grid = ax.xaxis.get_gridlines() + ax.yaxis.get_gridlines()
    assert grid and all(line.get_visible() for line in grid)
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert curves == {
        "train loss": ([1, 2, 3, 4, 5], [2.5, 2.0, 1.5, 1.0, 0.5]),
        "val loss": ([2, 4], [2.0, 1.5]),
    }
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "val loss"]
