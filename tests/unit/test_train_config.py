"""Training configs: configs/tiny.toml, defaults, error messages naming full keys, overrides, the engine section."""

import json
from pathlib import Path

import pytest

from moesaic.deepspeed import load_config
from moesaic.engine import EngineConfig
from moesaic.models import GPTConfig
from moesaic.train.config import RENAMED, DataConfig, LoopConfig, load_train_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"
BATCH = {"engine": {"train_micro_batch_size_per_gpu": 4}}  # the least a training config needs


def test_tiny_toml_loads():
    cfg = load_train_config(TINY)
    assert isinstance(cfg.model, GPTConfig) and cfg.model.ep_size == 2 and cfg.model.moe.num_experts == 4
    assert cfg.train.nproc == 2 and cfg.data.path is None and cfg.train.device == "auto"
    assert cfg.batch() == (32, 16, 1)  # 16 per process, 2 processes
    opt = cfg.engine.optimizer
    assert opt.type == "AdamW" and opt.update() == ("AdamW", {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8,
                                                              "weight_decay": 0.1})
    assert cfg.engine.gradient_clipping == 1.0 and not cfg.engine.bf16.enabled
    assert cfg.engine.moe.split_by == "expert"
    assert load_train_config(str(TINY)) == cfg


def test_tiny_toml_is_the_former_tiny_run():
    """The engine sees exactly what the hand-written bridge of the former layout gave it for tiny.toml."""
    former = {  # train/loop.py:engine_config of the former layout, applied to the former tiny.toml
        "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": 400, "warmup_num_steps": 20, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1,
            "warmup_type": "linear"}},
        "gradient_clipping": 1.0, "bf16": {"enabled": False}, "moe": {"split_by": "expert"},
    }
    assert load_train_config(TINY).engine_config() == load_config(former)


def test_total_num_steps_defaults_to_train_steps():
    cfg = load_train_config(TINY)
    assert cfg.engine.scheduler.params["total_num_steps"] is None  # absent in the file ...
    assert cfg.engine_config().scheduler.params["total_num_steps"] == 400  # ... train.steps for the run
    short = load_train_config(TINY, {"train.steps": 10})
    assert short.engine_config().scheduler.params["total_num_steps"] == 10
    assert cfg.with_overrides({"train.steps": 10}).engine_config().scheduler.params["total_num_steps"] == 10
    fixed = load_train_config(TINY, {"engine.scheduler.params.total_num_steps": 1000})
    assert fixed.engine_config().scheduler.params["total_num_steps"] == 1000  # an explicit value wins
    plain = load_train_config(BATCH)
    assert plain.engine_config() is plain.engine  # no scheduler: nothing to fill


def test_a_warmup_longer_than_the_run_is_one_line_naming_the_keys():
    # issue 21: a 9-step run of tiny.toml (warmup 20) printed the schedule's raw UserWarning on every rank
    key = "engine.scheduler.params"
    line = load_train_config(TINY, {"train.steps": 9}).warmup_warning()
    assert line == (f"{key}.warmup_num_steps=20 is more than the schedule's 9 steps (train.steps=9): the learning "
                    f"rate is still warming up when the run ends; lower {key}.warmup_num_steps or raise train.steps")
    assert load_train_config(TINY).warmup_warning() is None  # 400 steps
    assert load_train_config(TINY, {"train.steps": 20}).warmup_warning() is None  # warmup ends with the run
    fixed = load_train_config(TINY, {f"{key}.total_num_steps": 5, "train.steps": 400}).warmup_warning()
    assert f"the schedule's 5 steps ({key}.total_num_steps=5)" in fixed and fixed.endswith(f"{key}.total_num_steps")
    # the schedules' default warmup is 1000 steps (DeepSpeed's), named as such
    default = load_train_config({**BATCH, "train": {"steps": 50}, "engine": {
        **BATCH["engine"], "scheduler": {"type": "WarmupDecayLR", "params": {}}}}).warmup_warning()
    assert default.startswith(f"{key}.warmup_num_steps=1000 is more than the schedule's 50 steps")
    assert load_train_config(BATCH).warmup_warning() is None  # no schedule
    no_end = {**BATCH, "engine": {**BATCH["engine"], "scheduler": {"type": "WarmupLR", "params": {}}}}
    assert load_train_config(no_end).warmup_warning() is None  # WarmupLR holds its peak: it has no end


def test_defaults_and_round_trip():
    cfg = load_train_config(BATCH)
    assert cfg.model == GPTConfig() and cfg.train == LoopConfig() and cfg.data == DataConfig()
    assert cfg.engine == EngineConfig(train_micro_batch_size_per_gpu=4)
    assert cfg.data.suffixes == (".txt", ".md", ".py", ".rst")
    d = load_train_config(TINY).to_dict()
    assert d["engine"]["optimizer"]["params"]["betas"] == [0.9, 0.95] and d["train"]["max_minutes"] == 4.5
    assert json.loads(json.dumps(d)) == d  # JSON-ready, for run.json and the checkpoint manifest
    assert load_train_config(d) == load_train_config(TINY)
    assert load_train_config(cfg) is cfg


def test_the_engine_section_is_the_deepspeed_dict():
    """[engine] in TOML and moesaic.initialize's dict are one tree: the same keys give the same config."""
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
          "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
          "moe": {"split_by": "layer", "max_group_size": 1024, "freeze_experts": [1]}}
    cfg = load_train_config({"engine": ds, "train": {"nproc": 2}})
    assert cfg.engine == load_config(ds)
    assert cfg.to_dict()["engine"] == load_config(ds).to_dict()


def test_numbers_are_normalised():
    cfg = load_train_config({"engine": {"train_micro_batch_size_per_gpu": 2, "optimizer": {"params": {
        "lr": 1, "betas": [0, 0.5]}}}, "model": {"moe": {"capacity_factor": 2}}, "train": {"max_minutes": 3},
        "data": {"suffixes": [".txt"]}})
    params = cfg.engine.optimizer.params
    assert params["lr"] == 1.0 and isinstance(params["lr"], float) and params["betas"] == (0.0, 0.5)
    assert isinstance(cfg.model.moe.capacity_factor, float) and cfg.train.max_minutes == 3.0
    assert cfg.data.suffixes == (".txt",)


@pytest.mark.parametrize("config, exc, match", [
    ({"engine": {"train_micro_batch_size_per_gpu": 0}}, ValueError,
     r"engine.train_micro_batch_size_per_gpu must be an int >= 1, got 0"),
    ({"engine": {"train_micro_batch_size_per_gpu": 2.5}}, TypeError,
     r"engine.train_micro_batch_size_per_gpu must be an int or null, got float: 2.5"),
    ({"engine": {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, "train": {"nproc": 1}}, ValueError,
     r"engine.train_batch_size \(30\) must be a multiple of engine.train_micro_batch_size_per_gpu \(4\)"),
    ({"engine": {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4}, "train": {"nproc": 4}}, ValueError,
     r"engine.gradient_accumulation_steps comes out as 0 from engine.train_batch_size \(8\) over world_size \(4\)"),
    ({"engine": {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
      "train": {"nproc": 4}}, ValueError,
     r"engine.train_batch_size \(8\) != engine.train_micro_batch_size_per_gpu \(4\) \* "
     r"engine.gradient_accumulation_steps \(1\) \* world_size \(4\)"),
    ({"engine": {"bf16": {"enabled": "yes"}}}, TypeError, r"engine.bf16.enabled must be a bool"),
    ({"train": {"max_minutes": 0}}, ValueError, r"train.max_minutes must be a finite number in \(0, inf\)"),
    ({"train": {"device": "gpu"}}, ValueError, r"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', "
                                               r"got 'gpu'"),
    ({"train": {"device": 0}}, TypeError, r"train.device must be a str"),
    ({"train": {"stepz": 3}}, ValueError, r"unknown key 'train.stepz'; allowed keys under train: checkpoint_every, "
                                          r"device, dist_timeout_s, eval_batches"),
    ({"trian": {}}, ValueError, r"unknown key 'trian'; allowed keys at the top level: data, engine, model, train"),
    ({"model": {"n_layers": 2}}, ValueError, r"unknown key 'model.n_layers'; allowed keys under model: aux_loss_coef"),
    ({"model": {"moe": {"num_experts": 6}, "ep_size": 4}}, ValueError,
     r"model.moe.num_experts \(6\) must be divisible by model.ep_size \(4\)"),
    ({"model": {"moe": {"k": 5}}}, ValueError, r"model.moe.k must be an int in \[1, model.moe.num_experts=4\], got 5"),
    ({"model": {"n_embd": 100, "n_head": 3}}, ValueError, r"model.n_embd \(100\) must be divisible by model.n_head"),
    ({"model": {"ep_size": 2}, "train": {"nproc": 3}}, ValueError,
     r"train.nproc \(3\) must be divisible by model.ep_size \(2\)"),
    ({"model": {"ep_size": 2}}, ValueError, r"train.nproc \(1\) must be divisible by model.ep_size \(2\)"),
    ({"engine": {"optimizer": {"params": {"lr": 0}}}}, ValueError,
     r"engine.optimizer.params.lr must be a finite number in \(0, inf\), got 0"),
    ({"engine": {"optimizer": {"params": {"betas": [0.9, 1.0]}}}}, ValueError,
     r"engine.optimizer.params.betas\[1\] must be a finite number in \[0, 1\), got 1.0"),
    ({"engine": {"optimizer": {"params": {"betas": [0.9]}}}}, ValueError,
     r"engine.optimizer.params.betas must be a list of 2 numbers in \[0, 1\) \(exactly 2 entries\), got 1"),
    ({"engine": {"scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 1.5}}}}, ValueError,
     r"engine.scheduler.params.cos_min_ratio must be a finite number in \[0, 1\]"),
    ({"data": {"val_percent": 0}}, ValueError, r"data.val_percent must be an int in \[1, 50\], got 0"),
    ({"data": {"path": 3}}, TypeError, r"data.path must be a non-empty str or null, got int: 3"),
    ({"data": {"suffixes": []}}, ValueError, r"data.suffixes must be a list of file suffixes .*at least 1"),
    ({"data": {"suffixes": [".py", ""]}}, ValueError, r"data.suffixes\[1\] must be a non-empty str"),
    ({"engine": {"moe": {"split_by": "module"}}}, ValueError,
     r"engine.moe.split_by must be one of \['expert', 'layer'\], got 'module'"),
    ({"engine": {"moe": {"max_group_size": 0}}}, ValueError, r"engine.moe.max_group_size must be an int >= 1, got 0"),
    ({"train": 5}, TypeError, r"train must be a mapping \(dict / JSON object / TOML table\), got int: 5"),
])
def test_errors_name_the_full_key(config, exc, match):
    engine = config.get("engine", {})
    if isinstance(engine, dict) and "train_batch_size" not in engine:
        config = {**config, "engine": {**BATCH["engine"], **engine}}  # runnable but for the mistake under test
    with pytest.raises(exc, match=match):
        load_train_config(config)


def test_a_batch_size_is_required():
    with pytest.raises(ValueError, match=r"set engine.train_batch_size or engine.train_micro_batch_size_per_gpu "
                                         r"\(both are missing\)"):
        load_train_config({})
    assert load_train_config({"engine": {"train_batch_size": 8}, "train": {"nproc": 2}}).batch() == (8, 4, 1)


def test_keys_of_the_former_layout_name_their_new_place():
    with pytest.raises(ValueError, match=r"former layout: optim.lr -> engine.optimizer.params.lr; "
                                         r"train.batch_size -> engine.train_micro_batch_size_per_gpu"):
        load_train_config({"optim": {"lr": 1e-3}, "train": {"batch_size": 4}})
    for old, new in RENAMED.items():
        section, key = old.split(".")
        with pytest.raises(ValueError, match=rf"{old} -> {new}"):
            load_train_config({section: {key: 1}})
        with pytest.raises(ValueError, match=rf"{old} -> {new}"):
            load_train_config(TINY, {old: 1})  # --set with a former key


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.json or \.toml"):
        load_train_config(tmp_path / "x.yaml")
    with pytest.raises(FileNotFoundError, match="missing.toml' does not exist"):
        load_train_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(ValueError, match=r"bad.toml: invalid TOML"):
        load_train_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[engine.optimizer.params]\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key 'engine.optimizer.params.learning_rate'; allowed keys under "
                                         r"engine.optimizer.params: adam_w_mode, amsgrad, betas, bias_correction, eps, lr, torch_adam, weight_decay"):
        load_train_config(typo)
    as_json = tmp_path / "tiny.json"
    as_json.write_text(json.dumps(load_train_config(TINY).to_dict()))
    assert load_train_config(as_json) == load_train_config(TINY)  # the same reader takes JSON


def test_overrides():
    cfg = load_train_config(TINY)
    new = cfg.with_overrides({"train.steps": 10, "engine.optimizer.params.lr": 1e-3, "data.path": "corpus.txt",
                              "engine.bf16.enabled": True})
    assert new.train.steps == 10 and new.engine.optimizer.params["lr"] == 1e-3 and new.data.path == "corpus.txt"
    assert new.engine.bf16.enabled and new.engine.optimizer.params["betas"] == (0.9, 0.95)  # the rest is kept
    assert cfg.train.steps != 10 and new.model == cfg.model  # the original is unchanged
    assert cfg.with_overrides({"model.ep_size": 1, "train.nproc": 1}).model.ep_size == 1
    assert load_train_config(TINY, {"engine.moe.lr_scale": {"blocks.1.ffn": 0.5}}).engine.moe.lr_scale == \
        {"blocks.1.ffn": 0.5}  # a whole table as one value
    with pytest.raises(ValueError, match=r"unknown key 'train.stpes'; allowed keys under train: checkpoint_every"):
        cfg.with_overrides({"train.stpes": 10})
    with pytest.raises(ValueError, match=r"unknown key 'steps'; allowed keys at the top level"):
        cfg.with_overrides({"steps": 10})
    with pytest.raises(ValueError, match=r"override 'train.steps.x': train.steps is a value \(400\), not a section"):
        cfg.with_overrides({"train.steps.x": 1})
    with pytest.raises(ValueError, match=r"override key 'train..steps' must be a dotted key path"):
        cfg.with_overrides({"train..steps": 1})
    with pytest.raises(ValueError, match=r"train.nproc \(1\) must be divisible by model.ep_size \(2\)"):
        cfg.with_overrides({"train.nproc": 1})


def test_the_run_says_a_short_warmup_once_on_rank_0_without_the_schedule_s_own_warning(capsys, tmp_path):
    import warnings

    from moesaic.models import GPT
    from moesaic.train.loop import initialize_engine

    cfg = load_train_config(TINY, {"train.steps": 9, "model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2,
                                   "model.moe_every": 1, "model.ep_size": 1, "train.nproc": 1})
    for rank, quiet, said in ((0, False, 1), (1, False, 0), (0, True, 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = initialize_engine(cfg, rank, quiet, model=GPT(cfg.model), log_dir=str(tmp_path / str(rank)))
        engine.close()
        err = capsys.readouterr().err
        assert not [w for w in caught if "warmup_num_steps" in str(w.message)], [str(w.message) for w in caught]
        assert err.count("moesaic train: warning: engine.scheduler.params.warmup_num_steps=20 is more than") == said
        assert err.count("\n") == said, err
        assert engine.lr_scheduler.total_num_steps == 9  # the schedule itself is as before
