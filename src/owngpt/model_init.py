"""Building the model a run trains: from a preset or a local checkpoint; checks, freezing and LoRA.

Models always come from transformers (`GPT2LMHeadModel` or `LlamaForCausalLM` for presets, `AutoModelForCausalLM` /
`AutoModelForSequenceClassification` for checkpoints); this module only decides which one, refuses the
combinations that cannot work (a tokenizer the model was not trained with, a block size beyond its context) and
applies what the run asks for (dropout, freezing, LoRA through peft).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from owngpt.checkpoint import Checkpoint, open_checkpoint, position_table
from owngpt.errors import CheckpointError, ConfigError
from owngpt.models import ModelSource, preset_arch
from owngpt.tokenizer import load_tokenizer

# config attribute names different architectures use for dropout probabilities
_DROPOUT_KEYS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "summary_first_dropout",
)


def source_checkpoint(source: ModelSource) -> Checkpoint:
    """The checkpoint a pretrained `--model` names, opened once per ModelSource: a training start reads its
    config.json and owngpt.json once, however many of the functions below ask."""
    ckpt = source.__dict__.get("_checkpoint")
    if ckpt is None:
        ckpt = source.__dict__["_checkpoint"] = open_checkpoint(source.path)
    return ckpt


def check_block_size(block_size: int, context: int | None, source: ModelSource) -> None:
    if context is not None and block_size > context:
        raise ConfigError(
            f"--block-size {block_size} is beyond the model's context of {context} tokens "
            f"({source.describe()}): use --block-size {context} or less"
        )


def resolve_block_size(requested: int | None, source: ModelSource) -> int:
    """The run's block size: `requested` (--block-size), checked against the model's context, or by default
    min(context, 256)."""

    context = (
        source.preset["n_positions"] if source.kind == "preset" else position_table(source_checkpoint(source).config)
    )
    block = requested or min(context or 256, 256)
    check_block_size(block, context, source)
    return block


def trained_context_after(source: ModelSource, block_size: int) -> int:
    """The longest window the model has been trained on once this run is done: this run's block, or more if it
    started from a checkpoint trained on longer ones (fine-tuning GPT-2 on blocks of 256 keeps its 1024 trained
    positions)."""
    if source.kind == "preset":
        return block_size

    return max(block_size, source_checkpoint(source).trained_context)


def model_vocab(source: ModelSource, tokenizer: Any) -> int:
    """How many token ids the model embeds: a preset is built for `tokenizer`; a checkpoint says in its config."""

    if source.kind == "preset":
        return len(tokenizer)
    return int(getattr(source_checkpoint(source).config, "vocab_size", 0) or 0) or len(tokenizer)


def check_tokenizer(data_tokenizer: Any, data_path: Path, source: ModelSource, model_vocab: int) -> None:
    """Refuse a data dir whose tokenizer is not the model's: the ids would mean other text to the model.

    A preset is built for the data's tokenizer, so only checkpoints are checked: the vocabularies must be equal
    when the checkpoint has a tokenizer, and every id must fit the embeddings in any case.
    """
    n = len(data_tokenizer)
    if source.kind != "preset" and source.path is not None and _has_tokenizer(source.path):
        ckpt_tok = load_tokenizer(source.path)
        if ckpt_tok.get_vocab() != data_tokenizer.get_vocab():
            raise CheckpointError(
                f"{data_path} was tokenized with another tokenizer ({n} tokens) than the model {source.path} "
                f"({len(ckpt_tok)} tokens): prepare the data again with the model's tokenizer, "
                f"`owngpt prepare ... --tokenizer {source.path}`"
            )
    if n > model_vocab:
        raise CheckpointError(
            f"{data_path}'s tokenizer has {n} tokens but the model {source.name} embeds only "
            f"{model_vocab}: prepare the data with the model's tokenizer"
        )


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def set_dropout(config: Any, p: float) -> None:
    for key in _DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, p)


def preset_config(preset: dict[str, Any], tokenizer: Any, dropout: float, overrides: dict[str, Any]) -> Any:
    """The transformers config of a from-scratch preset (GPT2Config or LlamaConfig) for this tokenizer."""

    p = dropout
    special = dict(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if preset_arch(preset) == "llama":
        from transformers import LlamaConfig

        fields = dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=preset["n_positions"],
            hidden_size=preset["n_embd"],
            intermediate_size=preset["intermediate_size"],
            num_hidden_layers=preset["n_layer"],
            num_attention_heads=preset["n_head"],
            num_key_value_heads=preset["n_head"],
            # tied input/output embeddings as GPT-2 (and small LLaMA-family models): at 128 dims with a 50k
            # vocabulary the embedding is most of the model, two copies would double it
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            attention_dropout=p,  # LLaMA has no residual/embedding dropout, only on attention probabilities
            **special,
        )
        return LlamaConfig(**{**fields, **overrides})
    from transformers import GPT2Config

    fields = dict(
        vocab_size=len(tokenizer),
        n_positions=preset["n_positions"],
        n_embd=preset["n_embd"],
        n_layer=preset["n_layer"],
        n_head=preset["n_head"],
        # exact GELU (as nanoGPT and BERT) instead of GPT-2's tanh approximation `gelu_new`, which transformers
        # computes in eight elementwise ops: on this CPU the fused exact kernel's forward + backward is 5x
        # faster (0.8 vs 4.0 ms on a 12x64x512 activation), a 20% shorter training step at nanoGPT's CPU size.
        # The two differ by < 5e-4 anywhere; checkpoints record it in config.json.
        activation_function="gelu",
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        **special,
    )
    return GPT2Config(**{**fields, **overrides})


def preset_model_class(config: Any, model_kind: str) -> Any:
    """transformers' class for a preset config: (GPT2|Llama)(LMHeadModel|ForCausalLM|ForSequenceClassification)."""
    import transformers

    classify = model_kind == "sequence_classification"
    if config.model_type == "llama":
        return transformers.LlamaForSequenceClassification if classify else transformers.LlamaForCausalLM
    return transformers.GPT2ForSequenceClassification if classify else transformers.GPT2LMHeadModel


def build_model(source: ModelSource, tokenizer: Any, task: Any, cfg: Any) -> Any:
    """A fresh model: preset (random init seeded by cfg.seed) or a local checkpoint's weights (safetensors)."""
    import torch

    overrides = task.model_config_overrides()
    if source.kind == "preset":
        config = preset_config(source.preset, tokenizer, cfg.dropout, overrides)
        torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
        return preset_model_class(config, task.model_kind)(config)

    ckpt = source_checkpoint(source)
    if ckpt.quantization:
        raise CheckpointError(
            f"{source.path} is an int8 export for inference: train from the fp32 checkpoint it was exported from "
            "(int8 weights have no gradients)"
        )
    config = copy.deepcopy(ckpt.config)  # this run's dropout and task fields, not the checkpoint's cached config
    set_dropout(config, cfg.dropout)
    for k, v in overrides.items():
        setattr(config, k, v)
    kind = "classify" if task.model_kind == "sequence_classification" else "lm"
    torch.manual_seed(cfg.seed)  # a new classification head is initialised randomly
    kwargs = {"ignore_mismatched_sizes": True} if kind == "classify" else {}
    return ckpt.model(kind, config=config, **kwargs)


def blocks(model: Any) -> Any:
    """The list of transformer blocks (GPT-2: transformer.h; Llama: model.layers ...)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError("freeze_layers: cannot find this model's list of transformer blocks")


def freeze(model: Any, embeddings: bool, layers: int) -> list[str]:
    """Stop gradients to the embeddings (token and position) and/or the first `layers` blocks; returns names."""
    frozen: list[Any] = []
    if embeddings:
        frozen.append(model.get_input_embeddings())
        for name in ("wpe", "embed_positions", "position_embeddings"):
            for mname, module in model.named_modules():
                if mname.split(".")[-1] == name:
                    frozen.append(module)
    if layers:
        bl = blocks(model)
        if layers > len(bl):
            raise ConfigError(f"freeze_layers={layers}: the model has only {len(bl)} blocks")
        frozen.extend(bl[:layers])
    names = []
    ids = {id(p) for m in frozen for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in ids:
            p.requires_grad_(False)
            names.append(name)
    return names


def default_lora_targets(model: Any) -> list[str] | str:
    model_type = getattr(model.config, "model_type", "")
    if model_type == "gpt2":
        return ["c_attn", "c_proj", "c_fc"]  # GPT-2's attention and MLP projections (transformers' Conv1D)
    if model_type == "llama":  # attention and SwiGLU projections; not lm_head (tied to the embeddings)
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return "all-linear"


def apply_lora(model: Any, cfg: Any, task_kind: str) -> Any:
    """Wrap the model with a fresh LoRA adapter (peft). B starts at zero, so the wrapped model is the base at step 0."""
    from peft import LoraConfig, TaskType, get_peft_model

    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets or default_lora_targets(model),
        task_type=TaskType.SEQ_CLS if task_kind == "sequence_classification" else TaskType.CAUSAL_LM,
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",  # Conv1D stores weights transposed
    )
    return get_peft_model(model, lcfg)


def merged_copy(model: Any) -> Any:
    """A plain transformers model with the LoRA deltas folded in; the training model is left untouched (merging in
    place and unmerging later would not restore the base weights bitwise, and exact resume needs them)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
