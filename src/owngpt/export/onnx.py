"""`owngpt export --to onnx`: `model.onnx` with a KV cache, checked against PyTorch when it is written, and the small
onnxruntime runner that the check and the export's report use.

Inputs input_ids, attention_mask, position_ids, past_key_values.{i}.{key,value}; outputs logits,
present.{i}.{key,value}. The export is refused unless |dlogit| <= ONNX_TOLERANCE against PyTorch fp32.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from owngpt.console import quiet, say
from owngpt.errors import CheckpointError, require
from owngpt.outdir import CHECKPOINT, replacing

ONNX_TOLERANCE = 1e-3  # max |logit difference| between onnxruntime and PyTorch fp32 accepted at export
ONNX_OPSET = 17


def _kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder-only config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv, head_dim


def _onnx_wrapper(model: Any):
    """The model with flat past/present tensors instead of a Cache object, which ONNX cannot carry."""
    import torch
    from transformers import DynamicCache

    layers = _kv_shape(model.config)[0]

    class FlatCacheLM(torch.nn.Module):
        def __init__(self, m: Any):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.m.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return FlatCacheLM(model).eval()


def onnx_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(model: Any, tokenizer: Any, out: Path, meta: dict[str, Any]) -> dict[str, float]:
    """Write model.onnx (+ config and tokenizer) and check it against PyTorch; returns the max logit differences.

    The TorchScript-based exporter (`dynamo=False`) is used because it traces transformers 5's cache code with
    dynamic sequence/past axes in about a second; the dynamo exporter needs `dynamic_shapes` for every flat past
    tensor and was not needed to reach the tolerance. The trace uses a prompt of 2 tokens and a past of 1 so that no
    size-0/size-1 dimension gets specialised.
    """
    import torch

    require("onnx", "export")
    ort = require("onnxruntime", "export")
    layers, kv, hd = _kv_shape(model.config)
    in_names, out_names = onnx_names(layers)
    dyn: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for n in in_names[3:]:
        dyn[n] = {0: "batch", 2: "past_sequence"}
    for n in out_names[1:]:
        dyn[n] = {0: "batch", 2: "total_sequence"}
    ids = torch.tensor([[1, 2]], dtype=torch.long)
    args = (
        ids,
        torch.ones(1, 3, dtype=torch.long),
        torch.tensor([[1, 2]]),
        *[torch.zeros(1, kv, 1, hd) for _ in range(2 * layers)],
    )
    with replacing(out, kind=CHECKPOINT, overwrite=True, create=True) as tmp:  # built aside, swapped in
        say(f"exporting to ONNX (opset {ONNX_OPSET})...")
        with quiet(), torch.no_grad():
            torch.onnx.export(
                _onnx_wrapper(model),
                args,
                str(tmp / "model.onnx"),
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dyn,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        err = check_onnx(tmp / "model.onnx", model, ort)
        if max(err.values()) > ONNX_TOLERANCE:
            raise CheckpointError(
                f"the ONNX graph's logits differ from PyTorch's by {max(err.values()):.2e} "
                f"(> {ONNX_TOLERANCE}); nothing was written"
            )
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        io = {
            "inputs": in_names,
            "outputs": out_names,
            "past_shape": ["batch", kv, "past_sequence", hd],
            "opset": ONNX_OPSET,
            "tolerance": ONNX_TOLERANCE,
            "max_abs_logit_error": err,
        }
        (tmp / "owngpt.json").write_text(json.dumps({**meta, "onnx": io}, indent=2) + "\n", encoding="utf-8")
    return err


def check_onnx(path: Path, model: Any, ort: Any = None) -> dict[str, float]:
    """Max |logit difference| of onnxruntime vs PyTorch: a 12-token prompt from an empty past, then one decode step."""
    import torch

    ort = ort or require("onnxruntime", "export")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onx = OnnxLM(None, model.config, session=sess)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=g)
    with torch.no_grad():
        ref = model(ids, use_cache=True)
    logits, past = onx.step(ids.numpy(), None)
    e1 = float(abs(logits - ref.logits.numpy()).max())
    nxt = torch.randint(0, vocab, (1, 1), generator=g)
    with torch.no_grad():
        ref2 = model(nxt, past_key_values=ref.past_key_values, use_cache=True)
    logits2, _ = onx.step(nxt.numpy(), past)
    e2 = float(abs(logits2 - ref2.logits.numpy()).max())
    return {"prompt": e1, "decode": e2}


class OnnxLM:
    """A minimal onnxruntime runner for owngpt's ONNX export: one step with a KV cache, greedy decode, perplexity."""

    def __init__(self, path: Path | None, config: Any, session: Any = None):
        if session is None:
            ort = require("onnxruntime", "export")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.sess = session
        self.layers, self.kv, self.hd = _kv_shape(config)
        self.in_names, _ = onnx_names(self.layers)

    def step(self, ids: Any, past: list[Any] | None) -> tuple[Any, list[Any]]:
        """Logits (B, T, V) for `ids` (B, T) after `past` (list of 2*layers arrays, or None = empty)."""
        import numpy as np

        b, t = ids.shape
        if past is None:
            past = [np.zeros((b, self.kv, 0, self.hd), np.float32) for _ in range(2 * self.layers)]
        p = past[0].shape[2]
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((b, p + t), np.int64),
            "position_ids": np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)).copy(),
        }
        feed.update(zip(self.in_names[3:], past))
        outs = self.sess.run(None, feed)
        return outs[0], outs[1:]

    def decode_speed(self, prompt: Sequence[int], n_tokens: int) -> float:
        import numpy as np

        logits, past = self.step(np.asarray([list(prompt)]), None)
        t = time.perf_counter()
        for _ in range(n_tokens):
            nxt = logits[:, -1:].argmax(-1)
            logits, past = self.step(nxt, past)
        return n_tokens / (time.perf_counter() - t)

    def perplexity(self, tokens: Any, block_size: int) -> float:
        import numpy as np

        total, count = 0.0, 0
        for s in range(0, len(tokens) - 1, block_size):
            x = np.asarray(tokens[s : s + block_size], dtype=np.int64)
            y = np.asarray(tokens[s + 1 : s + 1 + block_size], dtype=np.int64)
            x = x[: len(y)]
            logits, _ = self.step(x[None], None)
            lg = logits[0].astype(np.float64)
            m = lg.max(-1, keepdims=True)
            logz = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
            total += float((logz - lg[np.arange(len(y)), y]).sum())
            count += len(y)
        return math.exp(total / max(count, 1))
