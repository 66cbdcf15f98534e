"""What a training run checks, says and writes, written against the mutants of train's loop that survived its fifth
fresh sample (#25): an --out that is or holds the run's inputs, an interrupted --overwrite put back, a NaN first
evaluation and the patience counter, the merged checkpoint only when asked for; and (seed 10, 12-01 evening) the
barriers around the run dir's repair, --compile in one process, epochs without max_steps, a tokenizer without a pad
token. Oracles: the file tree before and after (hashes of every file), the note the user is given, the evaluations
replayed from metrics.jsonl, the calls recorded by stand-ins, the examples written in the test."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import quick_cfg, weights

from owngpt.errors import ConfigError
from owngpt.train import train


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("where", ["the data", "the model", "holds the data", "holds the model", "inside the data"])
def test_an_out_that_is_or_holds_or_lies_in_an_input_is_refused_and_nothing_is_written(
    tmp_path, tiny_lm_data, tiny_ckpt, where
):
    # copies: a run that got past the check would write into (or replace) them
    data = shutil.copytree(tiny_lm_data, tmp_path / "holder" / "data")
    model = shutil.copytree(tiny_ckpt, tmp_path / "holder2" / "model")
    out = {
        "the data": data,
        "the model": model,
        "holds the data": data.parent,
        "holds the model": model.parent,
        "inside the data": data / "run",
    }[where]
    before = _tree(tmp_path)
    flag = "--model" if "model" in where else "--data"
    with pytest.raises(ConfigError, match="nothing was written") as e:
        train(quick_cfg(data, out, model, overwrite=True))
    assert "nothing was written" in str(e.value) and flag in str(e.value)
    assert _tree(tmp_path) == before


def test_an_interrupted_overwrite_put_back_is_announced(tmp_path, tiny_lm_data, tiny_ckpt, capsys):
    # what a kill during an --overwrite's first steps leaves: the old run aside (`.run.replaced-PID` of a dead
    # process), the new one without a checkpoint. The next start puts the old run back and says so
    run = tmp_path / "run"
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))
    run.rename(tmp_path / ".run.replaced-999999")
    run.mkdir()
    shutil.copy(tmp_path / ".run.replaced-999999/config.yaml", run / "config.yaml")
    capsys.readouterr()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))
    err = capsys.readouterr().err
    assert f"{run}: an earlier --overwrite was interrupted before its first checkpoint; the old run is back" in err
    assert (run / "checkpoints" / "last").is_dir()


def test_a_nan_first_evaluation_counts_as_one_evaluation_without_improvement(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch
):
    # the patience counter starts at 0: a first evaluation that is NaN (not an improvement) makes it 1, so with
    # patience 2 the run goes on, and the next (finite) evaluation is the first best. Replayed on metrics.jsonl
    import json
    import math

    from owngpt.tasks.lm import LMTask

    original, calls = LMTask.evaluate, []

    def first_is_nan(self, *args, **kwargs):
        metrics = original(self, *args, **kwargs)
        calls.append(1)
        return {k: math.nan for k in metrics} if len(calls) == 1 else metrics

    monkeypatch.setattr(LMTask, "evaluate", first_is_nan)
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, lr=1e-3, max_steps=3, eval_every=1, patience=2))
    evals = [r for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3] and math.isnan(evals[0]["val_loss"])
    assert not res.stopped_early and res.steps == 3
    assert res.best_metric == min(r["val_loss"] for r in evals[1:])  # NaN is never the best


def test_a_lora_run_writes_a_merged_checkpoint_only_when_asked(tmp_path, tiny_lm_data, tiny_ckpt):
    # checkpoints/merged is written for LoRA runs with merge_lora (the layout in owngpt.train's docstring), never
    # for a LoRA run without it (the adapter checkpoints are what it asked for)
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, lora=True, max_steps=2, eval_every=2))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best", "last"]


def test_a_resume_with_an_intact_best_says_nothing_about_it_and_leaves_it(tmp_path, tiny_lm_data, tiny_ckpt, capsys):
    # checkpoints/best holds the best step the trainer state names: the resume keeps it as it is (no copy from
    # last, no warning); only a best that is behind or missing is repaired or reported (owngpt.run_dir.reconcile_best)
    run = tmp_path / "run"
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, lr=1e-3, max_steps=2, eval_every=1))
    best = run / "checkpoints" / "best"
    before = _tree(best)
    capsys.readouterr()
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, lr=1e-3, max_steps=2, eval_every=1, resume=True))
    err = capsys.readouterr().err
    assert "checkpoints/best" not in err
    assert _tree(best) == before


def test_a_run_says_what_it_trains_before_its_first_step(tmp_path, tiny_lm_data, tiny_ckpt, capsys):
    # the lines a user reads first: the parameter count (oracle: the saved model's own count), how many are
    # trained, the block size and the task, then the optimizer and its learning rate
    from owngpt.checkpoint import load_model

    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, lr=1e-3, max_steps=1, eval_every=1))
    err = capsys.readouterr().err
    n = sum(p.numel() for p in load_model(res.last_checkpoint).parameters())
    assert f"parameters: {n:,} ({n:,} trained); block size 32; task lm" in err
    assert "optimizer: AdamW (lr 0.001" in err


# --- written against the survivors of the loop's eighth fresh sample (#25, seed 8) ----------------------------------


def test_a_run_with_nothing_to_train_is_refused_before_its_first_step(tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch):
    """Every parameter frozen (here by the task's model surgery, as a classifier's frozen body would): refused with
    the reason, not an optimizer's 'empty parameter list' or a Muon refusal that names the wrong cause."""
    from owngpt.tasks.lm import LMTask

    def freeze_all(self, model):
        for p in model.parameters():
            p.requires_grad_(False)

    monkeypatch.setattr(LMTask, "prepare_model", freeze_all, raising=False)
    with pytest.raises(ConfigError, match="nothing to train: every parameter is frozen"):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=2))
    assert not (tmp_path / "run" / "checkpoints" / "last").exists()


@pytest.mark.parametrize("with_val", [True, False])
def test_a_data_dir_without_validation_split_is_evaluated_on_train_with_a_warning(
    tmp_path, tiny_ckpt, capsys, with_val
):
    import json

    import fixtures

    data = fixtures.write_lm_data_dir(tmp_path / "data")
    if not with_val:  # the val split emptied, as `owngpt prepare --val-fraction 0` leaves it
        meta = json.loads((data / "meta.json").read_text())
        meta["splits"]["val"]["documents"] = 0
        (data / "meta.json").write_text(json.dumps(meta))
    res = train(quick_cfg(data, tmp_path / "run", tiny_ckpt, max_steps=2, eval_every=2))
    err = capsys.readouterr().err
    assert ("warning: no validation split; evaluating on the train split" in err) == (not with_val)
    assert res.best_checkpoint is not None  # evaluated (on whichever split) and kept its best


def test_the_run_sets_up_matmul_precision_for_its_device(tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch):
    """TF32 on cuda is decided by owngpt.device.configure_matmul (tests/test_device.py); the loop must call it with
    the device it trains on, or fp32 runs on a GPU lose their TF32 speed-up."""
    import owngpt.train as train_mod

    calls = []
    monkeypatch.setattr(train_mod, "configure_matmul", lambda device: calls.append(str(device)))
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1))
    assert calls == ["cpu"]


# --- written against the survivors of the loop's ninth fresh sample (#25, seed 9) -----------------------------------


@pytest.mark.parametrize("freeze", [dict(freeze_embeddings=True), dict(freeze_layers=1)])
def test_a_run_with_frozen_parameters_says_how_many_tensors_it_froze(tmp_path, tiny_lm_data, tiny_ckpt, capsys, freeze):
    """The line that tells the user a freeze took effect; oracle: the tensors of the modules frozen, counted on the
    checkpoint (GPT-2's token and position tables; the head is tied to the token table; or the first block)."""
    from owngpt.checkpoint import load_model

    model = load_model(tiny_ckpt)
    if "freeze_embeddings" in freeze:
        want = len([*model.transformer.wte.parameters(), *model.transformer.wpe.parameters()])
    else:
        want = len(list(model.transformer.h[0].parameters()))
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1, **freeze))
    assert f"frozen: {want} parameter tensors" in capsys.readouterr().err


def test_grad_clip_0_turns_clipping_off(tmp_path, tiny_lm_data, tiny_ckpt):
    """grad_clip=0 is documented as "no clipping": the same weights as a bound no gradient reaches (clipping then
    scales by exactly 1.0). Clipping to a norm of 0 would zero every gradient and leave only the weight decay."""
    kw = dict(lr=1e-3, max_steps=2, eval_every=2)
    off = train(quick_cfg(tiny_lm_data, tmp_path / "off", tiny_ckpt, grad_clip=0.0, **kw))
    huge = train(quick_cfg(tiny_lm_data, tmp_path / "huge", tiny_ckpt, grad_clip=1e9, **kw))
    a, b, start = weights(off.last_checkpoint), weights(huge.last_checkpoint), weights(tiny_ckpt)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)


def test_resuming_a_finished_run_trains_nothing_and_reports_its_last_evaluation(tmp_path, tiny_lm_data, tiny_ckpt):
    """`--resume` on a run that had reached its last step: no step, no new record, and the result carries the
    metrics of its last evaluation (oracle: what the finished run returned), not an empty dict."""
    run = tmp_path / "run"
    kw = dict(lr=1e-3, max_steps=2, eval_every=1)
    first = train(quick_cfg(tiny_lm_data, run, tiny_ckpt, **kw))
    records = (run / "metrics.jsonl").read_text()
    again = train(quick_cfg(tiny_lm_data, run, tiny_ckpt, resume=True, **kw))
    assert first.metrics and again.metrics == first.metrics
    assert (again.steps, again.best_metric, again.stopped_early) == (2, first.best_metric, False)
    assert (run / "metrics.jsonl").read_text() == records


def test_the_progress_bar_counts_one_per_optimizer_step(tmp_path, tiny_lm_data, tiny_ckpt, capsys):
    """The bar on stderr ends at total/total; a resumed run's bar starts at the step it resumes from."""
    kw = dict(lr=1e-3, max_steps=3, eval_every=1)
    with pytest.raises(_Stop):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, **kw), callbacks=[_stop_at(1)])
    err = capsys.readouterr().err
    assert "| 1/3 [" in err and "| 2/3 [" not in err
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, resume=True, **kw))
    err = capsys.readouterr().err
    assert "| 1/3 [" in err and "| 3/3 [" in err and "| 4/3 [" not in err and "| 5/3 [" not in err


class _Stop(Exception):
    pass


def _stop_at(k):
    def cb(step, metrics):
        if step == k:
            raise _Stop

    return cb


def test_a_tokenizer_without_a_pad_token_pads_generation_with_its_end_token(tmp_path, tiny_ckpt):
    """A data tokenizer with no pad token (GPT-2's own has none): generation_config.json pads with the end-of-text
    id, the one id the lm task ends on (oracle: the tokenizer saved in the checkpoint)."""
    from transformers import GenerationConfig

    import fixtures
    from owngpt.tokenizer import load_tokenizer

    tok = fixtures.char_tokenizer()
    tok.pad_token = None
    data = fixtures.write_lm_data_dir(tmp_path / "data", tokenizer=tok)
    res = train(quick_cfg(data, tmp_path / "run", tiny_ckpt, max_steps=1, eval_every=1))
    saved = load_tokenizer(res.last_checkpoint)
    assert saved.pad_token_id is None and saved.eos_token_id is not None
    gen = GenerationConfig.from_pretrained(res.last_checkpoint)
    assert gen.pad_token_id == gen.eos_token_id == saved.eos_token_id


def test_every_rank_waits_for_rank_0s_recovery_before_looking_at_the_run_dir(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch
):
    """Under torchrun, rank 0 puts back what a killed save left before any rank decides whether the run dir holds a
    run to resume, and every rank has decided before rank 0 writes into it: a barrier between each (the order is
    what two processes rely on; one process sees the calls, which are no-ops there)."""
    from owngpt import train as train_mod
    from owngpt.distributed import Dist

    events = []

    def spy(name, fn=None):
        def wrapped(*a, **k):
            events.append(name)
            if name == "check_writable":
                raise _Enough
            return fn(*a, **k) if fn else None

        return wrapped

    monkeypatch.setattr(train_mod, "recover_interrupted_save", spy("recover", train_mod.recover_interrupted_save))
    monkeypatch.setattr(train_mod, "prepare_run_dir", spy("prepare", train_mod.prepare_run_dir))
    monkeypatch.setattr(train_mod, "check_writable", spy("check_writable"))
    monkeypatch.setattr(Dist, "barrier", spy("barrier"))
    with pytest.raises(_Enough):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt))
    assert events == ["recover", "barrier", "prepare", "barrier", "check_writable"]


class _Enough(Exception):
    pass


def test_one_process_with_compile_compiles_the_step_once_and_not_the_model(
    tmp_path, tiny_lm_data, tiny_ckpt, monkeypatch
):
    """Alone, --compile compiles forward + loss as one function (owngpt.train_step.forward_and_loss); the model
    itself is compiled only when DDP or FSDP wraps it (two or more processes). torch.compile is stood in for by a
    recorder that returns what it is given: no compile time, the same run."""
    compiled = []

    def record(fn, **kw):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, compile=True, max_steps=1, eval_every=1))
    assert res.steps == 1
    assert len(compiled) == 1 and not isinstance(compiled[0], torch.nn.Module) and callable(compiled[0])


@pytest.mark.parametrize(("epochs", "steps"), [(None, 2), (1.5, 3)])
def test_without_max_steps_a_run_makes_its_epochs_of_passes_over_the_train_split(tmp_path, tiny_ckpt, epochs, steps):
    """No --max-steps: `epochs` passes over the train split (one when not given), in global batches rounded up
    (oracle: 8 conversations written, 4 per step)."""
    from train_helpers import write_chat_data_dir

    data = write_chat_data_dir(tmp_path / "chat", n_train=8, n_val=2)
    cfg = quick_cfg(data, tmp_path / "run", tiny_ckpt, task="chat", max_steps=None, epochs=epochs, eval_every=100)
    assert cfg.batch_size * cfg.grad_accum == 4
    assert train(cfg).steps == steps
