"""`owngpt export`: turn a checkpoint into something to deploy (hf, int8, onnx, gguf) and measure what it costs.

Every export writes its output aside and renames it into place, then measures the result against the original on
the same tokens and writes `report.json` next to it (also printed): size on disk (weight files), decode tokens/s
(greedy, batch 1, the same prompt and length for both) and perplexity on a validation set (`--data` val split or
`--eval-file`). The measurement helpers here are shared with `owngpt prune` and bench/bench_optimize.py.

Targets:
  - hf:   a plain Hugging Face dir (LoRA merged, safetensors, tokenizer + chat template) that transformers loads alone.
  - int8: owngpt.quantize's format; loads through owngpt.checkpoint.load_model (generate, chat, serve).
  - onnx: `model.onnx` with a KV cache (inputs input_ids, attention_mask, position_ids, past_key_values.{i}.{key,value};
          outputs logits, present.{i}.{key,value}); checked against PyTorch at export (|dlogit| <= ONNX_TOLERANCE).
  - gguf: GPT-2 and LLaMA architectures, llama.cpp's tensor names and metadata, written with the `gguf` package.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from owngpt.checkpoint import run_relative
from owngpt.errors import CheckpointError, ConfigError, DataError, require
from owngpt.outdir import CHECKPOINT, check_out, replacing

TARGETS = ("hf", "int8", "onnx", "gguf")
ONNX_TOLERANCE = 1e-3  # max |logit difference| between onnxruntime and PyTorch fp32 accepted at export
ONNX_OPSET = 17
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".gguf")
REPORT = "report.json"


# ----------------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary sibling dir renamed to `out_dir` on success (never a half-written output); see datadir.building."""
    with replacing(out_dir, kind=CHECKPOINT, overwrite=overwrite, create=True) as tmp:
        yield tmp


def weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a checkpoint/export dir (what a deployment ships; tokenizer/json not counted)."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    return sum(f.stat().st_size for f in files if f.name != "adapter_model.safetensors")


def load_fp32(ckpt: str | os.PathLike) -> tuple[Any, Any, dict[str, Any], Path]:
    """(fp32 model with any LoRA merged, tokenizer, owngpt.json meta, path) of a checkpoint to export or prune.

    owngpt's LoRA checkpoints already hold the merged weights (the adapter sits apart under adapter/). A peft adapter
    dir (adapter_config.json at the top) is merged onto its base with peft's `merge_and_unload`.
    """
    from owngpt.checkpoint import load_model, read_meta
    from owngpt.models import resolve_checkpoint
    from owngpt.tokenizer import load_tokenizer

    given = Path(ckpt)
    is_adapter = (given / "adapter_config.json").is_file() and not (given / "config.json").is_file()
    path = given if is_adapter else Path(resolve_checkpoint(str(ckpt)))
    meta = read_meta(path)
    if meta.get("quantization"):
        raise CheckpointError(
            f"{path} is already quantized ({meta['quantization'].get('method')}); export or prune "
            "the fp32 checkpoint it came from"
        )
    if (path / "adapter_config.json").is_file():  # with a config.json too, transformers would apply it itself
        from peft import PeftModel

        from owngpt.checkpoint import check_adapter_dir

        check_adapter_dir(path)  # peft would torch.load an adapter_model.bin: refused here
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base_spec = cfg.get("base_model_name_or_path")
        if not base_spec:
            raise CheckpointError(f"{path}/adapter_config.json has no base_model_name_or_path: cannot merge the LoRA")
        base = load_model(resolve_checkpoint(base_spec), task=meta.get("task", "lm"))
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        tok_dir = path if (path / "tokenizer_config.json").exists() else Path(resolve_checkpoint(base_spec))
        tokenizer = load_tokenizer(tok_dir)
    else:
        model = load_model(path, task=meta.get("task", "lm"))
        tokenizer = load_tokenizer(path)
    model.eval()
    from owngpt.generation import trained_context

    model.owngpt_context = trained_context(meta, model.config)  # the context it was trained for (GGUF states it)
    return model, tokenizer, meta, path


def eval_tokens(
    tokenizer: Any, data: str | None, eval_file: str | None, max_tokens: int, ckpt: Path | None = None
) -> tuple[Any, str] | None:
    """Validation tokens for perplexity: DATA_DIR's val split or a text file tokenized by the checkpoint's tokenizer."""
    import numpy as np

    if data and eval_file:
        raise ConfigError("pass --data or --eval-file, not both")
    if data:
        from owngpt.data.datadir import META, open_data_dir
        from owngpt.evaluate import check_same_tokenizer

        d = Path(data)
        if not (d / META).is_file():
            raise DataError(f"--data {d}: no {META} there (make it with `owngpt prepare`)")
        dd = open_data_dir(d)  # checked against its meta.json: sizes, hashes, token ids, tokenizer
        if dd.task != "lm" or not (d / "val.bin").is_file():
            raise DataError(
                f"--data {d}: perplexity needs a language-modelling data dir with val.bin "
                f"(task is {dd.task!r}); or pass --eval-file TEXT"
            )
        check_same_tokenizer(tokenizer, dd.load_tokenizer(), ckpt or Path("the checkpoint"), d)
        toks = np.asarray(dd.tokens("val")[: max_tokens + 1])
        return toks.astype(np.int64), f"{d}/val.bin"
    if eval_file:
        f = Path(eval_file)
        if not f.is_file():
            raise DataError(f"--eval-file {f}: no such file")
        text = f.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text[: max_tokens * 8], add_special_tokens=False)[: max_tokens + 1]
        if len(ids) < 2:
            raise DataError(f"--eval-file {f}: fewer than 2 tokens of text")
        return np.asarray(ids, dtype=np.int64), str(f)
    return None


def context_length(config: Any) -> int:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1024


def perplexity(model: Any, tokens: Any, block_size: int = 256) -> float:
    """exp(mean NLL) over `tokens` in windows of `block_size` (owngpt.evaluate's loop, so `owngpt eval` agrees)."""
    from owngpt.evaluate import lm_stream_loss

    total, count = lm_stream_loss(
        model, tokens, min(block_size, context_length(model.config)), batch_size=4, progress=False
    )
    return math.exp(total / max(count, 1))


def _prompt(tokens: Any, tokenizer: Any) -> list[int]:
    if tokens is not None and len(tokens) >= 16:
        return [int(t) for t in tokens[:16]]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return [int(eos)]


def hf_decode_fn(model: Any, prompt: Sequence[int], n_tokens: int) -> Callable[[], float]:
    """A callable timing greedy decode of exactly `n_tokens` with transformers' generate; returns tokens/s."""
    import torch

    ids = torch.tensor([list(prompt)], dtype=torch.long, device=next(model.parameters()).device)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id

    def run() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_tokens,
                max_length=None,  # no warning about the checkpoint's max_length (its trained context)
                min_new_tokens=n_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            return n_tokens / (time.perf_counter() - t)

    return run


def interleaved(fns: dict[str, Callable[[], float]], repeats: int = 3, warmup: bool = True) -> dict[str, float]:
    """Median of `repeats` runs of each callable, interleaved A B A B so that load from other work hits all alike."""
    if warmup:
        for f in fns.values():
            f()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            runs[k].append(f())
    return {k: statistics.median(v) for k, v in runs.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' and torch's warnings during export/tracing (they are about internals, not the user)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ measurement
def measure(
    original: Any,
    original_dir: Path,
    result_dir: Path,
    tokenizer: Any,
    tokens: Any,
    *,
    result_model: Any = None,
    result_decode: Callable[[], float] | None = None,
    result_ppl: Callable[[Any], float] | None = None,
    decode_tokens: int = 32,
    repeats: int = 3,
    notes: Sequence[str] = (),
    block_size: int | None = None,
) -> dict[str, Any]:
    """The report: size, decode tokens/s and perplexity of the original and of the result, on the same tokens."""
    prompt = _prompt(tokens, tokenizer)
    n = max(1, min(decode_tokens, context_length(original.config) - len(prompt)))
    fns = {"original": hf_decode_fn(original, prompt, n)}
    if result_decode is None and result_model is not None:
        result_decode = hf_decode_fn(result_model, prompt, n)
    if result_decode is not None:
        fns["result"] = result_decode
    speed = interleaved(fns, repeats=repeats) if decode_tokens > 0 else {}
    # the block size the checkpoint was trained with (owngpt.json), else 256: positions never trained would only add noise
    block = min(block_size or 256, context_length(original.config))
    ppl_o = perplexity(original, tokens, block) if tokens is not None else None
    ppl_r = None
    if tokens is not None:
        if result_ppl is not None:
            ppl_r = result_ppl(tokens)
        elif result_model is not None:
            ppl_r = perplexity(result_model, tokens, block)
    orig = {"size_bytes": weight_bytes(original_dir), "decode_tokens_per_s": speed.get("original"), "perplexity": ppl_o}
    res = {"size_bytes": weight_bytes(result_dir), "decode_tokens_per_s": speed.get("result"), "perplexity": ppl_r}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    return {
        "original": orig,
        "result": res,
        "ratios": {
            "size": ratio(res["size_bytes"], orig["size_bytes"]),
            "decode_speed": ratio(res["decode_tokens_per_s"], orig["decode_tokens_per_s"]),
            "perplexity": ratio(res["perplexity"], orig["perplexity"]),
        },
        "decode": {
            "prompt_tokens": len(prompt),
            "new_tokens": n,
            "repeats": repeats,
            "batch": 1,
            "greedy": True,
            "threads": _threads(),
        },
        "eval_tokens": None if tokens is None else int(len(tokens)),
        "eval_window": block,
        "notes": list(notes) + ([] if tokens is not None else ["no --data/--eval-file given: perplexity not measured"]),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def format_report(rep: dict[str, Any]) -> str:
    def fmt(v: Any, kind: str) -> str:
        if v is None:
            return "-"
        if kind == "size":
            return f"{v / 1e6:.2f} MB"
        return f"{v:.1f}" if kind == "speed" else f"{v:.3f}"

    rows = [("", "size", "decode tok/s", "perplexity")]
    for k in ("original", "result"):
        r = rep[k]
        rows.append(
            (k, fmt(r["size_bytes"], "size"), fmt(r["decode_tokens_per_s"], "speed"), fmt(r["perplexity"], "ppl"))
        )
    ra = rep["ratios"]
    rows.append(("ratio", fmt(ra["size"], "x"), fmt(ra["decode_speed"], "x"), fmt(ra["perplexity"], "x")))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines + [f"note: {n}" for n in rep.get("notes", [])])


def write_report(out_dir: Path, rep: dict[str, Any]) -> None:
    from owngpt.data.datadir import write_json

    write_json(out_dir / REPORT, rep)


# ----------------------------------------------------------------------------------------------------------- export
def export(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    to: str,
    *,
    data: str | None = None,
    eval_file: str | None = None,
    eval_tokens_max: int = 8192,
    decode_tokens: int = 32,
    gguf_type: str = "f16",
    measure_result: bool = True,
    overwrite: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Export `ckpt` to `out` as `to`; returns (and writes) the report. `device` (owngpt.device's forms) is where
    the measurements of an hf export run; int8 and onnx results run on the CPU only, so they are measured there.

    The export and its report are built beside `out` and swapped in at the end (owngpt.outdir): an existing `out`
    is replaced only with `overwrite` and only when it is an owngpt checkpoint or export, never when it is or holds
    the checkpoint or the evaluation data.
    """
    if to not in TARGETS:
        raise ConfigError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    inputs = output_inputs(ckpt, data, eval_file)
    with replacing(out, kind=CHECKPOINT, overwrite=overwrite, inputs=inputs, suggest=to) as stage:
        return _export(
            ckpt,
            Path(out),
            stage,
            to,
            data,
            eval_file,
            eval_tokens_max,
            decode_tokens,
            gguf_type,
            measure_result,
            device,
        )


def output_inputs(ckpt: str | os.PathLike, data: str | None, eval_file: str | None) -> list[tuple[str, Any]]:
    """What export and prune read, for owngpt.outdir.check_out: the checkpoint (a LoRA adapter's base too), data."""
    inputs: list[tuple[str, Any]] = [("checkpoint", ckpt), ("data dir (--data)", data), ("--eval-file", eval_file)]
    adapter = Path(ckpt) / "adapter_config.json"
    if adapter.is_file() and not (Path(ckpt) / "config.json").is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            inputs.append(
                ("adapter's base model", json.loads(adapter.read_text("utf-8")).get("base_model_name_or_path"))
            )
    return inputs


def _export(
    ckpt: str | os.PathLike,
    out: Path,
    stage: Path,
    to: str,
    data: str | None,
    eval_file: str | None,
    eval_tokens_max: int,
    decode_tokens: int,
    gguf_type: str,
    measure_result: bool,
    device: str,
) -> dict[str, Any]:
    """export()'s work, written into `stage` (the new `out` until it is swapped in)."""
    measure_on = _measure_device(device, to) if measure_result else None
    model, tok, meta, src = load_fp32(ckpt)
    check_out(out, [("checkpoint", src)], suggest=to)  # a run dir given as CKPT resolves to a checkpoint inside
    tokens = None
    if measure_result:
        found = eval_tokens(tok, data, eval_file, eval_tokens_max, src)
        tokens = found[0] if found else None
    new_meta = {
        **{k: v for k, v in meta.items() if k not in ("quantization",)},
        "exported_from": run_relative(src, out),  # relative to the export, or none: exports are shared
        "export": to,
    }
    notes: list[str] = []
    kw: dict[str, Any] = {}
    if to == "hf":
        export_hf(model, tok, stage, new_meta)
        if measure_result:
            from owngpt.checkpoint import load_model

            kw["result_model"] = load_model(stage).eval()
    elif to == "int8":
        from owngpt.quantize import save_quantized

        save_quantized(model, tok, stage, new_meta)
        if measure_result:
            from owngpt.checkpoint import load_model

            kw["result_model"] = load_model(stage).eval()  # exactly what generate/chat/serve will load
    elif to == "onnx":
        err = export_onnx(model, tok, stage, new_meta)
        notes.append(
            f"onnx vs PyTorch max |dlogit| {err['prompt']:.2e} (prompt), {err['decode']:.2e} (decode step); "
            f"tolerance {ONNX_TOLERANCE}"
        )
        notes.append(
            "onnx decode speed is onnxruntime with owngpt's greedy loop; the original uses transformers' generate"
        )
        if measure_result:
            onx = OnnxLM(stage / "model.onnx", model.config)
            prompt = _prompt(tokens, tok)
            n = max(1, min(decode_tokens, context_length(model.config) - len(prompt)))
            kw["result_decode"] = lambda: onx.decode_speed(prompt, n)
            kw["result_ppl"] = lambda t: onx.perplexity(
                t, min(meta.get("block_size") or 256, context_length(model.config))
            )
    else:
        export_gguf(model, tok, stage, dtype=gguf_type)
        llama_cpp = _llama_cpp() if measure_result else None
        if llama_cpp is None:
            notes.append(
                "gguf: decode speed and perplexity are llama.cpp's to measure (llama-bench, llama-perplexity); "
                "only the size is reported here (with llama-cpp-python installed, the report measures them)"
            )
        else:
            ctx = model.owngpt_context  # llama.cpp runs the trained context the file states (GPT-2: no more rows)
            lcpp = LlamaCppLM(stage / "model.gguf", ctx, llama_cpp)
            prompt = _prompt(tokens, tok)[: ctx - 1]
            n = max(1, min(decode_tokens, ctx - len(prompt)))
            kw["result_decode"] = lambda: lcpp.decode_speed(prompt, n)
            block = min(meta.get("block_size") or 256, context_length(model.config))
            if block <= ctx:
                kw["result_ppl"] = lambda t: lcpp.perplexity(t, block)
            notes.append(
                f"gguf measured in llama.cpp (llama-cpp-python {llama_cpp.__version__}; threads: {_threads()}; "
                "its default f16 KV cache); the original with transformers' generate"
            )
    if not measure_result:
        rep = {
            "original": {"size_bytes": weight_bytes(src)},
            "result": {"size_bytes": weight_bytes(stage)},
            "notes": notes + ["measurement skipped (--no-measure)"],
        }
    else:
        _say("measuring size, decode speed and perplexity against the original...")
        model.to(measure_on)  # the export is written: the original may move
        if kw.get("result_model") is not None:
            kw["result_model"].to(measure_on)
        with _quiet():
            rep = measure(
                model,
                src,
                stage,
                tok,
                tokens,
                decode_tokens=decode_tokens,
                notes=notes,
                block_size=meta.get("block_size"),
                **kw,
            )
    rep = {
        "command": "export",
        "to": to,
        "checkpoint": run_relative(src, out),
        "output": ".",
        "eval_data": (data or eval_file),
        **rep,
    }
    write_report(stage, rep)
    return rep


def _measure_device(spec: str, to: str) -> Any:
    """Where an export is measured: `spec` for hf; the CPU for int8/onnx/gguf, whose results only run there (the
    original is measured beside them on the same device, or the ratios would compare devices, not formats)."""
    from owngpt.device import check_spec, inference_device

    if to == "hf":
        return inference_device(spec)
    if check_spec(spec) not in ("auto", "cpu"):
        raise ConfigError(
            f"--device {spec}: a {to} export is measured on the CPU, where it runs; drop --device or use --device cpu"
        )
    import torch

    return torch.device("cpu")


def _hf_config_fixups(model: Any) -> None:
    """llama.cpp's converter (and older tools) read GPT-2's context from `n_ctx`, which transformers 5 no longer writes."""
    if getattr(model.config, "model_type", None) == "gpt2":
        model.config.n_ctx = model.config.n_positions


def export_hf(model: Any, tokenizer: Any, out: Path, meta: dict[str, Any]) -> Path:
    """A plain Hugging Face dir: safetensors weights (LoRA already merged), tokenizer with its chat template."""
    from owngpt.checkpoint import save_checkpoint

    _hf_config_fixups(model)
    return save_checkpoint(out, model, tokenizer, meta)


# ------------------------------------------------------------------------------------------------------------- onnx
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
    with atomic_dir(out) as tmp:
        _say(f"exporting to ONNX (opset {ONNX_OPSET})...")
        with _quiet(), torch.no_grad():
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


def _llama_cpp() -> Any:
    """llama-cpp-python where installed (optional: it compiles llama.cpp on install), else None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


class LlamaCppLM:
    """A GGUF export run by llama.cpp itself (through llama-cpp-python) for the report: greedy decode, perplexity."""

    def __init__(self, path: Path, n_ctx: int, llama_cpp: Any):
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=_threads(), logits_all=True, verbose=False
        )

    def decode_speed(self, prompt: Sequence[int], n_tokens: int) -> float:
        """Greedy tokens/s, prompt included (as transformers' generate is timed for the original)."""
        import numpy as np

        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(list(prompt))
        for _ in range(n_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return n_tokens / (time.perf_counter() - t)

    def perplexity(self, tokens: Any, block_size: int) -> float:
        """exp(mean NLL) in windows of `block_size` overlapping by one token, as owngpt.evaluate scores the original."""
        import numpy as np

        total, count = 0.0, 0
        for s in range(0, len(tokens) - 1, block_size):
            x = [int(t) for t in tokens[s : s + block_size]]
            y = np.asarray(tokens[s + 1 : s + 1 + block_size], dtype=np.int64)
            x = x[: len(y)]
            self.llm.reset()
            self.llm.eval(x)
            lg = np.asarray(self.llm.scores[: len(x)], dtype=np.float64)
            m = lg.max(-1, keepdims=True)
            logz = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
            total += float((logz - lg[np.arange(len(y)), y]).sum())
            count += len(y)
        return math.exp(total / max(count, 1))


# ------------------------------------------------------------------------------------------------------------- gguf
def _is_byte_level(tokenizer: Any) -> bool:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", []) or []]
    return "ByteLevel" in kinds


SPM_SPACE = "\u2581"  # llama.cpp's SentencePiece tokenizer spells a space as U+2581 ("▁") in token texts


def gguf_tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The tokenizer in one of llama.cpp's tokenizer models, in id order, padded to the vocab (llama.cpp needs a
    token per embedding row). Keys: model and pre (tokenizer.ggml.model / .pre), tokens, types, merges (or None).

    - A byte-level BPE (GPT-2's, or one owngpt trained): model `gpt2`, pre-tokenizer `gpt-2` (owngpt's BPE splits
      with GPT-2's regex), tokens and merges as they are.
    - A char-level vocabulary (a BPE model without merges, with byte fallback: owngpt's `--tokenizer char`): model
      `llama`, llama.cpp's SentencePiece tokenizer, which is the same algorithm here: each character that is a token
      stays one, any other becomes its UTF-8 bytes as the `<0xNN>` tokens (type BYTE), with no merges because no
      two characters form a token. Spaces are spelled U+2581 as that tokenizer expects, and no space is put in
      front of the text (add_space_prefix false). Writing it as a byte-level BPE instead does not work: a
      multi-byte character needs merges through partial symbols that are no token, and llama.cpp's BPE drops the
      non-ASCII bytes of such a symbol when a character is unknown (measured: 床 came out as one token, not three).
    Added tokens are CONTROL when the tokenizer marks them special (parsed from text only with parse_special, as
    the chat template's markers are), USER_DEFINED otherwise: the rule of llama.cpp's own converter.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    merges_in = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("type") != "BPE":
        raise CheckpointError(
            f"gguf export needs a BPE tokenizer (byte-level, or char-level with byte fallback); this one is "
            f"{model.get('type')!r}: use `--to hf` (then llama.cpp's convert_hf_to_gguf.py) or `--to onnx` instead"
        )
    byte_level = _is_byte_level(tokenizer)
    vocab = tokenizer.get_vocab()
    if not byte_level and (
        merges_in
        or not model.get("byte_fallback")
        or spec.get("normalizer")
        or spec.get("pre_tokenizer")
        or any(f"<0x{b:02X}>" not in vocab for b in range(256))
    ):
        raise CheckpointError(
            "gguf export writes byte-level BPE tokenizers and char-level ones (no merges, byte fallback with all 256 "
            "<0xNN> tokens, no normalizer or pre-tokenizer); this one is neither, so llama.cpp could not split text "
            "as owngpt does: use `--to hf` (then llama.cpp's convert_hf_to_gguf.py) or `--to onnx`"
        )
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    texts = [tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None for i in range(vocab_size)]
    tokens, types, seen = [], [], set()
    for i, t in enumerate(texts):
        ttype = gguf.TokenType.NORMAL
        if t is None:  # the model's embedding may be padded beyond the tokenizer
            t, ttype = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            ttype = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif not byte_level:
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                ttype = gguf.TokenType.BYTE
            elif SPM_SPACE in t:
                raise CheckpointError(
                    f"gguf export: the char vocabulary holds U+2581 ({SPM_SPACE!r}, id {i}), which llama.cpp's "
                    "tokenizer uses for a space; use `--to hf` or `--to onnx`"
                )
            else:
                t = t.replace(" ", SPM_SPACE)
        if t in seen:
            raise CheckpointError(f"gguf export: token text {t!r} (id {i}) occurs twice; llama.cpp needs unique tokens")
        seen.add(t)
        tokens.append(t)
        types.append(ttype)
    if byte_level:
        # GGUF cannot store an empty array and llama.cpp's gpt2 tokenizer requires merges: a byte-level BPE without
        # any gets one that never applies (its left side is two symbols that no merge forms)
        merges = merges_in or ["ĠĠ Ġ"]
        return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges}
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "merges": None}


def llama_cpp_rope_permute(w: Any, n_head: int) -> Any:
    """Reorder q_proj/k_proj rows for llama.cpp's LLaMA rotary embedding.

    transformers rotates the pairs (i, i + head_dim/2) of each head (rotate_half); llama.cpp's LLaMA graph rotates
    adjacent pairs (2i, 2i+1). Interleaving the two halves of each head's rows makes the second compute the first:
    the same permutation as llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TYPES = ("f32", "f16", "q8_0")  # --gguf-type choices: llama.cpp's own converter's names for the same file types


def gguf_tensor_type(gname: str, ndim: int, dtype: str) -> Any:
    """The GGML type a tensor is stored in, by the rule llama.cpp's convert_hf_to_gguf.py applies (ModelBase.
    prepare_tensors): 1-D tensors and norms stay f32 (most of llama.cpp's kernels take them only in f32), so does the
    position embedding (added to activations, not multiplied); every other matrix, token_embd and output included,
    gets the file's type (`dtype`)."""
    import gguf

    t = gguf.GGMLQuantizationType
    if ndim <= 1 or gname.endswith("_norm.weight") or gname.startswith("position_embd."):
        return t.F32
    return {"f32": t.F32, "f16": t.F16, "q8_0": t.Q8_0}[dtype]


def export_gguf(model: Any, tokenizer: Any, out: Path, dtype: str = "f16") -> Path:
    """A GGUF file for llama.cpp (GPT-2 or LLaMA architecture): tensor names mapped with gguf's own name maps.

    GPT-2's Conv1D weights are stored [in, out]; GGUF (like nn.Linear) wants [out, in], so they are transposed.
    LLaMA's q/k projections are permuted for llama.cpp's rotary layout (llama_cpp_rope_permute).
    Each tensor's type follows llama.cpp's converter (gguf_tensor_type): 1-D tensors, norms and the position table
    f32, the other matrices `dtype` (f32, f16, or q8_0: blocks of 32 weights with one f16 scale, gguf's quantizer).
    """
    import numpy as np
    import torch

    gguf = require("gguf", "export")
    cfg = model.config
    arch = getattr(cfg, "model_type", None)
    if arch not in ("gpt2", "llama"):
        raise CheckpointError(
            f"gguf export supports the GPT-2 and LLaMA architectures (this checkpoint is {cfg.model_type!r}); "
            "export with `owngpt export CKPT --out DIR --to hf` and convert DIR with llama.cpp's convert_hf_to_gguf.py"
        )
    if dtype not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {dtype}: choose one of {', '.join(GGUF_TYPES)}")
    from transformers.pytorch_utils import Conv1D

    fields = gguf_tokenizer_fields(tokenizer, cfg.vocab_size)
    n_layer = cfg.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, n_layer)
    conv = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    with atomic_dir(out) as tmp:
        f = tmp / "model.gguf"
        w = gguf.GGUFWriter(str(f), arch)
        w.add_name(Path(str(getattr(cfg, "name_or_path", "") or "owngpt")).name or "owngpt")
        w.add_block_count(n_layer)
        if arch == "llama":
            heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            rope = getattr(cfg, "rope_parameters", None) or {}
            if rope.get("rope_type", "default") != "default":
                raise CheckpointError(
                    f"gguf export: rope scaling {rope.get('rope_type')!r} is not written by owngpt; export with "
                    "--to hf and convert with llama.cpp's convert_hf_to_gguf.py"
                )
            # the trained context, not the position table: llama.cpp would otherwise read untrained positions
            w.add_context_length(getattr(model, "owngpt_context", None) or cfg.max_position_embeddings)
            w.add_embedding_length(cfg.hidden_size)
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_head_count(heads)
            w.add_head_count_kv(kv_heads)
            w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
            w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
            w.add_rope_dimension_count(head_dim)
            w.add_vocab_size(cfg.vocab_size)
        else:
            ctx = getattr(model, "owngpt_context", None) or cfg.n_positions
            w.add_context_length(ctx)
            w.add_embedding_length(cfg.n_embd)
            w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
            w.add_head_count(cfg.n_head)
            w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        ftypes = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
        w.add_file_type(getattr(gguf.LlamaFileType, ftypes[dtype]))
        w.add_tokenizer_model(fields["model"])
        w.add_tokenizer_pre(fields["pre"])
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        if fields["merges"] is not None:
            w.add_token_merges(fields["merges"])
        else:  # SentencePiece: no merges (scores rank them; none apply), no space put in front of the text
            w.add_token_scores([0.0] * len(fields["tokens"]))
            w.add_add_space_prefix(False)
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        if bos is not None:
            w.add_bos_token_id(bos)
        if eos is not None:
            w.add_eos_token_id(eos)
        if tokenizer.pad_token_id is not None:
            w.add_pad_token_id(tokenizer.pad_token_id)
        w.add_add_bos_token(False)  # owngpt's models are trained without a BOS token in front
        if getattr(tokenizer, "chat_template", None):
            w.add_chat_template(tokenizer.chat_template)
        for name, t in model.state_dict().items():
            if tied and name == "lm_head.weight":
                if arch == "gpt2":
                    # llama.cpp's GPT-2 graph requires `output.weight` ("missing tensor 'output.weight'") and its
                    # own converter writes the tied embedding again under that name; LLaMA reuses token_embd.
                    name = "lm_head.weight"
                    gname = "output.weight"
                else:
                    continue  # llama.cpp's LLaMA reuses token_embd when output.weight is absent (tied embeddings)
            else:
                gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise CheckpointError(f"gguf export: no llama.cpp name for tensor {name}")
            t = t.detach().to(torch.float32)
            if gname == "position_embd.weight":
                # llama.cpp requires exactly context_length rows (`position_embd.weight has wrong shape`): the
                # trained ones; the rows past the trained context were never trained
                t = t[:ctx]
            if name in conv:
                t = t.t()
            elif arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                t = llama_cpp_rope_permute(t, heads if ".q_proj." in name else kv_heads)
            a = np.ascontiguousarray(t.numpy())
            qtype = gguf_tensor_type(gname, a.ndim, dtype)
            try:
                data = gguf.quants.quantize(a, qtype)
            except gguf.QuantError:
                # q8_0 needs rows that are a multiple of 32; llama.cpp's converter falls back to f16 the same way
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(a, qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tokenizer.save_pretrained(tmp)  # for reference: the same tokenizer owngpt uses
    return out / "model.gguf"
