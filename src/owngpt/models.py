"""Model selection: from-scratch presets, local Hugging Face checkpoints, Hub ids; and what `--model` means.

`--model` (train) and the CKPT argument (generate, chat, serve, export, eval, predict) take:
  - a local directory (a Hugging Face checkpoint: config.json + *.safetensors);
  - a from-scratch preset: `tiny`, `mini`, `small`, or a GPT-2 size written `scratch:gpt2`, `scratch:gpt2-medium`...;
    or a LLaMA-style one of the same sizes: `llama-tiny`, `llama-mini`, `llama-small`, `llama-base` (gpt2's shape),
    `llama-medium`, `llama-large`, `llama-xl`;
    The bare names `gpt2`, `gpt2-medium`, ... mean OpenAI's *pretrained* weights (a Hub id), never random ones:
    a user who types `--model gpt2` must not silently get an untrained model;
  - a Hub id (`openai-community/gpt2`, `gpt2`): fetched once and cached (see owngpt.hub); offline and not cached,
    it fails at once, saying how to bring the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owngpt.checkpoint_files import check_dir, is_checkpoint, read_meta
from owngpt.errors import CheckpointError, ConfigError
from owngpt.hub import fetch_model

# GPT-2 architecture sizes. `tiny` is nanoGPT's CPU recipe (4 layers, 4 heads, 128 dims): about 1M parameters with
# a char vocabulary, trains in minutes on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256},
    "mini": {"n_layer": 6, "n_head": 6, "n_embd": 192, "n_positions": 512},
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 512},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "n_positions": 1024},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600, "n_positions": 1024},
}


def llama_ffn_width(n_embd: int) -> int:
    """SwiGLU's hidden width: 8/3 of the model width (LLaMA's choice, which keeps the MLP's parameter count equal to
    GPT-2's 4x MLP, since SwiGLU has three matrices), rounded up to a multiple of 8. 128 -> 344, 768 -> 2048."""
    return -(-n_embd // 3) * 8  # ceil(8d/3 / 8) * 8


# LLaMA-style presets (transformers' LlamaForCausalLM: rotary positions, RMSNorm, SwiGLU MLP, no biases, tied
# embeddings), the same layer/head/width shapes as the GPT-2 ones. Measured on nanoGPT's CPU recipe they reach a
# lower loss per step than GPT-2 at a similar speed (docs/benchmarks.md).
for _gpt2_name, _llama_name in (
    ("tiny", "llama-tiny"),
    ("mini", "llama-mini"),
    ("small", "llama-small"),
    ("gpt2", "llama-base"),
    ("gpt2-medium", "llama-medium"),
    ("gpt2-large", "llama-large"),
    ("gpt2-xl", "llama-xl"),
):
    _shape = PRESETS[_gpt2_name]
    PRESETS[_llama_name] = {**_shape, "arch": "llama", "intermediate_size": llama_ffn_width(_shape["n_embd"])}


def preset_arch(preset: dict[str, Any]) -> str:
    """'gpt2' or 'llama': the architecture a preset builds."""
    return preset.get("arch", "gpt2")


# Names that are also Hub ids of pretrained models: as presets they need the `scratch:` prefix.
AMBIGUOUS = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
SCRATCH_PREFIX = "scratch:"


@dataclass
class ModelSource:
    """What a `--model` value resolved to; saved in the run's config and the checkpoint's owngpt.json."""

    kind: str  # "preset" | "local" | "hub"
    name: str  # preset name, directory, or Hub id as the user wrote it
    path: Path | None = None  # the local directory holding the weights (local and hub)
    preset: dict[str, Any] = field(default_factory=dict)

    @property
    def pretrained(self) -> bool:
        return self.kind != "preset"

    def describe(self) -> str:
        if self.kind == "preset":
            return f"from scratch: preset '{self.name}' (random initial weights)"
        if self.kind == "hub":
            return f"pretrained: Hub model '{self.name}' (cached at {self.path})"
        return f"pretrained: local checkpoint {self.path}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "path": str(self.path) if self.path else None,
            **({"preset": self.preset} if self.preset else {}),
        }


def preset_name(spec: str) -> str | None:
    """The preset a spec names, or None. `scratch:X` always means a preset; bare ambiguous names never do."""
    if spec.startswith(SCRATCH_PREFIX):
        name = spec[len(SCRATCH_PREFIX) :]
        if name not in PRESETS:
            raise ConfigError(f"--model {spec}: unknown preset '{name}'; presets: {', '.join(PRESETS)}")
        return name
    if spec in PRESETS and spec not in AMBIGUOUS:
        return spec
    return None


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not spec.startswith("~")


def missing_local_path(spec: str) -> CheckpointError | None:
    """The error for a spec that is meant as a local path but does not exist, or None (it may be a Hub id).

    A spec is a path when it starts with `/`, `.` or `~`, has more than one `/`, uses the OS's own separator, or
    when its first part is an existing local folder (`runs/bse` beside `runs/`): a typo must not become a Hub query.
    """
    p = Path(os.path.expanduser(spec))
    if p.exists():
        return None
    parts = spec.replace(os.sep, "/").split("/")
    is_path = (
        spec.startswith(("/", ".", "~"))
        or len(parts) > 2
        or (os.sep != "/" and os.sep in spec)
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )
    if not is_path:
        return None
    import difflib

    parent = p.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    hint = ""
    if parent.is_dir():
        near = difflib.get_close_matches(p.name, [c.name for c in parent.iterdir() if c.is_dir()], n=3)
        if near:
            hint = f" (did you mean {', '.join(str(parent / n) for n in near)}?)"
    return CheckpointError(f"{spec}: no such checkpoint directory{hint}; pass an existing checkpoint dir")


def resolve_model_source(spec: str) -> ModelSource:
    """Resolve a `--model` value for training (a preset is allowed)."""
    p = Path(os.path.expanduser(spec))
    if p.exists():
        return ModelSource("local", spec, check_dir(p))
    missing = missing_local_path(spec)
    if missing is not None:
        raise missing
    name = preset_name(spec)
    if name is not None:
        return ModelSource("preset", name, None, dict(PRESETS[name]))
    if looks_like_hub_id(spec):
        return ModelSource("hub", spec, _fetch_hub(spec))
    raise CheckpointError(
        f"--model {spec}: no such directory, preset or Hub id. Presets: "
        f"{', '.join(n if n not in AMBIGUOUS else SCRATCH_PREFIX + n for n in PRESETS)}"
    )


def resolve_checkpoint(spec: str) -> Path:
    """Resolve a checkpoint argument (generate, chat, serve, export, eval, predict): a local dir or a Hub id."""
    p = Path(os.path.expanduser(spec))
    if p.exists():
        return check_dir(p)
    missing = missing_local_path(spec)
    if missing is not None:
        raise missing
    if preset_name(spec) is not None:
        raise CheckpointError(
            f"{spec} is a from-scratch preset, not a trained checkpoint: train one first "
            f"(`owngpt train --model {spec} ...`) and pass its checkpoint dir"
        )
    if looks_like_hub_id(spec):
        return _fetch_hub(spec)
    raise CheckpointError(f"{spec}: no such checkpoint directory")


def _fetch_hub(model_id: str) -> Path:
    return fetch_model(model_id)


# ------------------------------------------------------------------------------------------------ parameter counts
def gpt2_parameters(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """GPT-2 parameter count with tied input/output embeddings: per block 12d^2 + 13d, plus embeddings and ln_f."""
    d = n_embd
    return vocab_size * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def llama_parameters(n_layer: int, n_embd: int, vocab_size: int, intermediate_size: int) -> int:
    """LLaMA-style count with tied embeddings, no biases: per block q, k, v, o (4d^2), SwiGLU's gate, up and down
    (3·d·ffn) and two RMSNorm weights; plus the embedding and the final norm. No position table (rotary)."""
    d = n_embd
    return vocab_size * d + n_layer * (4 * d * d + 3 * d * intermediate_size + 2 * d) + d


def preset_parameters(preset: dict[str, Any], vocab_size: int) -> int:
    """Parameter count of a preset (owngpt.models.PRESETS entry) for `vocab_size`."""
    if preset.get("arch") == "llama":
        return llama_parameters(preset["n_layer"], preset["n_embd"], vocab_size, preset["intermediate_size"])
    return gpt2_parameters(preset["n_layer"], preset["n_embd"], vocab_size, preset["n_positions"])


# ---------------------------------------------------------------------------------------------- listing (`owngpt models`)
def preset_table(vocab_size: int = 50257) -> list[dict[str, Any]]:
    """Each preset as `--model` spells it, its shape and its parameter count for `vocab_size` (GPT-2's by default)."""
    rows = []
    for name, p in PRESETS.items():
        rows.append(
            {
                "model": SCRATCH_PREFIX + name if name in AMBIGUOUS else name,
                "arch": preset_arch(p),
                **p,
                "parameters": preset_parameters(p, vocab_size),
            }
        )
    return rows


def list_checkpoints(roots: list[Path], max_depth: int = 5) -> list[dict[str, Any]]:
    """Checkpoint dirs (config.json + safetensors) under `roots`, newest first, with size, task and step."""
    import json

    found: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        base = len(root.resolve().parts)
        for dirpath, dirnames, _ in os.walk(root):
            d = Path(dirpath)
            if len(d.resolve().parts) - base >= max_depth:
                dirnames[:] = []
            dirnames[:] = [n for n in dirnames if not n.startswith(".") and n not in ("tb", "__pycache__")]
            if d.resolve() in seen or not is_checkpoint(d):
                continue
            seen.add(d.resolve())
            try:
                meta = read_meta(d)
            except CheckpointError:
                meta = {}
            try:
                model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError):
                model_type = None
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            step = meta.get("step")
            found.append(
                {
                    "path": str(d),
                    "bytes": size,
                    "task": meta.get("task"),
                    "model_type": model_type,
                    "step": step,
                    "step_text": f"step {step}" if step is not None else None,
                    "source": meta.get("source"),
                    "mtime": d.stat().st_mtime,
                }
            )
    return sorted(found, key=lambda c: -c["mtime"])
