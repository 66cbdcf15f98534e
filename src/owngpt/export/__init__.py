"""`owngpt export`: turn a checkpoint into something to deploy (hf, int8, onnx, gguf) and measure what it costs.

Every export writes its output aside and renames it into place, then measures the result against the original on
the same tokens and writes `report.json` next to it (also printed): size on disk (weight files), decode tokens/s
(greedy, batch 1, the same prompt and length for both) and perplexity on a validation set (`--data` val split or
`--eval-file`). The measurement is owngpt.measure's, shared with `owngpt prune` and bench/bench_optimize.py.

Targets (this module is the dispatcher, `export(...)`, and writes hf itself):
  - hf:   a plain Hugging Face dir (LoRA merged, safetensors, tokenizer + chat template) that transformers loads alone.
  - int8: owngpt.quantize's format; loads through owngpt.checkpoint.load_model (generate, chat, serve).
  - onnx: owngpt.export.onnx: `model.onnx` with a KV cache, checked against PyTorch at export.
  - gguf: owngpt.export.gguf: GPT-2 and LLaMA architectures, llama.cpp's tensor names and metadata.

The measurement harness the report uses (`load_fp32`, `measure`, `context_length`) is owngpt.measure, shared with
owngpt.prune and bench/bench_optimize.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from owngpt.checkpoint import load_model, run_relative, save_checkpoint
from owngpt.console import quiet, say
from owngpt.device import check_spec, inference_device
from owngpt.errors import ConfigError
from owngpt.export.gguf import LlamaCppLM, export_gguf, find_llama_cpp
from owngpt.export.onnx import ONNX_TOLERANCE, OnnxLM, export_onnx
from owngpt.measure import (
    context_length,
    decode_prompt,
    eval_tokens,
    load_fp32,
    measure,
    output_inputs,
    threads,
    weight_bytes,
    write_report,
)
from owngpt.outdir import CHECKPOINT, check_out, replacing
from owngpt.quantize import save_quantized

__all__ = ["TARGETS", "export", "export_hf"]

TARGETS = ("hf", "int8", "onnx", "gguf")


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
            kw["result_model"] = load_model(stage).eval()
    elif to == "int8":
        save_quantized(model, tok, stage, new_meta)
        if measure_result:
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
            prompt = decode_prompt(tokens, tok)
            n = max(1, min(decode_tokens, context_length(model.config) - len(prompt)))
            kw["result_decode"] = lambda: onx.decode_speed(prompt, n)
            kw["result_ppl"] = lambda t: onx.perplexity(
                t, min(meta.get("block_size") or 256, context_length(model.config))
            )
    else:
        export_gguf(model, tok, stage, dtype=gguf_type)
        llama_cpp = find_llama_cpp() if measure_result else None
        if llama_cpp is None:
            notes.append(
                "gguf: decode speed and perplexity are llama.cpp's to measure (llama-bench, llama-perplexity); "
                "only the size is reported here (with llama-cpp-python installed, the report measures them)"
            )
        else:
            ctx = model.owngpt_context  # llama.cpp runs the trained context the file states (GPT-2: no more rows)
            lcpp = LlamaCppLM(stage / "model.gguf", ctx, llama_cpp)
            prompt = decode_prompt(tokens, tok)[: ctx - 1]
            n = max(1, min(decode_tokens, ctx - len(prompt)))
            kw["result_decode"] = lambda: lcpp.decode_speed(prompt, n)
            block = min(meta.get("block_size") or 256, context_length(model.config))
            if block <= ctx:
                kw["result_ppl"] = lambda t: lcpp.perplexity(t, block)
            notes.append(
                f"gguf measured in llama.cpp (llama-cpp-python {llama_cpp.__version__}; threads: {threads()}; "
                "its default f16 KV cache); the original with transformers' generate"
            )
    if not measure_result:
        rep = {
            "original": {"size_bytes": weight_bytes(src)},
            "result": {"size_bytes": weight_bytes(stage)},
            "notes": notes + ["measurement skipped (--no-measure)"],
        }
    else:
        say("measuring size, decode speed and perplexity against the original...")
        model.to(measure_on)  # the export is written: the original may move
        if kw.get("result_model") is not None:
            kw["result_model"].to(measure_on)
        with quiet():
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

    _hf_config_fixups(model)
    return save_checkpoint(out, model, tokenizer, meta)
