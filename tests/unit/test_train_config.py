"""Training configs: configs/tiny.toml, defaults, error messages naming full keys, overrides."""

from pathlib import Path

import pytest

from moesaic.models import GPTConfig
from moesaic.train.config import (DataConfig, LoopConfig, MoEOptConfig, OptimConfig, TrainConfig, load_train_config,
                                  parse_override)

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"


def test_tiny_toml_loads():
    cfg = load_train_config(TINY)
    assert isinstance(cfg.model, GPTConfig) and cfg.model.ep_size == 2 and cfg.model.num_experts == 4
    assert cfg.train.nproc == 2 and cfg.train.batch_size == 16 and cfg.data.path is None
    assert cfg.optim.betas == (0.9, 0.95) and isinstance(cfg.optim.betas, tuple)
    assert load_train_config(str(TINY)) == cfg


def test_defaults_and_round_trip():
    cfg = load_train_config({})
    assert cfg == TrainConfig() == load_train_config(None)
    assert cfg.optim == OptimConfig() and cfg.train == LoopConfig() and cfg.moe == MoEOptConfig()
    assert cfg.data == DataConfig() and cfg.data.suffixes == (".txt", ".md", ".py", ".rst")
    d = load_train_config(TINY).to_dict()
    assert d["optim"]["betas"] == [0.9, 0.95] and d["train"]["max_minutes"] == 4.5  # tiny.toml caps the demo
    assert load_train_config(d) == load_train_config(TINY)
    assert load_train_config(cfg) is cfg


def test_numbers_are_normalised():
    cfg = load_train_config({"optim": {"lr": 1, "betas": [0, 0.5]}, "model": {"capacity_factor": 2},
                             "train": {"max_minutes": 3}, "data": {"suffixes": [".txt"]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.0, 0.5)
    assert isinstance(cfg.model.capacity_factor, float) and cfg.train.max_minutes == 3.0
    assert cfg.data.suffixes == (".txt",)


@pytest.mark.parametrize("config, exc, match", [
    ({"train": {"batch_size": 0}}, ValueError, r"train.batch_size must be an int >= 1, got 0"),
    ({"train": {"batch_size": 2.5}}, TypeError, r"train.batch_size must be an int, got float: 2.5"),
    ({"train": {"bf16": "yes"}}, TypeError, r"train.bf16 must be a bool"),
    ({"train": {"max_minutes": 0}}, ValueError, r"train.max_minutes must be a finite number in \(0, inf\)"),
    ({"train": {"stepz": 3}}, ValueError, r"unknown key 'train.stepz'; allowed keys under train: steps, batch_size"),
    ({"trian": {}}, ValueError, r"unknown key 'trian'; allowed keys at the top level: model, data, optim, train, moe"),
    ({"model": {"n_layers": 2}}, ValueError, r"unknown key 'model.n_layers'; allowed keys under model: vocab_size"),
    ({"model": {"num_experts": 6, "ep_size": 4}}, ValueError,
     r"model.num_experts \(6\) must be divisible by model.ep_size \(4\)"),
    ({"model": {"top_k": 5}}, ValueError, r"model.top_k must be an int in \[1, model.num_experts=4\], got 5"),
    ({"model": {"n_embd": 100, "n_head": 3}}, ValueError, r"model.n_embd \(100\) must be divisible by model.n_head"),
    ({"model": {"ep_size": 2}, "train": {"nproc": 3}}, ValueError,
     r"train.nproc \(3\) must be divisible by model.ep_size \(2\)"),
    ({"model": {"ep_size": 2}}, ValueError, r"train.nproc \(1\) must be divisible by model.ep_size \(2\)"),
    ({"optim": {"lr": 0}}, ValueError, r"optim.lr must be a finite number in \(0, inf\), got 0"),
    ({"optim": {"betas": [0.9, 1.0]}}, ValueError, r"optim.betas\[1\] must be a finite number in \[0, 1\), got 1.0"),
    ({"optim": {"betas": [0.9]}}, TypeError, r"optim.betas must be a list of 2 numbers"),
    ({"optim": {"min_lr_ratio": 1.5}}, ValueError, r"optim.min_lr_ratio must be a finite number in \[0, 1\]"),
    ({"data": {"val_percent": 0}}, ValueError, r"data.val_percent must be an int in \[1, 50\], got 0"),
    ({"data": {"path": 3}}, TypeError, r"data.path must be a non-empty str"),
    ({"data": {"suffixes": []}}, TypeError, r"data.suffixes must be a non-empty list"),
    ({"moe": {"split_by": "module"}}, ValueError, r"moe.split_by must be one of \['expert', 'layer'\], got 'module'"),
    ({"moe": {"max_group_size": 0}}, ValueError, r"moe.max_group_size must be an int >= 1, got 0"),
    ({"train": 5}, TypeError, r"train must be a table"),
])
def test_errors_name_the_full_key(config, exc, match):
    with pytest.raises(exc, match=match):
        load_train_config(config)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="must end in .toml"):
        load_train_config(tmp_path / "x.yaml")
    with pytest.raises(ValueError, match="does not exist"):
        load_train_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_train_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key 'optim.learning_rate'; allowed keys under optim: lr"):
        load_train_config(typo)


def test_overrides():
    cfg = load_train_config(TINY)
    new = cfg.with_overrides({"train.steps": 10}, **{"optim.lr": 1e-3, "data.path": "corpus.txt"})
    assert new.train.steps == 10 and new.optim.lr == 1e-3 and new.data.path == "corpus.txt"
    assert cfg.train.steps != 10 and new.model == cfg.model  # the original is unchanged
    assert cfg.with_overrides(**{"model.ep_size": 1, "train.nproc": 1}).model.ep_size == 1
    with pytest.raises(ValueError, match=r"unknown key 'train.stpes'; allowed keys under train: steps"):
        cfg.with_overrides(**{"train.stpes": 10})
    with pytest.raises(ValueError, match=r"override 'steps' must look like 'section.key'"):
        cfg.with_overrides(steps=10)
    with pytest.raises(ValueError, match=r"train.nproc \(1\) must be divisible by model.ep_size \(2\)"):
        cfg.with_overrides(**{"train.nproc": 1})


def test_parse_override():
    assert parse_override("train.steps=10") == ("train.steps", 10)
    assert parse_override("optim.betas = [0.8, 0.9]") == ("optim.betas", [0.8, 0.9])
    assert parse_override("train.bf16=true") == ("train.bf16", True)
    assert parse_override("data.path=some/dir") == ("data.path", "some/dir")
    with pytest.raises(ValueError, match="must look like section.key=value"):
        parse_override("train.steps")
