"""owngpt.checkpoint.Checkpoint: one way to open every kind of checkpoint a command accepts, the task rule, the
trained-context rule, the tokenizer's pad token, and owngpt.json written aside by its one writer."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from fixtures import char_tokenizer, save_tiny_checkpoint, tiny_gpt2
from owngpt import atomic, checkpoint_files
from owngpt.checkpoint import (
    DEFAULT_CONTEXT,
    Checkpoint,
    open_checkpoint,
    read_meta,
    save_checkpoint,
    trained_context,
    training_meta,
    write_meta,
)
from owngpt.errors import CheckpointError


def ids(n: int = 8):
    return torch.arange(5, 5 + n)[None]


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def hf_dir(path, task: str = "lm", **kw):
    """A Hugging Face directory owngpt did not train: no owngpt.json."""
    tok = char_tokenizer()
    model = tiny_gpt2(tok, task=task, **kw)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------------- the specs
def test_a_checkpoint_dir(tiny_ckpt):
    c = open_checkpoint(tiny_ckpt)
    assert isinstance(c, Checkpoint) and c.path == tiny_ckpt and c.meta == read_meta(tiny_ckpt)
    assert c.task == "lm" and c.labels == [] and c.quantization is None and c.adapter is None
    assert c.trained_context == 128  # from a preset, no trained_context recorded: capped by the position table
    model = c.model()
    assert type(model).__name__ == "GPT2LMHeadModel" and model.owngpt_context == 128
    assert next(model.parameters()).dtype == torch.float32


def test_config_is_read_once_and_each_model_gets_its_own_copy(tiny_ckpt, monkeypatch):
    calls = []
    real = checkpoint_files._auto_config
    monkeypatch.setattr("owngpt.checkpoint._auto_config", lambda *a, **k: calls.append(a) or real(*a, **k))
    c = open_checkpoint(tiny_ckpt)
    assert c.config is c.config and c.trained_context and c.labels == [] and len(calls) == 1
    m1, m2 = c.model(), c.model()
    m1.config.pad_token_id = 12345
    assert m2.config.pad_token_id != 12345 and c.config.pad_token_id != 12345 and len(calls) == 1


def test_a_run_dir_a_missing_dir_and_a_preset_get_the_errors_they_always_had(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    save_tiny_checkpoint(run / "checkpoints" / "last")
    with pytest.raises(CheckpointError, match=r"is a run dir, not a checkpoint: pass .*checkpoints/last"):
        open_checkpoint(run)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        open_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="from-scratch preset"):
        open_checkpoint("tiny")


def test_a_hub_id_is_resolved_through_the_cache(tiny_ckpt, monkeypatch):
    monkeypatch.setattr("owngpt.models._fetch_hub", lambda model_id: tiny_ckpt)
    c = open_checkpoint("someone/tiny-model")
    assert c.path == tiny_ckpt and c.task == "lm"


def test_an_int8_export(tiny_ckpt, tmp_path):
    from owngpt.quantize import save_quantized

    c = open_checkpoint(tiny_ckpt)
    save_quantized(c.model(), c.tokenizer(), tmp_path / "q", c.meta)
    q = open_checkpoint(tmp_path / "q")
    assert q.quantization and q.quantization["method"] == "int8-dynamic"
    model = q.model()
    assert model.owngpt_context == 128 and (logits(model) - logits(c.model())).abs().max() < 0.1
    with pytest.raises(CheckpointError, match="already quantized.*fp32 checkpoint it came from"):
        q.model(int8=False)
    # int8=True quantizes an fp32 checkpoint in memory: the same model as saving and loading the export
    assert torch.equal(logits(c.model(int8=True)), logits(model))


def test_a_peft_adapter_dir_is_merged_onto_its_base(tiny_ckpt, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = open_checkpoint(tiny_ckpt).model().eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():  # B is zero-initialised: make the adapter do something
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tiny_ckpt)}))
    want = logits(peft_model.eval())
    c = open_checkpoint(adapter)
    assert c.adapter is not None and c.task == "lm" and c.trained_context == 128
    assert (logits(c.model().eval()) - want).abs().max() < 1e-4
    assert c.tokenizer().get_vocab() == open_checkpoint(tiny_ckpt).tokenizer().get_vocab()  # the base's


def test_a_pickled_adapter_is_refused(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickled adapter"):
        open_checkpoint(d)


# --------------------------------------------------------------------------------------------------- the task rule
def test_the_task_is_owngpt_json_s_else_what_config_json_describes(tiny_ckpt, tmp_path):
    cls = open_checkpoint(save_tiny_checkpoint(tmp_path / "cls", task="classify", num_labels=3))
    assert cls.task == "classify" and cls.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    chat = open_checkpoint(save_tiny_checkpoint(tmp_path / "chat", task="chat"))
    assert chat.task == "chat" and chat.labels == []
    hf_lm = open_checkpoint(hf_dir(tmp_path / "hf_lm"))
    hf_cls = open_checkpoint(hf_dir(tmp_path / "hf_cls", task="classify"))
    assert hf_lm.meta == {} and hf_lm.task == "lm"
    assert hf_cls.meta == {} and hf_cls.task == "classify" and hf_cls.labels == ["LABEL_0", "LABEL_1"]
    assert type(hf_cls.model()).__name__ == "GPT2ForSequenceClassification"
    # an lm checkpoint asked for as a classifier gets a new head (fine-tuning into a new task)
    assert type(open_checkpoint(tiny_ckpt).model("classify", num_labels=2)).__name__.endswith("Classification")


def test_label_names_come_from_config_json_in_id_order(tmp_path):
    d = save_tiny_checkpoint(tmp_path / "cls", task="classify", num_labels=3)
    cfg = json.loads((d / "config.json").read_text())
    cfg["id2label"] = {"0": "neg", "1": "neutral", "2": "pos"}
    cfg["label2id"] = {"neg": 0, "neutral": 1, "pos": 2}
    (d / "config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(d).labels == ["neg", "neutral", "pos"]


# ------------------------------------------------------------------------------------------------ trained context
def cfg(**kw):
    return SimpleNamespace(**kw)


def test_trained_context_rule_and_its_one_fallback():
    table = cfg(n_positions=1024)
    assert trained_context({"trained_context": 256}, table) == 256  # what owngpt train recorded
    assert trained_context({"trained_context": 4096}, table) == 1024  # never past the position table
    preset = {"source": {"kind": "preset"}, "block_size": 64}
    assert trained_context(preset, table) == 64  # older owngpt checkpoints trained from a preset
    assert trained_context({"source": {"kind": "local"}, "block_size": 64}, table) == 1024  # fine-tuned: the table
    assert trained_context({}, cfg(max_position_embeddings=2048)) == 2048  # a Hugging Face directory
    assert trained_context({"trained_context": 300}, cfg()) == 300
    assert trained_context({}, cfg()) == DEFAULT_CONTEXT == 2048  # nothing says anything: the one fallback
    assert trained_context({"trained_context": 0, "block_size": "x"}, cfg(n_positions=True)) == DEFAULT_CONTEXT


def test_context_is_the_block_asked_for_or_the_trained_one_never_past_the_table(tiny_ckpt):
    c = open_checkpoint(tiny_ckpt)
    assert c.context() == 128 and c.context(32) == 32 and c.context(4096) == 128


# -------------------------------------------------------------------------------------------------------- tokenizer
def test_the_tokenizer_gets_a_pad_token_without_changing_its_vocabulary(tmp_path):
    from transformers import PreTrainedTokenizerFast

    padded = char_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=padded.backend_tokenizer, eos_token=padded.eos_token)
    assert tok.pad_token is None
    d = tmp_path / "nopad"
    save_checkpoint(d, tiny_gpt2(padded), tok, {"task": "lm"})
    got = open_checkpoint(d).tokenizer()
    assert got.pad_token == got.eos_token and got.pad_token_id == got.eos_token_id
    assert got.get_vocab() == tok.get_vocab()
    # a tokenizer that has a pad token keeps it
    keep = open_checkpoint(save_tiny_checkpoint(tmp_path / "pad")).tokenizer()
    assert keep.pad_token == padded.pad_token != padded.eos_token


# ----------------------------------------------------------------------------------------------------- owngpt.json
META_ARGS = dict(
    task="chat",
    source={"source": {"kind": "preset", "name": "tiny"}},
    step=40,
    metrics={"val_loss": 1.5},
    block_size=64,
    trained_context=64,
    lora=False,
    data={"path": "../data", "sha256": "ab"},
    task_meta={"chat_template": True},
)


def test_training_meta_has_train_s_fields_in_train_s_order():
    meta = training_meta(**META_ARGS)
    assert list(meta) == [
        "task",
        "source",
        "step",
        "metrics",
        "block_size",
        "trained_context",
        "lora",
        "data",
        "chat_template",
    ]


def test_write_meta_round_trips_and_writes_what_train_wrote(tmp_path):
    meta = training_meta(**META_ARGS)
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta
    text = (tmp_path / "owngpt.json").read_text(encoding="utf-8")
    assert text == json.dumps(meta, ensure_ascii=False, indent=2) + "\n"  # the bytes save_checkpoint always wrote


def test_write_meta_writes_aside_then_renames(tmp_path, monkeypatch):
    write_meta(tmp_path, {"task": "lm", "step": 1})
    before = (tmp_path / "owngpt.json").read_bytes()
    seen = []
    real = os.replace

    def replace(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst), json.loads(open(src).read())["step"]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError):
        write_meta(tmp_path, {"task": "lm", "step": 2})
    assert seen and seen[0][0].startswith(".owngpt.json.tmp-") and seen[0][1:] == ("owngpt.json", 2)
    assert (tmp_path / "owngpt.json").read_bytes() == before and os.listdir(tmp_path) == ["owngpt.json"]
    monkeypatch.setattr(atomic.os, "replace", real)
    with pytest.raises(ValueError, match="task 'poetry'"):
        write_meta(tmp_path, {"task": "poetry"})  # read_meta would refuse it: never written
    assert (tmp_path / "owngpt.json").read_bytes() == before
