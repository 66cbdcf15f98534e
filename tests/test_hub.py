"""Hub models without a network: the offline error, a cached snapshot, `owngpt download` and `owngpt models`.

The Hub itself is never contacted: a cache in the Hugging Face layout is built in tmp, and the download path is
checked with huggingface_hub's listing/transfer calls replaced by local fakes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from owngpt import hub
from owngpt.cli import main
from owngpt.errors import CheckpointError
from owngpt.models import resolve_checkpoint, resolve_model_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def put_in_cache(cache: Path, repo_id: str, ckpt: Path) -> Path:
    """Lay a checkpoint out as huggingface_hub caches a download: refs/main -> snapshots/<commit>/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    shutil.copytree(ckpt, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    return snap


def test_select_files_takes_safetensors_configs_and_tokenizer_only():
    files = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "onnx/model.onnx",
        "onnx/model.safetensors",
        "tokenizer.json",
        "vocab.txt",
        "README.md",
        ".gitattributes",
        "generation_config.json",
    ]
    assert hub.select_files(files) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ]
    sharded = [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "consolidated.safetensors",
    ]
    assert hub.select_files(sharded) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_pickled_only_repository_is_refused_with_the_reason():
    with pytest.raises(CheckpointError, match="pickled weights.*arbitrary code"):
        hub.select_files(["config.json", "pytorch_model.bin", "vocab.txt"])
    with pytest.raises(CheckpointError, match="no model weights"):
        hub.select_files(["README.md", "data.csv"])


def test_offline_uncached_hub_id_fails_at_once_saying_how_to_bring_it(hf_cache, tiny_lm_data, capsys):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("openai-community/gpt2")
    msg = str(e.value)
    assert "owngpt download openai-community/gpt2 --out DIR" in msg and "pass its path" in msg
    # bare `gpt2` is the pretrained Hub model, never a random preset
    with pytest.raises(CheckpointError, match="owngpt download gpt2"):
        resolve_model_source("gpt2")
    # through the CLI: one line, exit code 2, no traceback
    assert main(["download", "openai-community/gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "HF_HUB_OFFLINE" in err and "Traceback" not in err


def test_no_network_fails_fast_without_offline_flag(hf_cache, monkeypatch):
    """Without HF_HUB_OFFLINE, an unreachable Hub is reported the same way (network error -> guidance)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(*a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    with pytest.raises(CheckpointError, match="cannot be reached.*owngpt download org/model --out DIR"):
        resolve_checkpoint("org/model")


def test_cached_hub_model_loads_offline_and_is_reported_as_pretrained(hf_cache, tiny_ckpt):
    snap = put_in_cache(hf_cache, "someone/tiny-gpt2", tiny_ckpt)
    assert resolve_checkpoint("someone/tiny-gpt2") == snap
    src = resolve_model_source("someone/tiny-gpt2")
    assert (src.kind, src.path, src.pretrained) == ("hub", snap, True)
    assert src.describe().startswith("pretrained: Hub model 'someone/tiny-gpt2'")
    from owngpt.checkpoint import load_model

    assert load_model(src.path).config.n_layer == 2
    # a snapshot without weights (an interrupted download) is not taken for a model
    (snap / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_checkpoint("someone/tiny-gpt2")


def test_preset_and_local_dir_are_reported_as_such(tiny_ckpt):
    assert resolve_model_source("tiny").describe().startswith("from scratch: preset 'tiny'")
    assert resolve_model_source("scratch:gpt2").preset["n_layer"] == 12
    local = resolve_model_source(str(tiny_ckpt))
    assert local.kind == "local" and local.describe() == f"pretrained: local checkpoint {tiny_ckpt}"


@pytest.fixture
def fake_hub(monkeypatch, tiny_ckpt):
    """huggingface_hub's listing and transfer replaced by a repository made of `tiny_ckpt` plus pickled extras."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    repo_files = sorted(p.name for p in tiny_ckpt.iterdir()) + ["pytorch_model.bin", "onnx/model.onnx"]
    calls = {}
    monkeypatch.setattr(hub, "_model_files", lambda model_id, revision: (repo_files, COMMIT))

    def snapshot_download(repo_id, *, revision, allow_patterns, local_dir, **kw):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=list(allow_patterns))
        for name in allow_patterns:
            shutil.copy(tiny_ckpt / name, Path(local_dir) / name)
        return str(local_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return calls


def test_download_out_writes_a_complete_dir_without_pickles(fake_hub, tmp_path, capsys):
    out = tmp_path / "models" / "tiny"
    assert main(["download", "someone/tiny-gpt2", "--out", str(out)]) == 0
    assert fake_hub["revision"] == COMMIT  # pinned to the commit that was listed
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".onnx"))]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary dir left behind
    assert str(out) in capsys.readouterr().out
    resolve_model_source(str(out))  # a valid checkpoint dir
    assert main(["download", "someone/tiny-gpt2", "--out", str(out)]) == 2  # never overwrites


def test_download_refuses_a_pickled_only_repository(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_model_files", lambda m, r: (["config.json", "pytorch_model.bin"], COMMIT))
    assert main(["download", "old/pickled-model", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "only pickled weights" in err and "arbitrary code" in err
    assert not (tmp_path / "x").exists()


def test_models_lists_presets_cache_and_local_checkpoints(hf_cache, tiny_ckpt, tmp_path, capsys, monkeypatch):
    put_in_cache(hf_cache, "someone/tiny-gpt2", tiny_ckpt)
    mine = tmp_path / "mine" / "run1" / "checkpoints" / "last"
    shutil.copytree(tiny_ckpt, mine)
    monkeypatch.chdir(tmp_path)
    assert main(["models", "--dir", "mine", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    presets = {p["model"]: p for p in listing["presets"]}
    assert presets["scratch:gpt2"]["parameters"] == 124_439_808  # GPT-2 small, tied embeddings
    assert "gpt2" not in presets and "tiny" in presets
    assert [m["id"] for m in listing["hub_cache"]] == ["someone/tiny-gpt2"] and listing["hub_cache"][0]["complete"]
    assert [Path(c["path"]) for c in listing["local"]] == [Path("mine/run1/checkpoints/last")]
    assert listing["local"][0]["bytes"] > 0 and listing["local"][0]["task"] == "lm"
    assert main(["models", "--dir", "mine"]) == 0
    text = capsys.readouterr().out
    assert "scratch:gpt2" in text and "124.4M" in text and "someone/tiny-gpt2" in text and "run1" in text


def test_offline_error_from_the_cli_never_touches_the_network(hf_cache, monkeypatch, capsys):
    """`owngpt generate HUB_ID` offline: an error line naming `owngpt download`, with no network call to wait on."""

    def no_network(*a, **k):
        raise AssertionError("the Hub was contacted although HF_HUB_OFFLINE=1")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", no_network)
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    code = main(["generate", "openai-community/gpt2", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "owngpt download" in err and "Traceback" not in err, err


def test_cached_hub_id_works_in_generate_and_serve(hf_cache, tiny_ckpt, capsys):
    put_in_cache(hf_cache, "someone/tiny-gpt2", tiny_ckpt)
    assert main(["generate", "someone/tiny-gpt2", "--prompt", "ROMEO:", "--max-new-tokens", "3", "--seed", "1"]) == 0
    capsys.readouterr()
    from owngpt.serve.engine import load

    assert load("someone/tiny-gpt2").path.name == COMMIT
