"""Helpers shared by the training tests: a chat data dir in the documented format, quick configs, weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import fixtures

CONVERSATIONS = [
    [
        {"role": "user", "content": "hear me speak"},
        {"role": "assistant", "content": "Speak, speak."},
        {"role": "user", "content": "are you resolved?"},
        {"role": "assistant", "content": "Resolved. resolved."},
    ],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what light?"},
        {"role": "assistant", "content": "yonder window"},
    ],
    [{"role": "user", "content": "床前明月光"}, {"role": "assistant", "content": "Ay me!"}],
]


def write_chat_data_dir(path: Path, n_train: int = 24, n_val: int = 3) -> Path:
    """A chat data dir (format v1): {split}.jsonl plus the rendered ids/mask/idx, as `owngpt prepare` writes."""
    from owngpt.chat_format import render
    from owngpt.data.datadir import RaggedWriter

    tok = fixtures.char_tokenizer()
    path.mkdir(parents=True)
    tok.save_pretrained(path / "tokenizer")
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        convs = [CONVERSATIONS[i % len(CONVERSATIONS)] for i in range(n)]
        with open(path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for c in convs:
                f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
        w = RaggedWriter(path, split, np.uint16, with_mask=True)
        for c in convs:
            w.add(*render(tok, c))
        splits[split] = {"examples": w.close()}
    fixtures.write_meta(path, "chat", tok, splits)
    return path


def quick_cfg(data: Path, out: Path, model: Path | str, **kw):
    """A few-step config on a tiny model: constant lr, no warmup, small batches; on the CPU in fp32, also on a GPU
    machine, since tests compare against CPU references and against other CPU runs bitwise."""
    from owngpt.config import TrainConfig

    base = dict(
        data=str(data),
        out=str(out),
        model=str(model),
        max_steps=6,
        eval_every=3,
        batch_size=4,
        block_size=32,
        lr=3e-3,
        warmup_steps=0,
        schedule="constant",
        eval_batches=2,
        log_every=1,
        seed=3,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(ckpt: Path) -> dict:
    """The top-level safetensors of a checkpoint (what transformers loads)."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd
