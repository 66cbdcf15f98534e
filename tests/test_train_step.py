"""The step keeps an accelerator busy: no tensor read between log steps, batches built ahead from the pure
`global_rows`, forward + loss compiled whole with no graph break and no recompile (owngpt.train_step)."""

from __future__ import annotations

import functools
import os
import sys
import threading

import pytest
import torch
from train_helpers import quick_cfg, weights, write_chat_data_dir

import owngpt.train as train_mod
from owngpt.train import train
from owngpt.train_step import Prefetcher, build_step, forward_and_loss

# every way Python code reads a tensor's value on the host: on cuda each one waits for the GPU's queue to drain
READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


def _in_transformers() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if f"{os.sep}transformers{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def reads_per_step(monkeypatch, cfg):
    """Train `cfg`, recording each tensor read on the loop's thread as (optimizer step, how, inside transformers)."""
    current = {"step": None}
    seen: list[tuple[int | None, str, bool]] = []
    main = threading.main_thread()
    lr_at = train_mod.lr_at

    def spy_lr_at(step, *args):
        current["step"] = step  # the loop calls lr_at first thing in every step
        return lr_at(step, *args)

    monkeypatch.setattr(train_mod, "lr_at", spy_lr_at)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            if threading.current_thread() is main:  # the prefetch thread reads host tensors only: not a sync
                seen.append((current["step"], _name, _in_transformers()))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    res = train(cfg)
    monkeypatch.undo()
    return res, seen


def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend: dynamo and autograd tracing as under inductor, without the C++
    compile that takes minutes on this CPU."""
    import torch._dynamo

    real_compile = torch.compile
    compiled = []

    def compile_(fn, **k):
        compiled.append(fn)
        return real_compile(fn, backend="aot_eager", **k)

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    return compiled


@pytest.mark.parametrize("task", ["lm", "chat"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_the_loop_reads_no_tensor_outside_log_and_eval_steps(
    tiny_lm_data, tiny_ckpt, tmp_path, monkeypatch, task, compile
):
    """Steps 0..4 of 6 neither log nor evaluate: owngpt reads no tensor value there (loss, token counts, units).

    Eager, transformers' GPT-2 forward makes its own data-dependent checks (a pad id in an unmasked batch, packed
    sequences; with a mask, whether SDPA may use is_causal), 1-2 reads a forward that only compiling removes:
    compiled, the step reads nothing at all. The last step logs and evaluates: its reads show the spy works."""
    data = tiny_lm_data if task == "lm" else write_chat_data_dir(tmp_path / "chat")
    if compile:
        aot_eager(monkeypatch)
    cfg = quick_cfg(data, tmp_path / "run", tiny_ckpt, task=task, max_steps=6, log_every=6, eval_every=6,
                    grad_accum=2, batch_size=2, device="cpu", compile=compile)  # fmt: skip
    res, seen = reads_per_step(monkeypatch, cfg)
    assert res.steps == 6
    in_steps = [r for r in seen if r[0] is not None and r[0] < 5]
    assert [r for r in in_steps if not r[2]] == []  # none by owngpt
    if compile:
        assert in_steps == []
    assert any(r[0] == 5 for r in seen)


def test_the_cpu_check_catches_a_per_step_read(tiny_lm_data, tiny_ckpt, tmp_path, monkeypatch):
    """The bug the test above names, planted: a float(loss) per micro-batch (the old loop) is seen in every step."""
    from owngpt import train_step

    add = train_step.LossMeter.add

    def add_and_read(self, loss):
        float(loss.detach())
        add(self, loss)

    monkeypatch.setattr(train_step.LossMeter, "add", add_and_read)
    cfg = quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=3, log_every=3, eval_every=3, device="cpu")
    _, seen = reads_per_step(monkeypatch, cfg)
    assert {s for s, name, _ in seen if name == "__float__"} >= {0, 1, 2}


@pytest.mark.cuda
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_no_cuda_sync_between_log_steps(tiny_lm_data, tiny_ckpt, tmp_path, monkeypatch, compile):
    """On a GPU, torch itself says so (sync debug mode) for steps 1..4 of 6 (step 0 warms up lazily; step 6 logs).

    Compiled: mode "error", not one synchronising call. Eager: mode "warn", and every warning must come from inside
    transformers' forward (its data-dependent checks, see the CPU test above), none from owngpt's loop."""
    import traceback
    import warnings

    from owngpt import train_step

    lr_at, read = train_mod.lr_at, train_step.LossMeter.read
    strict = "error" if compile else "warn"

    def strict_lr_at(step, *args):
        torch.cuda.set_sync_debug_mode(strict if 1 <= step < 5 else "default")
        return lr_at(step, *args)

    def lenient_read(self, dist):
        torch.cuda.set_sync_debug_mode("default")  # the log step's one read
        return read(self, dist)

    stacks = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stacks.append([f.filename for f in traceback.extract_stack()])  # still inside the offending call

    monkeypatch.setattr(train_mod, "lr_at", strict_lr_at)
    monkeypatch.setattr(train_step.LossMeter, "read", lenient_read)
    cfg = quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=6, log_every=6, eval_every=6,
                    device="cuda", compile=compile)  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            monkeypatch.setattr(warnings, "showwarning", show)
            res = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.steps == 6
    assert all(any(f"{os.sep}transformers{os.sep}" in f for f in stack) for stack in stacks), stacks


def test_prefetched_batches_equal_the_pure_ones_and_errors_reach_the_loop(tiny_lm_data, tiny_ckpt, tmp_path):
    from owngpt.data.datadir import open_data_dir
    from owngpt.tasks.base import get_task

    cfg = quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, block_size=16)
    data = open_data_dir(tiny_lm_data)
    task = get_task("lm")(data, data.load_tokenizer(), cfg, 16)
    make = functools.partial(build_step, task, rows_per_step=8, rank=1, batch_size=2, grad_accum=2, pin=False)
    pre = Prefetcher(lambda s: make(step=s), 3, 7, depth=2)
    try:
        for step in range(3, 7):
            got, want = pre.get(step), make(step=step)
            assert (got.step, got.units, got.tokens) == (step, 4 * 16, 4 * 16)
            for a, b in zip(got.micro, want.micro, strict=True):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            rows = task.global_rows(step, 8)[4:8]  # rank 1 of 2: the second half of the global batch
            assert torch.equal(got.micro[1]["input_ids"], task.collate(rows[2:4])["input_ids"])
    finally:
        pre.close()

    def broken(step):
        if step == 1:
            raise ValueError("bad row")
        return make(step=step)

    pre = Prefetcher(broken, 0, 5)
    try:
        assert pre.get(0).step == 0
        with pytest.raises(ValueError, match="bad row"):
            pre.get(1)
    finally:
        pre.close()
    assert not pre._thread.is_alive()


def test_forward_and_loss_has_no_graph_break(tiny_ckpt):
    """The transformer body and the loss trace into one graph (TORCH_LOGS=graph_breaks would print none), with and
    without an attention mask (lm and chat batches)."""
    from transformers import AutoModelForCausalLM

    from owngpt.tasks.base import CausalLMTask

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt).train()
    fn = forward_and_loss(CausalLMTask.__new__(CausalLMTask), model)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 20, (2, 12), generator=g), "labels": torch.randint(0, 20, (2, 12))}
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(batch)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ex = torch._dynamo.explain(fn)(dict(batch, attention_mask=mask))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


def test_compiled_training_does_not_recompile_and_matches_eager(tiny_lm_data, tiny_ckpt, tmp_path, monkeypatch):
    """compile=true compiles forward + loss once: evaluations switch the model to eval mode and back without a
    recompile (error_on_recompile), and the weights equal the eager run's up to rounding."""
    import torch._dynamo

    kw = dict(max_steps=4, eval_every=2, log_every=1, device="cpu", dropout=0.0)
    eager = train(quick_cfg(tiny_lm_data, tmp_path / "eager", tiny_ckpt, **kw))
    compiled_fns = aot_eager(monkeypatch)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.utils.counters.clear()
    comp = train(quick_cfg(tiny_lm_data, tmp_path / "compiled", tiny_ckpt, compile=True, **kw))
    assert [f.__name__ for f in compiled_fns] == ["step_loss"]  # forward and loss, not the model alone
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    a, b = weights(eager.last_checkpoint), weights(comp.last_checkpoint)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_diverged_loss_stops_the_run_before_an_evaluation_saves_it(tiny_lm_data, tiny_ckpt, tmp_path, monkeypatch):
    """The loss is read only at log and evaluation steps, so divergence is caught at the next of them: here the
    evaluation of step 4 (logs only every 100), before checkpoints/last would take the NaN weights."""
    from owngpt.checkpoint import read_meta
    from owngpt.errors import ConfigError
    from owngpt.tasks.lm import LMTask

    loss = LMTask.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        out = loss(self, model, batch)
        if not model.training:  # an evaluation
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out  # the third training step's micro-batch

    monkeypatch.setattr(LMTask, "loss", poisoned)
    cfg = quick_cfg(tiny_lm_data, tmp_path / "run", tiny_ckpt, max_steps=6, eval_every=2, log_every=100, eval_batches=1)
    with pytest.raises(ConfigError, match="the training loss became nan by step 4"):
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last"
    assert read_meta(last)["step"] == 2
    assert all(torch.isfinite(v).all() for v in weights(last).values())
