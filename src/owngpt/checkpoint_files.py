"""The files of a checkpoint directory: reading and checking them, and writing owngpt.json.

A checkpoint is a Hugging Face model directory that `transformers` loads with no owngpt installed:

    CKPT/
      config.json  model.safetensors  generation_config.json
      tokenizer.json  tokenizer_config.json  [chat_template.jinja]     (the tokenizer, with the chat template)
      owngpt.json      what owngpt knows besides: task, how it was made (preset or source model), step, labels
      [adapter/adapter_config.json adapter/adapter_model.safetensors]  (LoRA runs: the adapter on its own, in a
                                                                       subdir: beside config.json transformers
                                                                       would apply it again on the merged weights)

This module is the bottom of the checkpoint layer (it imports only owngpt.errors and owngpt.atomic), so that
owngpt.hub and owngpt.models can check what they find; owngpt.checkpoint, above them, opens a checkpoint from any
spec (`open_checkpoint`) and loads and saves models. Everything here is importable from owngpt.checkpoint too.

Every load is checked first (`check_dir`), so a damaged or mismatched directory is one CheckpointError naming the
file and the fix, for every command: config.json's sizes must be positive integers; the safetensors headers must
parse (a truncated or random file is refused); the weights must hold every parameter the config asks for, in the
config's shapes, before anything is allocated (a config with 10000 layers over 4 layers of weights is refused in
milliseconds, not after minutes of allocating); and after loading, transformers' own report of missing or
unexpected weights must be empty (a new task head is the one allowed exception, when fine-tuning into a new task).

The trained context (`trained_context`): how many tokens a checkpoint was trained to read, the one rule every
loader, evaluator and exporter uses (see the function).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from owngpt import atomic
from owngpt.errors import CheckpointError

OWNGPT_META = "owngpt.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# config.json fields that size a model: each must be a positive integer when present (a negative or zero layer
# count builds a model with no blocks that still "evaluates"; a string or float breaks deep inside transformers).
SIZE_FIELDS = (
    "n_layer",
    "num_hidden_layers",
    "n_head",
    "num_attention_heads",
    "num_key_value_heads",
    "n_embd",
    "hidden_size",
    "n_inner",
    "intermediate_size",
    "vocab_size",
    "n_positions",
    "max_position_embeddings",
    "num_labels",
)
# The index of a transformer block in a weight name: GPT-2 `transformer.h.3.`, Llama `model.layers.3.`.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any((p / w).exists() for w in WEIGHT_FILES)


TASKS = ("lm", "chat", "mmi", "classify")  # what `owngpt train --task` writes into owngpt.json (config.py's choices)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """owngpt.json of a checkpoint ({} for a plain Hugging Face directory)."""
    f = Path(path) / OWNGPT_META
    if not f.exists():
        return {}
    meta = _read_json(f, "the checkpoint may be corrupt: restore it from a copy, or save it again")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} holds a JSON {type(meta).__name__}, not an object; restore it from a copy")
    task = meta.get("task")
    if task is not None and task not in TASKS:  # an unknown task was read as "lm" and silently used as one
        raise CheckpointError(
            f"{f}: task {task!r} is not one owngpt knows ({', '.join(TASKS)}); restore owngpt.json from a copy"
        )
    return meta


def _read_json(f: Path, fix: str) -> Any:
    """JSON from a checkpoint file; damaged, undecodable or absurdly nested JSON is a CheckpointError."""
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except RecursionError:  # json.loads recurses once per nesting level: 100,000 '[' exhaust the stack
        raise CheckpointError(f"{f} is nested too deeply to be a real config; {fix}") from None
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{f} is not valid JSON ({e}); {fix}") from None


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """config.json as a dict, with its size fields checked (positive integers); CheckpointError otherwise."""
    f = Path(path) / "config.json"
    fix = "restore config.json from the run or download that made the weights"
    cfg = _read_json(f, fix)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f} holds a JSON {type(cfg).__name__}, not an object; {fix}")
    for key in SIZE_FIELDS:
        v = cfg.get(key)
        if v is None:  # absent, or null where the architecture derives it (GPT-2's n_inner)
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"{f}: {key} = {json.dumps(v)} is not a positive integer; {fix}")
    return cfg


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def weights_name(path: str | os.PathLike) -> str:
    """The file that lists a checkpoint's weights: model.safetensors, or the index of a sharded one."""
    p = Path(path)
    return "model.safetensors.index.json" if (p / "model.safetensors.index.json").is_file() else "model.safetensors"


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{weight name: shape} from the safetensors headers of a checkpoint (nothing is read into memory).

    A truncated, random or otherwise damaged file is a CheckpointError naming it: safetensors checks that the header
    parses and that its offsets cover the file exactly. {} when the dir has no full model weights (an adapter dir).
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    files: list[Path] = []
    if (p / "model.safetensors").is_file():
        files = [p / "model.safetensors"]
    elif (p / "model.safetensors.index.json").is_file():
        index = _read_json(p / "model.safetensors.index.json", "download or save the checkpoint again")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{p / 'model.safetensors.index.json'} has no weight_map; save the checkpoint again")
        files = [p / str(name) for name in sorted(set(weight_map.values()))]
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in the index): the checkpoint is incomplete; copy it again")
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{f} is damaged or not a safetensors file ({e}): the copy is truncated or corrupt; copy or "
                "download the checkpoint again, or use the run's other checkpoint (checkpoints/last or best)"
            ) from None
    return shapes


def check_weights(path: str | os.PathLike, config: Any, task: str = "lm", new_head: bool = False) -> None:
    """Refuse weights that do not fit `config` before any of them is allocated.

    Compares the safetensors headers with the parameters a model built from `config` on the meta device (no
    memory) would have: every parameter must be there in the config's shape. `task`: lm, chat, mmi (a causal LM),
    classify (a sequence classifier) or base (the model body alone, any head). `new_head`: the task head (the
    classifier `score`) may be absent or of another shape, because fine-tuning into a new task initialises it.
    Unexpected extra weights are caught after loading, from transformers' own loading report (it knows which
    buffers old files carry and may be ignored).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    p = Path(path)
    shapes = weight_shapes(p)
    if not shapes:
        return
    fix = "the config.json and the weights come from different models; put back the matching config.json"
    wfile, cfile = p / weights_name(p), p / "config.json"
    n_layer = getattr(config, "num_hidden_layers", None)
    layers = {int(m.group(1)) for k in shapes for m in [_LAYER_INDEX.search(k)] if m}
    # Checked first because it is cheap: building a 10000-layer model even on the meta device takes seconds.
    if layers and isinstance(n_layer, int) and n_layer != max(layers) + 1:
        raise CheckpointError(
            f"{cfile} asks for {_n(n_layer, 'transformer block')} (n_layer / num_hidden_layers) but {wfile} "
            f"holds {max(layers) + 1}; {fix}"
        )
    base = task == "base"
    cls = AutoModel if base else AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = cls.from_config(config, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{cfile} describes no model transformers can build ({e}); {fix}") from None
    prefix = getattr(model, "base_model_prefix", "") + "."

    def strip(name: str) -> str:
        return name[len(prefix) :] if prefix != "." and name.startswith(prefix) else name

    have = {strip(k): v for k, v in shapes.items()}
    missing, wrong = [], []
    for name, param in model.named_parameters():  # tied weights (lm_head = wte) appear once
        key = strip(name)
        is_head = not base and not name.startswith(prefix)
        # A pooler is absent from masked-LM checkpoints (BERT, RoBERTa) and made fresh when one is fine-tuned
        # into a classifier, which is the usual way to start one: transformers initialises it, as it does a head.
        fresh_ok = (new_head or base) and key.startswith("pooler.")
        if key not in have:
            if not (new_head and is_head) and not fresh_ok:
                missing.append(key)
        elif tuple(param.shape) != have[key] and not (new_head and is_head):
            wrong.append(f"{key} {list(have[key])} where the config needs {list(param.shape)}")
    # weights no parameter or buffer takes (tied aliases count; so do buffers that are no longer saved, such as
    # BERT's position_ids, and the keys transformers lists as ignorable in old files)
    known = {strip(k) for k in model.state_dict()} | {strip(k) for k, _ in model.named_buffers()}
    ignorable = [re.compile(r) for r in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    extra = [
        strip(k)
        for k in shapes
        if strip(k) not in known
        and not any(r.search(k) for r in ignorable)
        and not ((base or new_head) and prefix != "." and not k.startswith(prefix))  # another task's head
    ]
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise CheckpointError(
            f"{wfile} holds {_n(len(extra), 'weight')} that {cfile} has no place for ({shown}); {fix}"
        )
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{wfile} lacks {_n(len(missing), 'weight')} that {cfile} needs ({shown}); {fix}")
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise CheckpointError(f"{wfile} and {cfile} disagree on shapes: {shown}; {fix}")


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
    # Cheap checks every loader gets before it reads anything else (a tokenizer load reads config.json too):
    # config sizes, owngpt.json, and safetensors headers that parse and cover their files exactly.
    read_config_dict(p)
    read_meta(p)
    if (p / "generation_config.json").is_file():  # damaged, transformers ignored it: other end-of-text ids, silently
        _read_json(p / "generation_config.json", "restore it from the run or download that made the weights")
    if weight_shapes(p) and not read_meta(p).get("quantization"):
        # the model body against config.json, whatever task head it has (the head is checked when loading)
        check_weights(p, _auto_config(p), task="base")
    return p


def _auto_config(p: Path, **kwargs):
    from transformers import AutoConfig

    try:  # transformers 5 validates field types through huggingface_hub's strict dataclasses (a plain Exception)
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - an older huggingface_hub
        StrictDataclassError = ValueError  # noqa: N806
    try:
        return AutoConfig.from_pretrained(p, trust_remote_code=False, **kwargs)
    except (ValueError, OSError, KeyError, TypeError, StrictDataclassError) as e:
        # one line: the strict validator's message spans several
        raise CheckpointError(
            f"{p}/config.json cannot be read by transformers: {' '.join(str(e).split())}; restore config.json "
            "from the run or download that made the weights"
        ) from e


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """A peft (LoRA) adapter dir that peft may load: weights in adapter_model.safetensors, never a pickle.

    peft falls back to `torch.load` on adapter_model.bin when no safetensors file is there; a pickle can run code.
    """
    p = Path(path)
    st = p / "adapter_model.safetensors"
    if not st.is_file():
        pickled = [f.name for f in p.glob("adapter_model.*") if f.suffix in (".bin", ".pt", ".pth")]
        if pickled:
            raise CheckpointError(
                f"{p / pickled[0]} is a pickled adapter; owngpt loads safetensors only because a pickle can run "
                "code. Convert once in a trusted environment: PeftModel.from_pretrained(base, dir)"
                ".save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(
            f"{p} has adapter_config.json but no adapter_model.safetensors: the adapter is incomplete"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(st), framework="pt") as handle:
            list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{st} is damaged or not a safetensors file ({e}): copy the adapter again") from None
    _read_json(p / "adapter_config.json", "restore adapter_config.json from the run that made the adapter")
    return p


def load_config(path: str | os.PathLike):
    from transformers import AutoConfig

    p = check_dir(path)
    read_config_dict(p)
    try:
        return AutoConfig.from_pretrained(p, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{p}/config.json cannot be read by transformers: {e}") from e


def write_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write owngpt.json into `directory` (aside, then renamed): the one writer of that file.

    `meta["task"]`, when given, must be one owngpt knows (read_meta refuses anything else, so a checkpoint is never
    written that owngpt could not open again). Returns the file's path.
    """
    task = meta.get("task")
    if task is not None and task not in TASKS:
        raise ValueError(f"owngpt.json: task {task!r} is not one of {', '.join(TASKS)}")
    return atomic.write_json(Path(directory) / OWNGPT_META, meta)


# ------------------------------------------------------------------------------------------------ trained context
# The window a checkpoint that says nothing about it is read in: no owngpt.json `trained_context` or preset
# `block_size`, and a config.json that names no position table (a rotary model without max_position_embeddings).
DEFAULT_CONTEXT = 2048
_POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def position_table(config: Any) -> int | None:
    """Positions the model's architecture has room for (not what it was trained on); None when the config names
    none. `config`: a transformers config, or config.json as a dict."""
    for name in _POSITION_FIELDS:
        v = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def trained_context(meta: dict[str, Any], config: Any) -> int:
    """The longest window the checkpoint was trained to read: what every loader lets the model see at once.

    owngpt.json `trained_context` (written by `owngpt train`: the longest block this model or the checkpoint it
    started from was trained on); for older owngpt checkpoints trained from a preset, their `block_size`; for a
    Hugging Face directory (pretrained by someone else), its position table. Never more than the position table.
    The one fallback: DEFAULT_CONTEXT (2048) when none of these says anything.
    """
    table = position_table(config)
    ctx = meta.get("trained_context")
    if not (isinstance(ctx, int) and ctx > 0):
        block = meta.get("block_size")
        from_preset = (meta.get("source") or {}).get("kind") == "preset"
        ctx = block if from_preset and isinstance(block, int) and block > 0 else None
    if ctx is None:
        return table or DEFAULT_CONTEXT
    return min(ctx, table) if table else ctx


def context_length(model: Any) -> int:
    """Tokens a loaded model reads at once: the trained context its loader set (`owngpt_context`, see
    Checkpoint.model), else its position table, else DEFAULT_CONTEXT."""
    ctx = getattr(model, "owngpt_context", None)
    if isinstance(ctx, int) and ctx > 0:
        return ctx
    return position_table(model.config) or DEFAULT_CONTEXT


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
