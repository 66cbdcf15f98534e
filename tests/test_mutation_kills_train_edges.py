"""What the training loop does that no earlier test looked at, found by reading all 185 mutants of `_train` and
`_improves` against the tests of train's selection and a line-coverage run of it (#25, 12-01 night), before the
loop's seed 12: the speed and the loss the log reports (a clock stood in for), dropout off while evaluating, the
python and numpy generators a run seeds and each rank's torch seed, the model moved to the run's device,
a save cut by a kill left as a temp dir, patience met at the last step, the early-stop line, and the TensorBoard
writer closed at the end; then train.py outside the loop (never sampled before: its first ten mutants all survived):
which way a metric improves, the barrier before leaving the process group, the model source owngpt.json records, the
report at the end, transformers' progress bars. Oracles: a clock advanced by the test, losses computed here from the
raw token file in eval mode, generators seeded by hand, the calls recorded by stand-ins, evaluations scripted by the
test, paths and descriptions written out here."""

from __future__ import annotations

import json
import random
import threading
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import quick_cfg

import owngpt.train as train_mod
from owngpt.checkpoint import read_meta
from owngpt.distributed import Dist
from owngpt.outdir import Replacement
from owngpt.tasks.lm import LMTask
from owngpt.train import train


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tokens_per_second_counts_the_training_steps_only_and_the_bar_shows_it(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch, capsys
):
    """A clock that the test advances by 0.5 s a step, 100 s an evaluation and 10 s a save: every log line's
    tokens_per_s is then exactly twice the tokens of one global batch, however long evaluating and saving took
    (train.py 411, 412, 439: the window's start, the division, the evaluation time taken out)."""
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    set_lr = train_mod.set_lr

    def a_step_takes_half_a_second(*a, **k):  # called once at the start of every step
        clock.now += 0.5
        return set_lr(*a, **k)

    evaluate, save = LMTask.evaluate, train_mod.save_checkpoint

    def an_evaluation_takes_100_s(self, *a, **k):
        clock.now += 100.0
        return evaluate(self, *a, **k)

    def a_save_takes_10_s(*a, **k):
        clock.now += 10.0
        return save(*a, **k)

    monkeypatch.setattr(train_mod, "set_lr", a_step_takes_half_a_second)
    monkeypatch.setattr(LMTask, "evaluate", an_evaluation_takes_100_s)
    monkeypatch.setattr(train_mod, "save_checkpoint", a_save_takes_10_s)
    batch, accum, block = 2, 2, 16
    cfg = quick_cfg(
        tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=5, eval_every=2, log_every=1,
        batch_size=batch, grad_accum=accum, block_size=block,
    )  # fmt: skip
    train(cfg)
    lines = [r for r in _log(tmp_path / "run") if "tokens_per_s" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    tokens_per_step = batch * accum * block  # every lm row is a full block of input tokens
    assert [r["tokens_per_s"] for r in lines] == [tokens_per_step / 0.5] * 5
    # the bar's postfix: the last logged loss and speed
    err = capsys.readouterr().err
    assert f"loss={lines[-1]['train_loss']:.4f}" in err and f"tok_s={2 * tokens_per_step}" in err


def test_the_first_logged_train_loss_is_the_mean_loss_of_the_first_global_batch(tmp_path, tiny_lm_data, tiny_ckpt):
    """Step 1's train_loss is the mean cross-entropy, over every token of the global batch (2 micro-batches of 2
    rows), of the weights it started from, computed here from the raw token file (train.py 388: the loss divided by
    its scale instead of multiplied leaves AdamW's clipped steps almost unchanged, but not the loss it reports)."""
    from test_train_oracles import raw_tokens
    from transformers import AutoModelForCausalLM

    from owngpt.data.datadir import open_data_dir
    from owngpt.tasks.base import get_task

    T, micro, accum = 16, 2, 2
    cfg = quick_cfg(
        tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1, block_size=T, batch_size=micro,
        grad_accum=accum, dropout=0.0,
    )  # fmt: skip
    train(cfg)
    data = open_data_dir(tiny_lm_data)
    rows = get_task("lm")(data, data.load_tokenizer(), cfg, T).global_rows(0, micro * accum)  # which windows only
    raw = torch.from_numpy(raw_tokens(tiny_lm_data, "train").astype(np.int64))
    x = torch.stack([raw[r : r + T] for r in rows])
    y = torch.stack([raw[r + 1 : r + T + 1] for r in rows])
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    with torch.no_grad():
        hand = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
    first = next(r for r in _log(tmp_path / "run") if "train_loss" in r)
    assert first["step"] == 1 and first["train_loss"] == pytest.approx(hand, rel=1e-5)


def test_the_validation_loss_is_measured_without_dropout(tmp_path, tiny_lm_data, tiny_ckpt):
    """With dropout 0.3 the trainer's val_loss is still the loss of the saved weights in eval mode, computed here
    from the raw token file (train.py 341: the model left in train mode while evaluating, dropout on)."""
    from test_train_oracles import raw_tokens
    from transformers import AutoModelForCausalLM

    T = 16
    cfg = quick_cfg(
        tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=2, eval_every=2, block_size=T, eval_batches=0, dropout=0.3
    )
    res = train(cfg)
    val = torch.from_numpy(raw_tokens(tiny_lm_data, "val").astype(np.int64))
    n = (len(val) - 1) // T
    model = AutoModelForCausalLM.from_pretrained(res.last_checkpoint).eval()
    assert model.config.resid_pdrop == pytest.approx(0.3)  # the checkpoint does have dropout layers
    with torch.no_grad():
        x = torch.stack([val[i * T : i * T + T] for i in range(n)])
        y = torch.stack([val[i * T + 1 : i * T + T + 1] for i in range(n)])
        hand = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
        noisy = F.cross_entropy(model.train()(x).logits.flatten(0, 1), y.flatten()).item()
    assert abs(noisy - hand) > 1e-3  # dropout on would move the loss: the check below can tell
    assert [r for r in _log(tmp_path / "run") if "val_loss" in r][-1]["val_loss"] == pytest.approx(hand, rel=1e-5)


def _draws() -> list[float]:
    return [random.random(), float(np.random.rand())]


def test_a_run_seeds_pythons_and_numpys_generators_with_its_seed(tmp_path, tiny_lm_data, tiny_ckpt):
    """Code the user runs beside the loop (a callback here) sees the generators the run's seed gives: the same
    draws as after seeding them by hand, and other draws under another seed (train.py 279, 280)."""
    seen: dict[int, list[float]] = {}
    for seed in (3, 4):
        cfg = quick_cfg(tiny_lm_data, tmp_path / f"run{seed}", tiny_ckpt, max_steps=1, eval_every=1, seed=seed)
        random.seed(12345)  # what the process held before: the run must not keep it
        np.random.seed(12345)
        train(cfg, callbacks=[lambda step, metrics, seed=seed: seen.setdefault(seed, _draws())])
    random.seed(3)
    np.random.seed(3)
    by_hand = _draws()
    # the loop itself draws nothing from them, so the callback's draws are the first after seeding
    assert seen[3] == by_hand
    assert seen[4] != seen[3]


class _Seeded(Exception):
    pass


def test_each_rank_seeds_torch_with_the_run_seed_plus_its_rank(tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch):
    """Dropout masks differ per rank, as in one big batch: rank r seeds torch with seed + r (train.py 281). The
    loop is entered as rank 1 of a job (a Dist built by hand, no process group) and stopped once it has seeded."""
    calls: list[int] = []
    manual_seed = torch.manual_seed

    def record(seed):
        calls.append(int(seed))
        return manual_seed(seed)

    def stop(*a, **k):  # the run log is opened right after the generators are seeded
        raise _Seeded

    monkeypatch.setattr(torch, "manual_seed", record)
    monkeypatch.setattr(train_mod, "RunLog", stop)
    cfg = quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, seed=7)
    with pytest.raises(_Seeded):
        train_mod._train(cfg, [], Dist(rank=1, world=1), Replacement())
    assert calls and calls[-1] == 7 + 1


def test_the_model_is_moved_to_the_runs_device(tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch):
    """The model is put on the device Dist chose before anything runs on it (train.py 230). On this CPU the move
    changes nothing, so the call itself is recorded."""
    moved: list[str] = []
    build = train_mod.build_model

    def recording_build(*a, **k):
        model = build(*a, **k)
        to = model.to

        def spy(*args, **kwargs):
            moved.append(str(args[0]) if args else str(kwargs.get("device")))
            return to(*args, **kwargs)

        model.to = spy
        return model

    monkeypatch.setattr(train_mod, "build_model", recording_build)
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1))
    assert moved[:1] == ["cpu"]


def test_a_save_left_as_a_temp_dir_by_a_kill_is_removed_when_the_run_resumes(tmp_path, tiny_lm_data, tiny_ckpt):
    """checkpoints/.last.tmp-* and .best.tmp-* are saves a kill cut short, never the real checkpoints: a resumed run
    removes them before writing (train.py 203) and leaves last and best alone."""
    run = tmp_path / "run"
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))
    # names without a process id: the saves' own clean-up (owngpt.atomic.directory) removes only the temp dirs of
    # processes that are gone, so these are the run's to remove
    for name in (".last.tmp-abc", ".best.tmp-xyz"):
        stale = run / "checkpoints" / name
        (stale / "sub").mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"half a checkpoint")
        (stale / "sub" / "more").write_bytes(b"x")
    # a file of that name is no save of owngpt's (they are directories): it cannot be removed as one, and the run
    # is not stopped by it
    (run / "checkpoints" / ".last.tmp-notes").write_text("the user's")
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=3, eval_every=1, resume=True))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".last.tmp-notes", "best", "last"]
    assert read_meta(run / "checkpoints" / "last")["step"] == 3


def _scripted_losses(monkeypatch, losses: list[float]) -> None:
    """Evaluations that report these val losses in turn (the model's own evaluation still runs)."""
    evaluate, k = LMTask.evaluate, iter(losses)

    def scripted(self, *a, **kw):
        return {**evaluate(self, *a, **kw), "val_loss": next(k)}

    monkeypatch.setattr(LMTask, "evaluate", scripted)


def test_patience_met_at_the_last_step_is_the_end_of_the_run_not_an_early_stop(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch, capsys
):
    """Three evaluations without a new best after the first, with patience 3, at the run's last step: the run ran
    its length and did not stop early, and says no early stop (train.py 443: `step < total_steps`)."""
    _scripted_losses(monkeypatch, [1.0, 2.0, 3.0, 4.0])
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=4, eval_every=1, patience=3))
    assert res.steps == 4 and not res.stopped_early
    assert "early stop" not in capsys.readouterr().err


def test_an_early_stop_says_which_metric_did_not_improve_for_how_many_evaluations(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch, capsys
):
    _scripted_losses(monkeypatch, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=6, eval_every=1, patience=2))
    assert res.steps == 3 and res.stopped_early and res.best_metric == 1.0
    assert "early stop: val_loss did not improve for 2 evaluations" in capsys.readouterr().err


def test_the_tensorboard_writer_is_closed_when_the_run_ends(tmp_path, tiny_lm_data, tiny_ckpt):
    """tensorboardX writes events from a thread of its own; a run that ends (here: normally) closes it, so the
    events are all on disk and no writer thread outlives the run (train.py 451)."""

    def writer_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.is_alive() and type(t).__module__.startswith("tensorboardX")}

    before = writer_threads()
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=2, eval_every=1))
    assert not writer_threads() - before
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_an_lm_checkpoint_gets_no_chat_template_its_data_tokenizer_did_not_have(tmp_path, tiny_lm_data, tiny_ckpt):
    """owngpt's chat template is added for the chat task only (train.py 178): a plain-text model given one would
    be taken for a chat model by `owngpt chat`, the server and transformers' apply_chat_template."""
    import shutil

    from owngpt.tokenizer import load_tokenizer

    data = tmp_path / "lm"
    shutil.copytree(tiny_lm_data, data)
    for f in (data / "tokenizer").glob("chat_template*"):
        f.unlink()
    cfg_f = data / "tokenizer" / "tokenizer_config.json"
    kept = {k: v for k, v in json.loads(cfg_f.read_text(encoding="utf-8")).items() if k != "chat_template"}
    cfg_f.write_text(json.dumps(kept), encoding="utf-8")
    assert not getattr(load_tokenizer(data / "tokenizer"), "chat_template", None)
    res = train(quick_cfg(data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1))
    assert not getattr(load_tokenizer(res.last_checkpoint), "chat_template", None)


def test_a_lora_resume_from_a_damaged_adapter_is_refused_naming_the_file(tmp_path, tiny_lm_data, tiny_ckpt):
    """checkpoints/last/adapter/adapter_model.safetensors cut short (a full disk, a bad copy): the resume stops with
    an error naming the file and the fix, before training (train.py 225), not a safetensors traceback."""
    from owngpt.errors import CheckpointError

    run = tmp_path / "run"
    kw = dict(lora=True, max_steps=2, eval_every=1, lr=1e-2)
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, **kw))
    adapter = run / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is damaged"):
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt, resume=True, **dict(kw, max_steps=3)))
    assert read_meta(run / "checkpoints" / "last")["step"] == 2  # nothing trained or saved over it


def test_fsdp_in_one_process_is_a_plain_run(tmp_path, tiny_lm_data, tiny_ckpt):
    """fsdp=true shards over the ranks of a torchrun job; alone there is nothing to shard (train.py 250: `sharded`
    only with more than one process): the same weights, bitwise, and the same optimizer state saved for a resume."""
    from safetensors.torch import load_file
    from train_helpers import weights

    kw = dict(max_steps=2, eval_every=2)
    plain = train(quick_cfg(tiny_lm_data, tmp_path / "plain", tiny_ckpt, **kw))
    fsdp = train(quick_cfg(tiny_lm_data, tmp_path / "fsdp", tiny_ckpt, fsdp=True, **kw))
    a, b = weights(plain.last_checkpoint), weights(fsdp.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = load_file(plain.last_checkpoint / "trainer" / "tensors.safetensors")
    sb = load_file(fsdp.last_checkpoint / "trainer" / "tensors.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_which_way_a_metric_improves():
    """The task's own metric goes the task's way; any other is better higher unless it is a loss (val_loss, val_ppl,
    or a name ending in "loss"). Stand-in tasks: a lower-is-better metric that is not named a loss, and the lm task's
    (train.py 120, 122)."""
    from owngpt.train import _metric_direction

    own_lower = types.SimpleNamespace(metric="edit_distance", greater_is_better=False)
    own_higher = types.SimpleNamespace(metric="accuracy", greater_is_better=True)
    lm = types.SimpleNamespace(metric="val_loss", greater_is_better=False)
    cases = [
        (own_lower, "edit_distance", False),  # the task knows its metric: no name rule
        (own_higher, "accuracy", True),
        (own_higher, "val_loss", False),
        (own_higher, "train_loss", False),
        (lm, "val_loss", False),
        (lm, "val_ppl", False),  # a loss by the list, not by its name
        (lm, "val_accuracy", True),
        (own_lower, "f1", True),
    ]
    for task, metric, higher in cases:
        assert _metric_direction(task, metric) is higher, (task.metric, metric)


def test_every_rank_meets_the_others_after_its_last_save_before_leaving_the_group(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch
):
    """Under torchrun a rank that tears the process group down while its peer still saves made gloo abort at exit:
    after the run's last save, every rank waits at a barrier, then closes (train.py 143). One process sees the calls
    (no-ops there) in order."""
    events: list[str] = []
    barrier, close, save = Dist.barrier, Dist.close, train_mod.save_checkpoint

    def spy(name, fn):
        def wrapped(*a, **k):
            events.append(name)
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(Dist, "barrier", spy("barrier", barrier))
    monkeypatch.setattr(Dist, "close", spy("close", close))
    monkeypatch.setattr(train_mod, "save_checkpoint", spy("save", save))
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1))
    assert events[-3:] == ["save", "barrier", "close"]


def test_a_checkpoint_names_its_model_source_without_the_users_folders(tmp_path):
    """owngpt.json's "source": a local model near the run by its path relative to the run, one far away by its
    folder's name only, a Hub model by its id, a preset as it describes itself; never an absolute path
    (train.py 475-480). Oracle: the paths and descriptions written out here."""
    from owngpt.models import ModelSource
    from owngpt.train import _portable_source

    run = tmp_path / "a" / "b" / "run"
    near = ModelSource("local", str(tmp_path / "a" / "b" / "model"), tmp_path / "a" / "b" / "model")
    far_dir = tmp_path / "x" / "y" / "z" / "w" / "weights"
    far = ModelSource("local", str(far_dir), far_dir)
    hub = ModelSource("hub", "gpt2", tmp_path / "cache" / "models--gpt2")
    preset = ModelSource("preset", "tiny", None, {"n_layer": 4})

    got = _portable_source(near, run)
    assert got["source"] == {"kind": "local", "name": "../model", "path": "../model"}
    assert got["source_description"] == "pretrained: local checkpoint ../model"
    got = _portable_source(far, run)
    assert got["source"] == {"kind": "local", "name": "weights", "path": None}
    assert got["source_description"] == "pretrained: local checkpoint weights"
    got = _portable_source(hub, run)
    assert got["source"] == {"kind": "hub", "name": "gpt2", "path": None}
    assert got["source_description"] == "pretrained: Hub model 'gpt2'"
    got = _portable_source(preset, run)
    assert got["source"] == {"kind": "preset", "name": "tiny", "path": None, "preset": {"n_layer": 4}}
    assert got["source_description"] == preset.describe()


@pytest.mark.parametrize("report, main, wanted", [(True, True, True), (False, True, False), (True, False, False)])
def test_the_report_is_written_at_the_end_when_asked_and_by_rank_0_only(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch, report, main, wanted
):
    """report=true (the default) writes report.html and report.md once the run is done, on rank 0 (train.py 150,
    151); report_after_run itself (tested in test_report.py) is stood in for."""
    calls: list = []
    monkeypatch.setattr(train_mod, "report_after_run", lambda run_dir: calls.append(run_dir))
    if not main:  # rank 1 of a job, as far as train() can tell (a Dist built by hand, no process group)
        monkeypatch.setattr(Dist, "setup", staticmethod(lambda device="auto": Dist(rank=1, world=1)))
        monkeypatch.setattr(train_mod, "_train", lambda cfg, cbs, dist, guard: types.SimpleNamespace(run_dir=cfg.out))
    cfg = quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1, report=report)
    train(cfg)
    assert calls == ([tmp_path / "run"] if wanted else [])


def test_transformers_progress_bars_are_off_while_saving_and_on_again_after(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch
):
    """No "Writing model shards" bar inside owngpt's own bar while a checkpoint is saved, and transformers' bars
    (e.g. "Loading weights") back on once the run is done, for the rest of the user's program (train.py 491, 496)."""
    from transformers.utils import logging as hf_logging

    during: list[bool] = []
    save = train_mod.save_checkpoint

    def spy(*a, **k):
        during.append(hf_logging.is_progress_bar_enabled())
        return save(*a, **k)

    monkeypatch.setattr(train_mod, "save_checkpoint", spy)
    hf_logging.enable_progress_bar()
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1))
    assert during and not any(during)
    assert hf_logging.is_progress_bar_enabled()
