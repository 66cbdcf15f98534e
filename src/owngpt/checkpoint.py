"""The checkpoint directory: the one format every command writes and reads.

A checkpoint is a Hugging Face model directory that `transformers` loads with no owngpt installed:

    CKPT/
      config.json  model.safetensors  generation_config.json
      tokenizer.json  tokenizer_config.json  [chat_template.jinja]     (the tokenizer, with the chat template)
      owngpt.json      what owngpt knows besides: task, how it was made (preset or source model), step, labels
      [adapter/adapter_config.json adapter/adapter_model.safetensors]  (LoRA runs: the adapter on its own, in a
                                                                       subdir: beside config.json transformers
                                                                       would apply it again on the merged weights)

Security: weights load from safetensors only (`use_safetensors=True`), never with `trust_remote_code`.
Saving writes into a sibling temporary dir and renames it into place, so a kill during a save never leaves a
corrupt or missing checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from owngpt.errors import CheckpointError

OWNGPT_META = "owngpt.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any((p / w).exists() for w in WEIGHT_FILES)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """owngpt.json of a checkpoint ({} for a plain Hugging Face directory)."""
    f = Path(path) / OWNGPT_META
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint may be corrupt") from e


def check_dir(path: str | os.PathLike) -> Path:
    """Raise a clear CheckpointError unless `path` is a loadable model directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p}: no such checkpoint directory (pass a dir with config.json and *.safetensors, "
            "e.g. RUN_DIR/checkpoints/last)"
        )
    if p.is_dir() and not (p / "config.json").exists():
        for sub in ("checkpoints/last", "last", "checkpoints/best", "best"):
            if is_checkpoint(p / sub):
                raise CheckpointError(f"{p} is a run dir, not a checkpoint: pass {p / sub}")
        raise CheckpointError(f"{p} has no config.json: it is not a Hugging Face model directory")
    if not any((p / w).exists() for w in WEIGHT_FILES):
        pickled = (
            [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")] + [f.name for f in p.glob("*.pth")]
        )
        if pickled:
            raise CheckpointError(
                f"{p} has only pickled weights ({', '.join(pickled)}); owngpt loads safetensors only because a "
                "pickle can run code. Convert once in a trusted environment: "
                "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{p} has config.json but no model.safetensors: the checkpoint is incomplete")
    return p


def load_config(path: str | os.PathLike):
    from transformers import AutoConfig

    p = check_dir(path)
    try:
        return AutoConfig.from_pretrained(p, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{p}/config.json cannot be read by transformers: {e}") from e


def load_model(path: str | os.PathLike, task: str = "lm", dtype=None, **kwargs):
    """Load weights (safetensors only) as a causal LM (`lm`, `chat`, `mmi`) or a sequence classifier."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    p = check_dir(path)
    quant = read_meta(p).get("quantization")
    if quant:  # an `owngpt export --to int8` dir: int8 weights + scales, rebuilt by owngpt.quantize
        from owngpt.quantize import load_quantized

        return load_quantized(p, quant, task=task)
    cls = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(
            p, use_safetensors=True, trust_remote_code=False, dtype=dtype or torch.float32, **kwargs
        )
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{p}: transformers could not load it as a {cls.__name__}: {e}") from e
    return model


def save_checkpoint(
    out_dir: str | os.PathLike,
    model,
    tokenizer=None,
    meta: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save a Hugging Face directory atomically: write aside, then rename over any previous one."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # Small files first and the weights last: the window between the first weights file appearing and the
        # rename that publishes the checkpoint stays as short as it can be.
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta is not None:
            (tmp / OWNGPT_META).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        for name, data in (extra_files or {}).items():  # names may hold a subdir: "trainer/state.json"
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        model.save_pretrained(tmp, safe_serialization=True)
        _fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not save the checkpoint to {out}: {e.strerror or e} (is the disk full or the "
            "directory read-only?); the previous checkpoint is untouched"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fsync_dir(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def run_relative(path: str | os.PathLike | None, run_dir: str | os.PathLike, max_up: int = 2) -> str | None:
    """A path as a checkpoint or export may record it: relative to `run_dir`, or None.

    Checkpoints are shared: an absolute path would tell whoever receives one the user's folders ("/home/zhang/...").
    A path relative to the run still says how the run's parts relate ("../../data/chat"); one that climbs more than
    `max_up` levels (a home directory, a Hub cache) is not recorded at all.
    """
    if path is None or str(path) == "":
        return None
    try:
        rel = os.path.relpath(Path(path).absolute(), Path(run_dir).absolute())
    except ValueError:  # another drive on Windows
        return None
    parts = Path(rel).parts
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    return None if ups > max_up else Path(rel).as_posix()
