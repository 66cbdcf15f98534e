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


# --- `owngpt train --help` and its flags, generated from TrainConfig's fields -----------------------------------
# The flags `owngpt train` had when their list was written by hand (flag -> type, or "switch" for store_true): the
# generated parser must keep every one with the same destination, type and default (None: "not given").
FLAGS_BEFORE = {
    "--data": str,
    "--out": str,
    "--model": str,
    "--task": str,
    "--max-steps": int,
    "--epochs": float,
    "--batch-size": int,
    "--grad-accum": int,
    "--lr": float,
    "--optimizer": str,
    "--block-size": int,
    "--eval-every": int,
    "--patience": int,
    "--seed": int,
    "--dropout": float,
    "--warmup-steps": int,
    "--freeze-layers": int,
    "--device": str,
    "--resume": "switch",
    "--overwrite": "switch",
    "--lora": "switch",
    "--merge-lora": "switch",
    "--train-on-prompt": "switch",
    "--freeze-embeddings": "switch",
    "--compile": "switch",
    "--gradient-checkpointing": "switch",
}


def _train_help(capsys, monkeypatch) -> str:
    from owngpt.cli import main

    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_setting_has_help_and_is_listed_in_train_help(capsys, monkeypatch):
    import dataclasses

    out = _train_help(capsys, monkeypatch)
    listed = out.split("settings (key=value", 1)[1]
    for f in dataclasses.fields(TrainConfig):
        text = f.metadata.get("help", "")
        assert len(text.split()) >= 2, f"TrainConfig.{f.name} has no help"
        assert f"\n  {f.name}=" in listed, f"{f.name} is not listed in `owngpt train --help`"
        assert " ".join(text.split()[:2]) in " ".join(listed.split()), f"{f.name}'s help is not shown"


def test_train_flags_keep_their_names_types_and_defaults(capsys, monkeypatch):
    import argparse
    import dataclasses

    from owngpt.commands import train as train_cmd

    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    actions = {a.option_strings[0]: a for a in p._actions if a.option_strings and a.dest != "help"}
    assert set(actions) == set(FLAGS_BEFORE) | {"--config"}
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    for flag, tp in FLAGS_BEFORE.items():
        a = actions[flag]
        assert a.dest == flag[2:].replace("-", "_") and a.default is None and a.choices is None, flag
        if tp == "switch":
            assert isinstance(a, argparse._StoreTrueAction), flag
        else:
            assert a.type is tp and a.nargs is None, flag
        assert a.help.startswith(helps[a.dest].replace("%", "%%")), flag  # the setting's own help (argparse's %%)
    out = _train_help(capsys, monkeypatch)
    for flag in FLAGS_BEFORE:
        assert flag in out


def test_train_settings_priority_defaults_yaml_overrides_flags(tmp_path):
    # defaults < --config RUN.yaml < key=value < flags, through `owngpt train`'s own parser and config building
    from owngpt.cli import _parse, build_parser
    from owngpt.commands.train import config_from_args

    f = tmp_path / "run.yaml"
    f.write_text("task: lm\nlr: 0.1\nbatch_size: 2\nseed: 3\nlora: true\nresume: false\n", encoding="utf-8")
    argv = [
        "train",
        "--config",
        str(f),
        "batch_size=4",
        "seed=5",
        "--seed",
        "7",
        "--resume",
        "--out",
        str(tmp_path / "r"),
    ]
    cfg = config_from_args(_parse(build_parser("train"), argv, "train"))
    assert cfg.warmup_steps == TrainConfig().warmup_steps  # default
    assert cfg.lr == 0.1 and cfg.lora is True  # YAML, not undone by a switch that was not given
    assert cfg.batch_size == 4  # key=value over YAML
    assert cfg.seed == 7 and cfg.resume is True  # flags over both
