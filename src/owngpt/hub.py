"""Hugging Face Hub access: download checkpoints (safetensors only), find them in the cache, fail fast offline.

- `download(model_id, revision, out)` fetches the weights (`*.safetensors`), `config.json`, the generation config and
  the tokenizer files of a model repository, and nothing else (no pickled `*.bin`/`*.pt`/`*.ckpt`, no ONNX/TF/Flax
  copies). A repository that offers only pickled weights is refused: unpickling runs arbitrary code.
- `fetch_model(model_id)` is what `--model ID` / `CKPT` use (through owngpt.models): the cached snapshot when there
  is one (no network needed, so a cached model loads offline), else a download. Offline (`HF_HUB_OFFLINE=1`) or
  without a network, an uncached id fails at once with a `CheckpointError` saying how to bring the model.
- `cached_models()` lists the models in the local Hub cache (for `owngpt models`).

huggingface_hub (a dependency of transformers) does the transfers, caching, resuming and integrity checks; this
module only decides which files to take and turns its failures into messages that say what to do.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from owngpt import atomic
from owngpt.checkpoint_files import check_dir
from owngpt.errors import CheckpointError

# Files a checkpoint needs, at the top level of the repository. Subfolders (onnx/, flax/, original/...) are skipped.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "owngpt.json",
)
SAFE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5")
# How long to wait for the Hub before concluding there is no network: a user without one must not wait 10 s x retries.
CONNECT_TIMEOUT = float(os.environ.get("OWNGPT_HUB_TIMEOUT", "5"))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), read at call time."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def bring_it_message(model_id: str, why: str) -> str:
    """The one message for "this Hub model is not here": what happened and the three ways to bring it."""
    return (
        f"'{model_id}' is not a local directory and is not in the Hugging Face cache, and {why}. "
        f"To bring it: on a machine with a network run `owngpt download {model_id} --out DIR`, copy DIR here and "
        f"pass its path (e.g. `--model DIR`); or copy that machine's Hugging Face cache ({_cache_dir()}) here. "
        "To train from scratch instead, use a preset such as `tiny` or `scratch:gpt2`"
    )


def _cache_dir() -> str:
    """The Hub cache, read from the environment at call time (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def select_files(files: list[str]) -> list[str]:
    """The top-level files of a repository owngpt downloads: safetensors weights, configs, tokenizer files.

    Raises a CheckpointError when there are no safetensors weights, saying why pickled weights are refused.
    """
    top = [f for f in files if "/" not in f]
    weights = [f for f in top if any(fnmatch.fnmatch(f, p) for p in SAFE_WEIGHTS)]
    # A repository with both sharded and single-file weights (or several precisions) would double the download:
    # take the index and its shards when there is an index, else model.safetensors, else every top-level file.
    if "model.safetensors.index.json" in weights:
        weights = [f for f in weights if f == "model.safetensors.index.json" or f.startswith("model-")]
    elif "model.safetensors" in weights:
        weights = ["model.safetensors"] + [f for f in weights if f.startswith("adapter_model")]
    if not weights:
        pickled = [f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLED_WEIGHTS)]
        if pickled:
            raise CheckpointError(
                f"the repository offers only pickled weights ({', '.join(pickled[:4])}), which owngpt refuses: "
                "loading a pickle can run arbitrary code. Look for a safetensors version of the model (some repos have "
                "one in a pull request: --revision refs/pr/N), or convert it yourself in a trusted environment: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
            )
        raise CheckpointError(
            "the repository has no model weights (*.safetensors) at its top level: is it a model "
            f"repository? files: {', '.join(files[:8])}"
        )
    return sorted(set(weights) | {f for f in top if f in CONFIG_FILES or f in TOKENIZER_FILES})


def _complete(snapshot: Path) -> bool:
    """Whether a cached snapshot holds a loadable checkpoint (config + every weight shard)."""
    if not (snapshot / "config.json").is_file():
        return False
    if (snapshot / "model.safetensors").is_file():
        return True
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return False
        return all((snapshot / s).is_file() for s in shards)
    return any(snapshot.glob("*.safetensors"))


def cached_model_dir(model_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of `model_id` (a complete checkpoint), or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "config.json", cache_dir=_cache_dir(), revision=revision)
    except Exception:  # an id huggingface_hub finds invalid (HFValidationError) is simply not cached
        return None
    if not isinstance(found, str):  # None, or the "known not to exist" sentinel
        return None
    snapshot = Path(found).parent
    return snapshot if _complete(snapshot) else None


def fetch_model(model_id: str, revision: str | None = None) -> Path:
    """A local directory holding `model_id`: the cached snapshot, or a fresh download into the cache."""
    cached = cached_model_dir(model_id, revision)
    if cached is not None:
        return cached
    if is_offline():
        raise CheckpointError(bring_it_message(model_id, "HF_HUB_OFFLINE=1 forbids downloading it"))
    return download(model_id, revision=revision)


def _model_files(model_id: str, revision: str | None) -> tuple[list[str], str | None]:
    """(files in the repository, resolved commit), with the Hub's failures turned into messages."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(model_id, revision=revision, timeout=CONNECT_TIMEOUT)
    except GatedRepoError as e:
        raise CheckpointError(
            f"'{model_id}' is gated: accept its terms on huggingface.co and log in (`hf auth login`), then try again"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"'{model_id}' has no revision '{revision}' (--revision)") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"'{model_id}': no such model on the Hugging Face Hub (or it is private); check the "
            "spelling, or pass a local directory"
        ) from e
    except Exception as e:  # the HTTP stack raises many kinds of network errors; all mean "no usable network"
        raise CheckpointError(bring_it_message(model_id, f"the Hub cannot be reached ({type(e).__name__}: {e})")) from e
    return [s.rfilename for s in (info.siblings or [])], info.sha


def download(model_id: str, revision: str | None = None, out: str | os.PathLike | None = None) -> Path:
    """Download `model_id` (safetensors weights, configs, tokenizer) into the Hub cache, or into `out` if given.

    With `out`, the files land in a temporary sibling directory that is renamed to `out` when complete, so an
    interrupted download never leaves a half-written checkpoint. Returns the directory.
    """
    if is_offline():
        raise CheckpointError(
            f"cannot download '{model_id}': HF_HUB_OFFLINE=1 is set. Unset it on a machine with "
            "a network, or bring the model as a directory and pass its path"
        )
    from huggingface_hub import snapshot_download

    files, sha = _model_files(model_id, revision)
    try:
        wanted = select_files(files)
    except CheckpointError as e:
        raise CheckpointError(f"'{model_id}': {e}") from e
    target = Path(out) if out is not None else None
    if target is not None and target.exists() and any(target.iterdir()):
        raise CheckpointError(f"--out {target} exists and is not empty: choose a new directory")

    def snapshot(local_dir: Path | None) -> Path:
        return Path(
            snapshot_download(
                model_id,
                revision=sha or revision,
                allow_patterns=wanted,
                cache_dir=_cache_dir(),
                local_dir=local_dir,
                etag_timeout=CONNECT_TIMEOUT,
            )
        )

    try:
        if target is None:
            path = snapshot(None)
        else:
            # mode 0o700: as the temporary directory such downloads have always been renamed from
            with atomic.directory(target, mode=0o700) as tmp:
                snapshot(tmp)
                shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping for local_dir
            path = target
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"downloading '{model_id}' failed ({type(e).__name__}: {e}); run the command again to resume"
        ) from e

    return check_dir(path)


@dataclass
class CachedModel:
    repo_id: str
    path: Path  # the newest snapshot
    size_bytes: int
    complete: bool  # a loadable checkpoint (config + safetensors weights)


def cached_models() -> list[CachedModel]:
    """Model repositories in the local Hugging Face cache, largest first. Never touches the network."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(_cache_dir())
    except CacheNotFound:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        out.append(
            CachedModel(
                repo.repo_id, Path(newest.snapshot_path), repo.size_on_disk, _complete(Path(newest.snapshot_path))
            )
        )
    return sorted(out, key=lambda m: -m.size_bytes)
