"""What `owngpt export` and `owngpt prune` share: the checkpoint they start from, the inputs their `--out` must not
touch, the validation tokens, and the measurement of a result against its original (bench/bench_optimize.py uses it
too).

The report (`report.json` next to the result, also printed) compares the two on the same tokens: size on disk (weight
files), decode tokens/s (greedy, batch 1, the same prompt and length for both, runs interleaved) and perplexity on a
validation set (`--data` val split or `--eval-file`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from owngpt.checkpoint import DEFAULT_CONTEXT, check_adapter_dir, open_checkpoint, position_table
from owngpt.data.datadir import META, open_data_dir, write_json
from owngpt.errors import CheckpointError, ConfigError, DataError
from owngpt.evaluate import check_same_tokenizer, lm_stream_loss
from owngpt.tokenizer import load_tokenizer

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".gguf")
REPORT = "report.json"


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

    c = open_checkpoint(ckpt)
    path, meta = c.path, c.meta
    if c.quantization:
        raise CheckpointError(
            f"{path} is already quantized ({c.quantization.get('method')}); export or prune "
            "the fp32 checkpoint it came from"
        )
    if (path / "adapter_config.json").is_file():
        # a peft adapter: merged onto its base here, also when a config.json sits beside it (transformers would
        # otherwise apply the adapter itself, unmerged)
        from peft import PeftModel

        check_adapter_dir(path)  # peft would torch.load an adapter_model.bin: refused here
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base_spec = cfg.get("base_model_name_or_path")
        if not base_spec:
            raise CheckpointError(f"{path}/adapter_config.json has no base_model_name_or_path: cannot merge the LoRA")
        base = open_checkpoint(base_spec)
        model = PeftModel.from_pretrained(base.model(c.task), str(path)).merge_and_unload()
        # the tokenizer as saved (Checkpoint.tokenizer() would add a pad token, which the export would then carry)
        tokenizer = load_tokenizer(path if (path / "tokenizer_config.json").exists() else base.path)
    else:
        model = c.model(int8=False)
        tokenizer = load_tokenizer(path)
    model.eval()
    model.owngpt_context = c.trained_context  # the context it was trained for (GGUF states it)
    return model, tokenizer, meta, path


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


def eval_tokens(
    tokenizer: Any, data: str | None, eval_file: str | None, max_tokens: int, ckpt: Path | None = None
) -> tuple[Any, str] | None:
    """Validation tokens for perplexity: DATA_DIR's val split or a text file tokenized by the checkpoint's tokenizer."""
    import numpy as np

    if data and eval_file:
        raise ConfigError("pass --data or --eval-file, not both")
    if data:
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
    """Positions the architecture has room for (owngpt.checkpoint's rule and fallback): the longest window measured."""
    return position_table(config) or DEFAULT_CONTEXT


def perplexity(model: Any, tokens: Any, block_size: int = 256) -> float:
    """exp(mean NLL) over `tokens` in windows of `block_size` (owngpt.evaluate's loop, so `owngpt eval` agrees)."""

    total, count = lm_stream_loss(
        model, tokens, min(block_size, context_length(model.config)), batch_size=4, progress=False
    )
    return math.exp(total / max(count, 1))


def decode_prompt(tokens: Any, tokenizer: Any) -> list[int]:
    """The prompt decode speed is timed with: the first 16 validation tokens, else the EOS token alone."""
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
    prompt = decode_prompt(tokens, tokenizer)
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
            "threads": threads(),
        },
        "eval_tokens": None if tokens is None else int(len(tokens)),
        "eval_window": block,
        "notes": list(notes) + ([] if tokens is not None else ["no --data/--eval-file given: perplexity not measured"]),
    }


def threads() -> int:
    """torch's thread count, stated in the report (decode speed depends on it)."""
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

    write_json(out_dir / REPORT, rep)
