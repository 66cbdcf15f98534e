"""Builders for tiny, offline test artefacts: a char tokenizer, random GPT-2 checkpoints, data dirs.

They follow the documented formats (docs/data.md, docs/architecture.md) directly, so each stage's tests run without the others' code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from owngpt.chat_format import CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\nJULIET:\nAy me! 床前明月光\n"
)


def char_tokenizer(chars: str = TEXT):
    """A char-level PreTrainedTokenizerFast with byte fallback (any text round-trips) and owngpt's specials."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in sorted(set(chars)):
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_gpt2(
    tokenizer,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 128,
    seed: int = 0,
    task: str = "lm",
    num_labels: int = 2,
):
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    if task == "classify":
        cfg.num_labels = num_labels
        return GPT2ForSequenceClassification(cfg).eval()
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(
    tokenizer,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 128,
    seed: int = 0,
    task: str = "lm",
    num_labels: int = 2,
):
    """A random tiny LLaMA-style model built as owngpt's llama presets are (owngpt.model_init.preset_config)."""
    import torch

    from owngpt.model_init import preset_config, preset_model_class

    shape = {"arch": "llama", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "n_positions": n_positions}
    overrides = {"num_labels": num_labels} if task == "classify" else {}
    cfg = preset_config({**shape, "intermediate_size": 88}, tokenizer, 0.0, overrides)
    torch.manual_seed(seed)
    kind = "sequence_classification" if task == "classify" else "causal_lm"
    return preset_model_class(cfg, kind)(cfg).eval()


def save_tiny_checkpoint(path: Path, task: str = "lm", arch: str = "gpt2", **kw) -> Path:
    """A random tiny GPT-2 (or, with arch="llama", LLaMA-style) checkpoint dir in owngpt's format."""
    from owngpt.checkpoint import save_checkpoint

    tok = char_tokenizer()
    model = (tiny_llama if arch == "llama" else tiny_gpt2)(tok, task=task, **kw)
    if task != "classify":
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    meta = {"task": task, "source": {"kind": "preset", "name": "test-tiny"}, "step": 0}
    return save_checkpoint(path, model, tok, meta)


def write_meta(path: Path, task: str, tok, splits: dict, **extra) -> None:
    """meta.json (format v1, char tokenizer) and an empty report.json: the one place the test data dirs write them."""
    from owngpt.data import datadir

    meta = {
        "format": datadir.FORMAT,
        "version": 1,
        "task": task,
        "dtype": "uint16",
        "splits": splits,
        **extra,
        "tokenizer": {
            "kind": "char",
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        "inputs": [],
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (path / "report.json").write_text("{}", encoding="utf-8")


def write_lm_data_dir(path: Path, text: str = TEXT * 20, val_fraction: float = 0.1, tokenizer=None) -> Path:
    """A language-modelling data dir (format v1) with documents split on blank lines."""
    tok = tokenizer or char_tokenizer()
    path.mkdir(parents=True)
    tok.save_pretrained(path / "tokenizer")
    docs = [d for d in text.split("\n\n") if d.strip()]
    n_val = max(1, int(len(docs) * val_fraction))
    dtype = np.uint16
    splits = {}
    for split, part in (("train", docs[n_val:]), ("val", docs[:n_val])):
        ids: list[int] = []
        for d in part:
            ids += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
        np.asarray(ids, dtype=dtype).tofile(path / f"{split}.bin")
        splits[split] = {"documents": len(part), "tokens": len(ids), "bytes": sum(len(d.encode()) for d in part)}
    write_meta(path, "lm", tok, splits)
    return path


def write_classify_data_dir(
    path: Path,
    train: list[tuple[str, str]],
    val: list[tuple[str, str]],
    labels: list[str] | None = None,
    tokenizer=None,
) -> Path:
    """A classification data dir (format v1) from (text, label name) pairs; labels in sorted order by default."""
    tok = tokenizer or char_tokenizer()
    labels = labels or sorted({lab for _, lab in train + val})
    index = {lab: i for i, lab in enumerate(labels)}
    path.mkdir(parents=True)
    tok.save_pretrained(path / "tokenizer")
    splits = {}
    for split, rows in (("train", train), ("val", val)):
        offsets, ids = [0], []
        with open(path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text, lab in rows:
                f.write(json.dumps({"text": text, "label": lab}, ensure_ascii=False) + "\n")
                ids += tok.encode(text, add_special_tokens=False)
                offsets.append(len(ids))
        np.asarray(ids, dtype=np.uint16).tofile(path / f"{split}.ids.bin")
        np.save(path / f"{split}.idx.npy", np.asarray(offsets, dtype=np.int64))
        np.save(path / f"{split}.labels.npy", np.asarray([index[lab] for _, lab in rows], dtype=np.int64))
        splits[split] = {"examples": len(rows), "tokens": len(ids)}
    write_meta(path, "classify", tok, splits, labels=labels)
    return path
