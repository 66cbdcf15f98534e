"""The checkpoint: one object (`Checkpoint`) for every command that opens one, and saving one atomically.

    ckpt = open_checkpoint("runs/x/checkpoints/last")   # a dir, a Hub id, a peft adapter dir, an int8 export
    ckpt.task, ckpt.labels, ckpt.trained_context        # what owngpt.json and config.json say, read once
    tok = ckpt.tokenizer()                              # with a pad token (batches are padded)
    model = ckpt.model(device="cpu")                    # safetensors only; int8 exports rebuilt; adapters merged

`Checkpoint` is the sibling of owngpt.data.datadir.DataDir: one reader of the format, so the rules hold for every
command (generate, chat, serve, eval, predict, export, prune, estimate, explain). The files themselves (checks,
owngpt.json, the trained-context rule) are owngpt.checkpoint_files', re-exported here.

Security: weights load from safetensors only (`use_safetensors=True`), never with `trust_remote_code`; a peft
adapter is loaded only from adapter_model.safetensors. Saving (`save_checkpoint`) builds the directory aside and
swaps it in (owngpt.atomic.directory), so a kill during a save never leaves a corrupt or missing checkpoint.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt import atomic
from owngpt.checkpoint_files import (  # noqa: F401  (the checkpoint format's API, importable from here)
    DEFAULT_CONTEXT,
    OWNGPT_META,
    SIZE_FIELDS,
    TASKS,
    WEIGHT_FILES,
    _auto_config,
    _read_json,
    check_adapter_dir,
    check_dir,
    check_weights,
    context_length,
    is_checkpoint,
    load_config,
    position_table,
    read_config_dict,
    read_meta,
    run_relative,
    trained_context,
    weight_shapes,
    weights_name,
    write_meta,
)
from owngpt.errors import CheckpointError
from owngpt.models import resolve_checkpoint
from owngpt.quantize import load_quantized, quantize_model
from owngpt.tokenizer import load_tokenizer

CAUSAL_TASKS = ("lm", "chat", "mmi")  # tasks whose model is a causal LM (transformers' *ForCausalLM)


@dataclass(eq=False)
class Checkpoint:
    """An opened checkpoint: its path, owngpt.json (`meta`, {} for a plain Hugging Face dir) and what follows from
    them. Made by `open_checkpoint`; config.json is read once, when first needed, and kept."""

    path: Path
    meta: dict[str, Any]
    adapter: dict[str, Any] | None = None  # adapter_config.json of a peft adapter dir (it has no config.json)
    _config: Any = field(default=None, repr=False)
    _base_ckpt: Checkpoint | None = field(default=None, repr=False)

    # --- what the files say ---------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """config.json as transformers reads it (a PretrainedConfig), read once. A copy goes to each model."""
        if self._config is None:
            self._config = self._base().config if self.adapter is not None else _auto_config(self.path)
        return self._config

    @property
    def task(self) -> str:
        """What the checkpoint does: lm, chat, mmi or classify. The one rule: owngpt.json's `task`; for a directory
        owngpt did not train (no task recorded), `classify` when config.json's architectures are a sequence
        classifier (`...ForSequenceClassification`), else `lm`."""
        task = self.meta.get("task")
        if task:
            return task
        if self.adapter is None:
            archs = getattr(self.config, "architectures", None) or []
            if any("SequenceClassification" in a for a in archs):
                return "classify"
        return "lm"

    @property
    def quantization(self) -> dict[str, Any] | None:
        """owngpt.json `quantization` of an `owngpt export --to int8` dir (method, scales...), else None."""
        return self.meta.get("quantization") or None

    @property
    def labels(self) -> list[str]:
        """A classifier's label names in id order (config.json id2label); [] for other tasks."""
        if self.task != "classify":
            return []
        cfg = self.config
        return [str(cfg.id2label.get(i, f"LABEL_{i}")) for i in range(cfg.num_labels)]

    @property
    def trained_context(self) -> int:
        """How many tokens the model was trained to read (owngpt.checkpoint_files.trained_context: the one rule)."""
        return trained_context(self.meta, self.config)

    def context(self, block_size: int | None = None) -> int:
        """The window to read text in: `block_size` when given, else the trained context; never more than the
        position table (evaluation's windows)."""
        table = position_table(self.config)
        ctx = block_size or self.trained_context
        return min(ctx, table) if table else ctx

    # --- loading ----------------------------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (an adapter dir without one: its base's), with a pad token.

        The one place that gives a tokenizer without a pad token (GPT-2's) one: the end-of-text token, as training
        did (owngpt.tasks.classify). Batches are padded, left for generation and right for classification; the pad
        positions are masked out, so any id works, and the vocabulary does not change.
        """

        where = self.path
        if self.adapter is not None and not (self.path / "tokenizer_config.json").exists():
            where = self._base().path
        tok = load_tokenizer(where)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def model(
        self,
        task: str | None = None,
        *,
        dtype: Any = None,
        device: Any = None,
        int8: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """The weights as a transformers model: a causal LM (lm, chat, mmi) or a sequence classifier (classify).

        `task`: how to load it (default: the checkpoint's task; an lm checkpoint loaded as `classify` gets a new
        head, for fine-tuning). `dtype`: default float32. `device`: moved there (default: where it was loaded, the
        CPU). `int8`: None loads what is stored (an int8 export as int8); True quantizes an fp32 checkpoint in
        memory (owngpt.quantize); False refuses an int8 export (exporting or pruning needs the fp32 weights).
        Other keyword arguments go to `from_pretrained` (config fields such as num_labels go into the config).
        The model carries `owngpt_context`, the trained context, which every decoder reads (context_length).
        """
        task = task or self.task
        quant = self.quantization
        if quant:  # an `owngpt export --to int8` dir: int8 weights + scales, rebuilt by owngpt.quantize
            if int8 is False:
                raise CheckpointError(
                    f"{self.path} is already quantized ({quant.get('method')}); export or prune the fp32 "
                    "checkpoint it came from"
                )

            model = load_quantized(self.path, quant, task=task, config=copy.deepcopy(self.config))
        elif self.adapter is not None:
            model = self._merged_adapter(task)
        else:
            config = kwargs.pop("config", None)
            if config is None and kwargs:  # config fields among kwargs (num_labels, id2label...) go into the config
                config, kwargs = _auto_config(self.path, return_unused_kwargs=True, **kwargs)
            elif config is None:
                config = self.config  # from_pretrained gives the model its own copy
            model = _load_weights(self.path, config, task, self.meta.get("task"), dtype, kwargs)
        if int8 and not quant:
            model = quantize_model(model)
        model.owngpt_context = self.trained_context
        if device is not None:
            model = model.to(device)
        return model

    def _base(self) -> Checkpoint:
        """The checkpoint a peft adapter dir was trained on (adapter_config.json base_model_name_or_path)."""
        if self._base_ckpt is None:
            base = (self.adapter or {}).get("base_model_name_or_path")
            if not base:
                raise CheckpointError(
                    f"{self.path}/adapter_config.json has no base_model_name_or_path: cannot merge the LoRA"
                )
            self._base_ckpt = open_checkpoint(base)
        return self._base_ckpt

    def _merged_adapter(self, task: str) -> Any:
        from peft import PeftModel

        base = self._base().model(task)
        return PeftModel.from_pretrained(base, str(self.path)).merge_and_unload()


def open_checkpoint(spec: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint: a local dir (checked: owngpt.checkpoint_files.check_dir), a Hub id (cached, or fetched
    once: owngpt.models.resolve_checkpoint), or a peft adapter dir (adapter_config.json, no config.json; merged
    onto its base when loaded). Errors are CheckpointErrors that name the file and the fix, e.g. a run dir is
    answered with its checkpoints/last."""
    given = Path(spec)
    if (given / "adapter_config.json").is_file() and not (given / "config.json").is_file():
        meta = read_meta(given)
        check_adapter_dir(given)  # peft would torch.load an adapter_model.bin: refused here
        return Checkpoint(given, meta, adapter=_read_json(given / "adapter_config.json", "save the adapter again"))

    path = resolve_checkpoint(str(spec))
    return Checkpoint(path, read_meta(path))


def load_model(path: str | os.PathLike, task: str = "lm", dtype: Any = None, **kwargs: Any) -> Any:
    """Load weights (safetensors only) as a causal LM (`lm`, `chat`, `mmi`) or a sequence classifier: a checked
    local dir's `Checkpoint.model`."""
    p = check_dir(path)
    return Checkpoint(p, read_meta(p)).model(task, dtype=dtype, **kwargs)


def _load_weights(p: Path, config: Any, task: str, stored_task: str | None, dtype: Any, kwargs: dict[str, Any]):
    """from_pretrained, with the checks: weights against `config` before, transformers' loading report after."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    # A new classification head is expected when a checkpoint owngpt did not train as a classifier (an lm, a
    # Hugging Face dir) is fine-tuned into one.
    new_head = bool(kwargs.get("ignore_mismatched_sizes")) or (task == "classify" and stored_task != "classify")
    check_weights(p, config, task, new_head=new_head)
    if (p / "adapter_config.json").is_file():  # transformers would apply it through peft, which may torch.load
        check_adapter_dir(p)
    try:
        model, info = cls.from_pretrained(
            p,
            config=config,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=dtype or torch.float32,
            output_loading_info=True,
            **kwargs,
        )
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{p}: transformers could not load it as a {cls.__name__}: {e}") from e
    body = model.base_model_prefix + "."
    # With a new head, the old task's head (lm_head, cls.predictions...) is left out and the new one (and a pooler
    # that masked-LM checkpoints lack) is initialised: what transformers reports for that is expected.
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not (new_head and not k.startswith(body)))
    missing = sorted(
        k
        for k in info.get("missing_keys", ())
        if not (new_head and (not k.startswith(body) or k.startswith(body + "pooler.")))
    )
    if unexpected or missing:
        what = "unexpected weights " + ", ".join(unexpected[:3]) if unexpected else ""
        what += ("; " if what else "") + ("missing weights " + ", ".join(missing[:3]) if missing else "")
        raise CheckpointError(
            f"{p / weights_name(p)} does not match {p / 'config.json'} ({what}); the config.json and the weights "
            "come from different models: put back the matching config.json"
        )
    return model


def save_checkpoint(
    out_dir: str | os.PathLike,
    model: Any,
    tokenizer: Any = None,
    meta: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save a Hugging Face directory atomically: write aside, then swap it in over any previous one."""
    out = Path(out_dir)
    try:
        # mode 0o700: checkpoints have always been private to their owner (the temporary dir they were built in)
        with atomic.directory(out, fsync=True, mode=0o700) as tmp:
            # Small files first and the weights last: the window between the first weights file appearing and the
            # swap that publishes the checkpoint stays as short as it can be.
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if meta is not None:
                write_meta(tmp, meta)
            for name, data in (extra_files or {}).items():  # names may hold a subdir: "trainer/state.json"
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            model.save_pretrained(tmp, safe_serialization=True)
    except OSError as e:
        raise CheckpointError(
            f"could not save the checkpoint to {out}: {e.strerror or e} (is the disk full or the "
            "directory read-only?); the previous checkpoint is untouched"
        ) from e
    return out


def training_meta(
    *,
    task: str,
    source: dict[str, Any],
    step: int,
    metrics: dict[str, Any],
    block_size: int,
    trained_context: int,
    lora: Any,
    data: Any,
    task_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """owngpt.json of a checkpoint `owngpt train` saves, in its order: `source` is the portable description of
    the model it started from ({"source": ...} and what goes with it), `task_meta` the task's own fields (labels)."""
    return {
        "task": task,
        **source,
        "step": step,
        "metrics": metrics,
        "block_size": block_size,
        "trained_context": trained_context,
        "lora": lora,
        "data": data,
        **(task_meta or {}),
    }
