"""The training loop's record of a run, written against the classes of mutants that survived in train (#25): what
metrics.jsonl holds and when, the callbacks, which evaluation checkpoints/best keeps, the result and the final line.
Oracles: the log read back, the rules of the config (log_every, eval_every, the last step) replayed in the test."""

from __future__ import annotations

import json

import pytest
from train_helpers import quick_cfg

from owngpt.checkpoint import read_meta
from owngpt.train import train


def test_a_run_records_every_log_and_evaluation_and_keeps_its_best(tmp_path, tiny_lm_data, tiny_ckpt, capsys):
    run = tmp_path / "run"
    seen = []
    cfg = quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=7, eval_every=2, log_every=3, lr=3e-2)
    res = train(cfg, callbacks=[lambda step, metrics: seen.append((step, dict(metrics)))])
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    logs = [r for r in recs if "train_loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    # a training line every log_every steps and at the last step; an evaluation every eval_every and at the last
    assert [r["step"] for r in logs] == [s for s in range(1, 8) if s % 3 == 0 or s == 7] == [3, 6, 7]
    assert [r["step"] for r in evals] == [s for s in range(1, 8) if s % 2 == 0 or s == 7] == [2, 4, 6, 7]
    assert all(r["lr"] == 3e-2 and r["train_loss"] > 0 and r["tokens_per_s"] > 0 for r in logs)
    # each callback gets the evaluation's step and metrics, as logged
    assert seen == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in evals]
    # best: the first evaluation with the lowest val_loss (a tie is no improvement); last: the last step
    best = min(evals, key=lambda r: r["val_loss"])
    best_meta, last_meta = read_meta(res.best_checkpoint), read_meta(res.last_checkpoint)
    assert best_meta["step"] == best["step"] and best_meta["metrics"]["val_loss"] == best["val_loss"]
    assert last_meta["step"] == 7 and last_meta["metrics"] == {k: v for k, v in evals[-1].items() if k != "step"}
    assert res.best_checkpoint == run / "checkpoints" / "best" and res.last_checkpoint == run / "checkpoints" / "last"
    # only last carries the trainer state (optimizer, RNG) a resume needs; best is weights and metadata
    assert (run / "checkpoints" / "last" / "trainer").is_dir() and not (
        run / "checkpoints" / "best" / "trainer"
    ).exists()
    assert (res.steps, res.best_metric, res.stopped_early) == (7, best["val_loss"], False)
    assert res.metrics == last_meta["metrics"]
    err = capsys.readouterr().err
    assert f"done: 7 steps; best val_loss {best['val_loss']:.4f} at step {best['step']}; checkpoints in " in err
    assert str(run / "checkpoints") in err
    # each evaluation's line marks the ones that improved
    improved, low = [], float("inf")
    for r in evals:
        improved.append(r["val_loss"] < low)
        low = min(low, r["val_loss"])
    for r, better in zip(evals, improved):
        line = next(x for x in err.splitlines() if x.startswith(f"step {r['step']}: "))
        assert line.endswith(" (best)") is better, line


def test_resume_restores_the_cuda_generator_when_the_state_has_one(monkeypatch):
    # A run saved on a GPU machine records the CUDA generator's state; a resume restores it when CUDA is there, and a
    # state saved without one restores the rest (this machine has no GPU: torch.cuda's two calls are stood in for)
    import torch

    from owngpt.trainer_state import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7, 8, 9], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s.tolist()))
    state = rng_state()
    assert state["cuda"].tolist() == [7, 8, 9]
    set_rng_state(state)
    assert restored == [[7, 8, 9]]
    del state["cuda"]  # saved on a machine without CUDA
    set_rng_state(state)
    assert restored == [[7, 8, 9]]


def test_ddp_is_given_this_ranks_gpu_and_no_device_on_the_cpu():
    # DDP's contract (torch docs): a single-device CUDA module gets device_ids=[its GPU], so each rank's replica and
    # its gradient buckets stay on that rank's device; a CPU module must get None (DDP raises on device ids there).
    # A GPU is not needed to build the devices; this machine has none, so the CUDA half is checked here only
    import torch

    from owngpt.distributed import ddp_device_ids

    assert ddp_device_ids(torch.device("cuda", 1)) == [1]
    assert ddp_device_ids(torch.device("cuda", 0)) == [0]
    assert ddp_device_ids(torch.device("cpu")) is None


def test_improvement_is_strict_and_follows_the_metric_direction():
    import math

    from owngpt.train import _improves

    for new, best, higher, want in [
        (1.0, None, False, True),  # the first evaluation is always the best so far
        (0.9, 1.0, False, True),
        (1.0, 1.0, False, False),  # a tie keeps the earlier best
        (1.1, 1.0, False, False),
        (1.1, 1.0, True, True),
        (1.0, 1.0, True, False),
        (0.9, 1.0, True, False),
        (math.nan, 1.0, False, False),
        (math.nan, None, True, False),
        (None, 1.0, False, False),
    ]:
        assert _improves(new, best, higher) is want, (new, best, higher)


class _Stop(Exception):
    pass


def test_the_run_replaced_by_overwrite_is_deleted_once_the_new_one_has_a_checkpoint(tmp_path, tiny_lm_data, tiny_ckpt):
    # --overwrite sets the old run aside and deletes it once the new run has saved a checkpoint, not at the end: a
    # run killed after its first evaluation leaves no stale copy of the old one behind
    run = tmp_path / "run"
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=2, eval_every=2))
    aside_at_first_eval = []

    def look(step, metrics):
        aside_at_first_eval.append(sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run")))
        raise _Stop

    try:
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=4, eval_every=2, overwrite=True), callbacks=[look])
    except _Stop:
        pass
    assert aside_at_first_eval == [[]]
    assert read_meta(run / "checkpoints" / "last")["step"] == 2


def test_resume_restores_best_from_last_when_best_holds_an_older_step(tmp_path, tiny_lm_data, tiny_ckpt, capsys):
    # An older owngpt saved last before best: a cut between them left best at an earlier step than the run's record
    # says. When last is itself the best step, resume copies it into best (without the trainer state).
    import shutil

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    early = tmp_path / "best-at-2"

    def stop_at_4(step, metrics):
        if step == 2:
            shutil.copytree(ckpts / "best", early)
        if step == 4:
            raise _Stop

    try:
        train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=8, eval_every=2), callbacks=[stop_at_4])
    except _Stop:
        pass
    assert read_meta(ckpts / "best")["step"] == read_meta(ckpts / "last")["step"] == 4  # step 4 improved
    assert read_meta(early)["step"] == 2
    shutil.rmtree(ckpts / "best")
    shutil.copytree(early, ckpts / "best")
    capsys.readouterr()
    train(quick_cfg(tiny_lm_data, run, tiny_ckpt, max_steps=4, eval_every=2, resume=True))
    assert (
        "checkpoints/best held step 2, not the best step 4: restored from checkpoints/last" in capsys.readouterr().err
    )
    best = read_meta(ckpts / "best")
    assert best["step"] == 4 and best["metrics"] == read_meta(ckpts / "last")["metrics"]
    assert not (ckpts / "best" / "trainer").exists()


@pytest.mark.parametrize("task", ["lm", "chat"])
def test_a_checkpoint_generates_until_the_end_tokens_of_its_task(tmp_path, tiny_lm_data, tiny_ckpt, task):
    # generation_config.json names every token that ends a reply (chat: end of turn, then end of text; lm: end of
    # text alone, as one id), pads with the tokenizer's pad token and stops at the trained context
    from train_helpers import write_chat_data_dir
    from transformers import GenerationConfig

    from owngpt.chat_format import stop_token_ids
    from owngpt.tokenizer import load_tokenizer

    data = write_chat_data_dir(tmp_path / "chat", 8, 2) if task == "chat" else tiny_lm_data
    res = train(quick_cfg(data, tmp_path / "run", tiny_ckpt, task=task, max_steps=1, eval_every=1))
    tok = load_tokenizer(res.last_checkpoint)
    gen = GenerationConfig.from_pretrained(res.last_checkpoint)
    want = stop_token_ids(tok) if task == "chat" else [tok.eos_token_id]
    assert len(want) == (2 if task == "chat" else 1)
    assert gen.eos_token_id == (want if len(want) > 1 else want[0])
    assert gen.pad_token_id == tok.pad_token_id and gen.max_length == read_meta(res.last_checkpoint)["trained_context"]


def test_a_task_that_does_not_match_the_data_names_the_flag_that_fixes_it(tmp_path, tiny_lm_data, tiny_ckpt):
    from owngpt.errors import DataError

    with pytest.raises(DataError) as e:
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, task="classify"))
    msg = str(e.value)
    assert msg.startswith("--task classify needs classify data, but ") and "holds 'lm' data" in msg
    assert msg.endswith("prepare it with `owngpt prepare ... --task classify` or train with --task lm")
    assert not (tmp_path / "run").exists()


def test_a_chat_checkpoint_carries_the_chat_template_even_when_the_data_tokenizer_had_none(tmp_path, tiny_ckpt):
    # a chat data dir whose tokenizer was saved without a template: the checkpoint's tokenizer gets owngpt's, so
    # transformers' apply_chat_template renders what the model was trained on
    from train_helpers import write_chat_data_dir

    from owngpt.chat_format import CHAT_TEMPLATE
    from owngpt.tokenizer import load_tokenizer

    data = write_chat_data_dir(tmp_path / "chat", 8, 2)
    for f in (data / "tokenizer").glob("chat_template*"):
        f.unlink()
    cfg_f = data / "tokenizer" / "tokenizer_config.json"
    cfg_f.write_text(
        json.dumps({k: v for k, v in json.loads(cfg_f.read_text(encoding="utf-8")).items() if k != "chat_template"}),
        encoding="utf-8",
    )
    assert not getattr(load_tokenizer(data / "tokenizer"), "chat_template", None)
    res = train(quick_cfg(data, tmp_path / "run", tiny_ckpt, task="chat", max_steps=1, eval_every=1))
    assert load_tokenizer(res.last_checkpoint).chat_template == CHAT_TEMPLATE


def test_a_merged_lora_checkpoint_is_weights_only(tmp_path, tiny_lm_data, tiny_ckpt):
    # --merge-lora writes checkpoints/merged: the base with the adapter folded in, for transformers alone; the trainer
    # state and the adapter stay in checkpoints/last
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, lora=True, merge_lora=True, max_steps=2,
                          eval_every=2))  # fmt: skip
    merged = tmp_path / "run" / "checkpoints" / "merged"
    assert (merged / "config.json").exists() and read_meta(merged)["step"] == 2
    assert not (merged / "trainer").exists() and not (merged / "adapter").exists()
    assert (res.last_checkpoint / "trainer").is_dir() and (res.last_checkpoint / "adapter").is_dir()
