from pathlib import Path

import pytest

from owngpt.config import TrainConfig, load_config, save_config
from owngpt.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_bundled_config_is_valid_and_names_its_command(path):
    cfg = load_config(TrainConfig, str(path))
    assert cfg.task in ("lm", "chat", "mmi", "classify")
    assert path.read_text(encoding="utf-8").startswith("# owngpt "), "a config starts with the command that runs it"


def test_precedence_file_then_overrides_then_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 1.0e-3\nbatch_size: 4\nmodel: tiny\n", encoding="utf-8")
    cfg = load_config(TrainConfig, str(f), ["lr=3e-4", "lora=true", "lora_targets=c_attn,c_proj"], {"batch_size": 16})
    assert (cfg.lr, cfg.batch_size, cfg.lora, cfg.lora_targets) == (3e-4, 16, True, ["c_attn", "c_proj"])


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        load_config(TrainConfig, overrides=["learning_rate=1"])
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        load_config(TrainConfig, overrides=["batchsize=4"])
    with pytest.raises(ConfigError, match="max_steps='many'"):
        load_config(TrainConfig, overrides=["max_steps=many"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(TrainConfig, overrides=["schedule=wavy"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1\n  batch_size: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(TrainConfig, str(bad))


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(TrainConfig, overrides=["lr=2e-4", "max_steps=7", "lora=true", "data=d", "out=o"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(TrainConfig, str(tmp_path / "config.yaml")) == cfg
