"""The training loop on tiny models: it learns, its checkpoints are plain transformers dirs, masks, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import quick_cfg, weights, write_chat_data_dir

import fixtures
from owngpt.errors import CheckpointError, ConfigError, DataError
from owngpt.train import train


def test_overfits_and_writes_the_run_dir(tiny_ckpt, tmp_path):
    data = fixtures.write_lm_data_dir(tmp_path / "data", text="To be, or not to be.\n\n" * 60)
    res = train(quick_cfg(data, tmp_path / "run", tiny_ckpt, max_steps=40, eval_every=20))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in log if "train_loss" in r]
    assert losses[-1] < 0.4 * losses[0], losses  # a short repeated line is learnt by heart
    assert [r["step"] for r in log if "val_loss" in r] == [20, 40]
    run = tmp_path / "run"
    for f in (
        "config.yaml",
        "loss.png",
        "checkpoints/last/model.safetensors",
        "checkpoints/best/config.json",
        "checkpoints/last/trainer/state.json",
    ):
        assert (run / f).exists(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # tensorboardX's event files, read back by TensorBoard itself: the same values as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [
        (r["step"], pytest.approx(r["val_loss"])) for r in log if "val_loss" in r
    ]
    # paths relative to the run, never absolute: a shared checkpoint must not reveal the user's folders
    for f in ("checkpoints/last/owngpt.json", "checkpoints/last/trainer/state.json"):
        assert str(tmp_path) not in (run / f).read_text(), f
    assert json.loads((run / "checkpoints/last/owngpt.json").read_text())["data"]["path"] == "../data"
    assert res.steps == 40 and res.best_checkpoint == run / "checkpoints" / "best"
    assert res.best_metric == pytest.approx(min(r["val_loss"] for r in log if "val_loss" in r))
    meta = json.loads((run / "checkpoints/last/owngpt.json").read_text())
    assert meta["task"] == "lm" and meta["step"] == 40 and meta["source"]["kind"] == "local"
    # the resolved config is a valid --config
    from owngpt.config import TrainConfig, load_config

    again = load_config(TrainConfig, str(run / "config.yaml"))
    assert again.block_size == 32 and again.max_steps == 40


def test_checkpoint_loads_in_plain_transformers_with_the_same_logits(tiny_lm_data, tiny_ckpt, tmp_path):
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=3))
    ids = torch.arange(10, 30).unsqueeze(0)
    from owngpt.checkpoint import load_model

    ours = load_model(res.last_checkpoint).eval()(ids).logits
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "torch.save(m(torch.arange(10, 30).unsqueeze(0)).logits, sys.argv[2])\n"
        "assert 'owngpt' not in sys.modules\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(res.last_checkpoint), str(tmp_path / "l.pt")],
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
        cwd=tmp_path,
    )
    theirs = torch.load(tmp_path / "l.pt", weights_only=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    gen = json.loads((res.last_checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == fixtures.char_tokenizer().eos_token_id


def test_from_scratch_preset_and_epochs(tiny_lm_data, tmp_path):
    cfg = quick_cfg(
        tiny_lm_data, tmp_path / "run", "tiny", max_steps=None, epochs=0.01, eval_every=100, block_size=16, batch_size=2
    )
    res = train(cfg)
    n_tokens = len(np.fromfile(tiny_lm_data / "train.bin", dtype=np.uint16))
    assert res.steps == int(np.ceil(0.01 * (n_tokens // 16) / 2))
    meta = json.loads((res.last_checkpoint / "owngpt.json").read_text())
    assert meta["source"] == {
        "kind": "preset",
        "name": "tiny",
        "path": None,
        "preset": {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256},
    }
    # presets use the exact GELU (a fused kernel, ~5x faster than gelu_new's formula on a CPU), recorded for transformers
    assert json.loads((res.last_checkpoint / "config.json").read_text())["activation_function"] == "gelu"


def test_training_and_evaluation_forwards_build_no_kv_cache(tiny_lm_data, tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    seen = []
    forward = GPT2LMHeadModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("use_cache"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "forward", spy)
    train(quick_cfg(tiny_lm_data, tmp_path / "run", "tiny", max_steps=2, eval_every=1, block_size=16, batch_size=2))
    assert len(seen) >= 4 and all(v is False for v in seen), seen


def test_loop_equals_a_textbook_adamw_loop(tiny_lm_data, tiny_ckpt, tmp_path):
    """Oracle for the loop's arithmetic: the same batches through torch's reference AdamW (single-tensor, not the
    fused kernel owngpt uses), nanoGPT's decay groups and schedule, accumulation and clipping, all written out here.

    A wrong decay group, schedule, loss normalisation or clip, or a fused kernel that drifts, moves the weights.
    """
    import math

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from owngpt.data.datadir import open_data_dir
    from owngpt.tasks.base import get_task

    steps, lr, warmup, micro, accum = 6, 1e-2, 2, 2, 2
    cfg = quick_cfg(
        tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=steps, eval_every=steps, batch_size=micro,
        grad_accum=accum, lr=lr, warmup_steps=warmup, schedule="cosine", weight_decay=0.5, grad_clip=0.05, dropout=0.0,
    )  # fmt: skip
    res = train(cfg)
    got = weights(res.last_checkpoint)

    data = open_data_dir(tiny_lm_data)
    task = get_task("lm")(data, data.load_tokenizer(), cfg, cfg.block_size)  # only for the same batches
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    model.eval()  # no dropout (owngpt's run had dropout=0); gradients flow the same
    named = [(n, p) for n, p in model.named_parameters()]
    assert any(p.dim() < 2 for _, p in named) and any("wpe" in n for n, _ in named)
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.5},  # matmuls and embeddings
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},  # biases and norms
        ],
        lr=lr,
        betas=(0.9, 0.99),
        foreach=False,
        fused=False,
    )
    for step in range(steps):
        if step < warmup:
            step_lr = lr * (step + 1) / (warmup + 1)
        else:
            ratio = (step - warmup) / (steps - warmup)
            step_lr = lr / 10 + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - lr / 10)
        for g in opt.param_groups:
            g["lr"] = step_lr
        rows = task.global_rows(step, micro * accum)
        for i in range(accum):
            b = task.collate(rows[i * micro : (i + 1) * micro])
            logits = model(input_ids=b["input_ids"]).logits
            # the mean over every token of the global batch, however it is split into micro-batches
            loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum")
            (loss / (micro * accum * cfg.block_size)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    want = model.state_dict()
    start = weights(tiny_ckpt)
    moved = 0
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5, msg=k)
        moved += not torch.equal(v, start[k])
    assert moved == len(got)  # every tensor trained (the test compares moving weights, not initial ones)


def test_frozen_parameters_do_not_change(tiny_lm_data, tiny_ckpt, tmp_path):
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, freeze_embeddings=True, freeze_layers=1))
    before, after = weights(tiny_ckpt), weights(res.last_checkpoint)
    frozen = [k for k in before if "wte" in k or "wpe" in k or ".h.0." in k]
    trained = [k for k in before if ".h.1." in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def test_chat_labels_cover_exactly_the_assistant_tokens(tmp_path):
    from owngpt.chat_format import render
    from owngpt.config import TrainConfig
    from owngpt.data.datadir import open_data_dir
    from owngpt.tasks.chat import ChatTask

    data = open_data_dir(write_chat_data_dir(tmp_path / "chat"))
    tok = data.load_tokenizer()
    task = ChatTask(data, tok, TrainConfig(task="chat"), block_size=64)
    batch = task.collate([0, 1], "train")
    for b, conv in enumerate(train_helpers_convs()[:2]):
        ids, mask = render(tok, conv, max_tokens=65)
        n = len(ids) - 1
        assert batch["input_ids"][b, :n].tolist() == ids[:-1]
        expected = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        assert batch["labels"][b, :n].tolist() == expected
        assert (batch["labels"][b, n:] == -100).all()  # padding
        assistant_text = tok.decode([t for t in expected if t != -100])
        # conversation 0 is longer than the block: its latest exchange is kept
        assert assistant_text == ["Resolved. resolved.<|im_end|>\n", "yonder window<|im_end|>\n"][b]
    # train_on_prompt: every real token is a label
    all_tokens = ChatTask(data, tok, TrainConfig(task="chat", train_on_prompt=True), 64).collate([0], "train")
    assert (all_tokens["labels"][0][all_tokens["attention_mask"][0] == 1] != -100).all()


def train_helpers_convs():
    from train_helpers import CONVERSATIONS

    return CONVERSATIONS


def test_chat_and_mmi_train_with_the_chat_template(tmp_path, tiny_ckpt):
    data = write_chat_data_dir(tmp_path / "chat")
    res = train(quick_cfg(data, tmp_path / "chat_run", tiny_ckpt, task="chat", max_steps=2, eval_every=2))
    gen = json.loads((res.last_checkpoint / "generation_config.json").read_text())
    tok = fixtures.char_tokenizer()
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(res.last_checkpoint)
    assert "<|im_start|>assistant\nhi<|im_end|>" in t.apply_chat_template(
        [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hi"}], tokenize=False
    )
    mmi = train(quick_cfg(data, tmp_path / "mmi_run", tiny_ckpt, task="mmi", max_steps=2, eval_every=2))
    assert json.loads((mmi.last_checkpoint / "owngpt.json").read_text())["task"] == "mmi"
    assert np.isfinite(mmi.metrics["val_loss"])


def test_mmi_examples_are_reversed_dialogues(tmp_path):
    from owngpt.chat_format import EOS
    from owngpt.config import TrainConfig
    from owngpt.data.datadir import open_data_dir
    from owngpt.tasks.mmi import MMITask

    data = open_data_dir(write_chat_data_dir(tmp_path / "chat", n_train=1, n_val=1))
    tok = data.load_tokenizer()
    task = MMITask(data, tok, TrainConfig(task="mmi"), block_size=128)
    assert task.num_examples("train") == 2  # two assistant replies in the first conversation
    ids, mask = task.example("train", 1)
    text = tok.decode(ids.tolist())
    assert text == f"Resolved. resolved.{EOS}are you resolved?{EOS}Speak, speak.{EOS}hear me speak{EOS}"
    assert tok.decode(ids[mask == 1].tolist()).startswith("are you resolved?")


def test_early_stopping_and_callbacks(tiny_lm_data, tiny_ckpt, tmp_path):
    seen = []
    # lr so small nothing improves after the first evaluation... use a huge one so it gets worse
    res = train(
        quick_cfg(
            tiny_lm_data, tmp_path / "run", tiny_ckpt, lr=5.0, grad_clip=0.0, max_steps=30, eval_every=1, patience=2
        ),
        callbacks=[lambda s, m: seen.append(s)],
    )
    assert res.stopped_early and res.steps < 30 and seen == list(range(1, res.steps + 1))

    class Stop(Exception):
        pass

    def stop(step, metrics):
        raise Stop

    with pytest.raises(Stop):
        train(quick_cfg(tiny_lm_data, tmp_path / "run2", tiny_ckpt), callbacks=[stop])
    assert (tmp_path / "run2/checkpoints/last/config.json").exists()


# --- bad input ---------------------------------------------------------------------------------------------------
def test_refuses_a_data_dir_from_another_tokenizer(tmp_path, tiny_ckpt):
    other = fixtures.char_tokenizer("abcdefgh xyz")
    data = fixtures.write_lm_data_dir(tmp_path / "data", tokenizer=other)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        train(quick_cfg(data, tmp_path / "run", tiny_ckpt))
    assert not (tmp_path / "run").exists()


def test_refuses_block_size_beyond_context(tiny_lm_data, tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match=r"--block-size 512 .* 128"):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, block_size=512))


def test_refuses_wrong_task_missing_model_and_bad_out(tiny_lm_data, tiny_ckpt, tmp_path):
    with pytest.raises(DataError, match="--task chat needs chat data"):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, task="chat"))
    with pytest.raises(CheckpointError, match="no such"):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tmp_path / "nope"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="cannot write"):
        train(quick_cfg(tiny_lm_data, tmp_path / "afile" / "run", tiny_ckpt))


def test_existing_run_needs_resume_or_overwrite(tiny_lm_data, tiny_ckpt, tmp_path):
    train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1))
    before = (tmp_path / "run/checkpoints/last/model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="--resume .* --overwrite"):
        train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=1))
    assert (tmp_path / "run/checkpoints/last/model.safetensors").read_bytes() == before  # nothing lost
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=2, overwrite=True))
    assert res.steps == 2


def test_cli_end_to_end(tiny_lm_data, tiny_ckpt, tmp_path, capsys):
    from owngpt.cli import main

    code = main(
        [
            "train",
            "--data",
            str(tiny_lm_data),
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(tiny_ckpt),
            "--max-steps",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "2",
            "--block-size",
            "16",
            "warmup_steps=0",
            "eval_batches=1",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "pretrained: local checkpoint" in err
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_lm_data),
                "--out",
                str(tmp_path / "run"),
                "--model",
                str(tiny_ckpt),
                "bogus_key=1",
            ]
        )
        == 2
    )
    assert "unknown setting 'bogus_key'" in capsys.readouterr().err
