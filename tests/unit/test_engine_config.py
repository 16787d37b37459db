"""Engine config (DeepSpeed's keys): loading from dict / JSON / TOML, defaults, and the error messages' key paths."""

import json

import pytest

from moesaic.deepspeed import load_config
from moesaic.engine import EngineConfig
from moesaic.optim.config import (DEFAULT_MAX_GROUP_SIZE, BF16Config, FP16Config, MoEOptimConfig, OptimizerConfig,
                                  SchedulerConfig, ZeroConfig)

FULL = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "adamw", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"total_num_steps": 1000, "warmup_num_steps": 100, "warmup_max_lr": 3e-4}},
    "bf16": {"enabled": False},
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
             "hysteresis": 2, "min_loss_scale": 1},
    "gradient_clipping": 1.0,
    "moe": {"split_by": "layer", "max_group_size": None, "offload": "cpu",
            "lr_scale": {"layers.0.mlp": 0.5, "layers.1.mlp/3": 2.0}, "freeze_experts": [0, "layers.1.mlp/2"]},
    "steps_per_print": 50,
}

TOML_TEXT = """
train_micro_batch_size_per_gpu = 4
gradient_accumulation_steps = 2
gradient_clipping = 1.0

[optimizer]
type = "SGD"
params = { lr = 0.1, momentum = 0.9, nesterov = true }

[scheduler]
type = "WarmupCosineLR"
params = { total_num_steps = 500, warmup_num_steps = 50, warmup_type = "linear" }

[bf16]
enabled = true

[moe]
lr_scale = { "ep_size_1/0" = 0.1 }
freeze_experts = [1]
"""


def _check_full(cfg: EngineConfig) -> None:
    assert cfg.optimizer.type == "AdamW"  # case-insensitive input, canonical storage
    assert cfg.optimizer.params == {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1,
                                    "adam_w_mode": True, "bias_correction": True, "amsgrad": False}
    assert cfg.optimizer.update() == ("AdamW", {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1})
    assert cfg.scheduler.params == {"total_num_steps": 1000, "warmup_min_lr": 0.0, "warmup_max_lr": 3e-4,
                                    "warmup_num_steps": 100, "warmup_type": "log", "last_batch_iteration": -1}
    assert cfg.fp16.enabled and cfg.fp16.dynamic and cfg.fp16.initial_scale_power == 12
    assert cfg.moe.max_group_size is None and cfg.moe.split_by == "layer" and cfg.moe.offload == "cpu"
    assert cfg.moe.lr_scale == {"layers.0.mlp": 0.5, "layers.1.mlp/3": 2.0}
    assert cfg.moe.freeze_experts == (0, "layers.1.mlp/2")
    assert cfg.check_batch(8) == (64, 4, 2)


def test_dict_round_trip():
    cfg = load_config(FULL)
    _check_full(cfg)
    assert load_config(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()  # to_dict is JSON-ready


def test_json_file_round_trip(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(FULL))
    for source in (path, str(path)):
        cfg = load_config(source)
        _check_full(cfg)
    out = tmp_path / "again.json"
    out.write_text(json.dumps(cfg.to_dict()))
    assert load_config(out) == cfg


def test_toml_file(tmp_path):
    path = tmp_path / "engine.toml"
    path.write_text(TOML_TEXT)
    cfg = load_config(path)
    assert cfg.optimizer == OptimizerConfig("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True})
    assert cfg.optimizer.params["dampening"] == 0.0 and cfg.optimizer.params["weight_decay"] == 0.0
    assert cfg.scheduler.type == "WarmupCosineLR" and cfg.scheduler.params["cos_min_ratio"] == 0.0001
    assert cfg.bf16.enabled and not cfg.fp16.enabled
    assert cfg.moe.lr_scale == {"ep_size_1/0": 0.1} and cfg.moe.freeze_experts == (1,)
    assert load_config(cfg.to_dict()) == cfg


def test_defaults():
    cfg = load_config({})
    assert cfg == EngineConfig()
    assert cfg.train_micro_batch_size_per_gpu is None and cfg.train_batch_size is None
    # DeepSpeed 0.19.8's defaults: no progress print, clipping at 1.0
    assert cfg.gradient_accumulation_steps is None and cfg.steps_per_print is None and cfg.gradient_clipping == 1.0
    assert cfg.optimizer.type == "AdamW"
    # DeepSpeed's defaults (its FusedAdam): no weight decay unless asked, for Adam and AdamW alike
    assert cfg.optimizer.update() == ("AdamW", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0})
    # DeepSpeed's "Adam" decouples weight decay (adam_w_mode defaults to true); adam_w_mode=false is torch's Adam
    assert OptimizerConfig("Adam").update()[0] == "AdamW"
    assert OptimizerConfig("Adam", {"adam_w_mode": False}).update()[0] == "Adam"
    assert cfg.scheduler is None and cfg.bf16 == BF16Config(enabled=False)
    assert cfg.zero_optimization == ZeroConfig(stage=0)
    assert cfg.zero_optimization.reduce_bucket_size is None and cfg.offload() == "none"
    assert cfg.fp16 == FP16Config(enabled=False, loss_scale=0.0, initial_scale_power=16, loss_scale_window=1000,
                                  hysteresis=2, min_loss_scale=1.0)
    assert cfg.moe == MoEOptimConfig("expert", DEFAULT_MAX_GROUP_SIZE, "none", {}, [])
    assert DEFAULT_MAX_GROUP_SIZE == 178956971
    assert SchedulerConfig("WarmupLR").params == {"warmup_min_lr": 0.0, "warmup_max_lr": None,
                                                  "warmup_num_steps": 1000, "warmup_type": "log",
                                                  "last_batch_iteration": -1}


def test_check_batch():
    # DeepSpeed's arithmetic: the missing sizes are derived by integer division
    assert load_config({"train_micro_batch_size_per_gpu": 2}).check_batch(4) == (8, 2, 1)
    assert load_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}).check_batch(4) == (32, 4, 2)
    assert load_config({"train_batch_size": 8}).check_batch(4) == (8, 2, 1)
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu comes out as 0"):
        load_config({"train_batch_size": 2}).check_batch(4)
    assert load_config({"train_batch_size": 32, "gradient_accumulation_steps": 2}).check_batch(4) == (32, 4, 2)
    bad = load_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    with pytest.raises(ValueError, match=r"train_batch_size \(32\) != .*\(4\) .*\(2\) .*world_size \(2\)"):
        bad.check_batch(2)
    with pytest.raises(ValueError, match="train_batch_size or train_micro_batch_size_per_gpu"):
        load_config({}).check_batch(1)
    with pytest.raises(ValueError, match="must be a multiple"):
        load_config({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4})


@pytest.mark.parametrize("config, error, pattern", [
    # bad values
    ({"optimizer": {"params": {"betas": [0.9, 1.0]}}}, ValueError, r"optimizer\.params\.betas\[1\].*\[0, 1\)"),
    ({"optimizer": {"params": {"betas": [0.9]}}}, ValueError, r"optimizer\.params\.betas .*2 numbers"),
    ({"optimizer": {"params": {"lr": 0}}}, ValueError, r"optimizer\.params\.lr .*\(0, inf\).*got 0\.0"),
    ({"optimizer": {"params": {"eps": float("nan")}}}, ValueError, r"optimizer\.params\.eps"),
    ({"optimizer": {"type": "LAMB"}}, ValueError, r"optimizer\.type='LAMB' is not supported by moesaic: .*LAMB.*"
                                                 r"allowed: AdamW, Adam, SGD"),
    ({"optimizer": {"type": "Adadelta"}}, ValueError, r"torch\.optim\.Adadelta is not implemented"),
    ({"optimizer": {"type": "Nope"}}, ValueError, r"optimizer\.type must be one of \['AdamW', 'Adam', 'SGD'\]"),
    ({"optimizer": {"type": "SGD", "params": {"momentum": -0.1}}}, ValueError, r"optimizer\.params\.momentum"),
    ({"optimizer": {"type": "SGD", "params": {"nesterov": True}}}, ValueError, r"optimizer\.params\.nesterov"),
    ({"scheduler": {"type": "Cosine"}}, ValueError, r"scheduler\.type must be one of .*WarmupCosineLR"),
    ({"scheduler": {"params": {}}}, ValueError, r"scheduler\.type is required"),
    ({"scheduler": {"type": "WarmupDecayLR"}}, ValueError, r"scheduler\.params\.total_num_steps is required"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "exp"}}}, ValueError,
     r"scheduler\.params\.warmup_type must be one of \['log', 'linear'\], got 'exp'"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}}, ValueError,
     r"scheduler\.params\.warmup_num_steps must be an int >= 1, got 0"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 9, "cos_min_ratio": 2}}}, ValueError,
     r"scheduler\.params\.cos_min_ratio .*\[0, 1\]"),
    ({"fp16": {"loss_scale": -1}}, ValueError, r"fp16\.loss_scale .*\[0, inf\)"),
    ({"fp16": {"hysteresis": 0}}, ValueError, r"fp16\.hysteresis must be an int >= 1"),
    ({"fp16": {"loss_scale_window": 0}}, ValueError, r"fp16\.loss_scale_window"),
    ({"fp16": {"min_loss_scale": 0}}, ValueError, r"fp16\.min_loss_scale"),
    ({"fp16": {"initial_scale_power": 2, "min_loss_scale": 8}}, ValueError, r"fp16\.min_loss_scale must be <="),
    ({"fp16": {"initial_scale_power": 200}}, ValueError, r"fp16\.initial_scale_power must be an int in \[0, 127\]"),
    ({"moe": {"split_by": "token"}}, ValueError, r"moe\.split_by must be one of \['expert', 'layer'\]"),
    ({"moe": {"max_group_size": 0}}, ValueError, r"moe\.max_group_size must be an int >= 1"),
    ({"moe": {"offload": "nvme"}}, ValueError, r"moe\.offload must be one of \['none', 'cpu'\]"),
    ({"moe": {"lr_scale": {"g/1": 0}}}, ValueError, r"moe\.lr_scale\['g/1'\]"),
    ({"moe": {"lr_scale": {"g/x": 1.0}}}, ValueError, r"moe\.lr_scale\['g/x'\] must look like"),
    ({"moe": {"freeze_experts": ["g"]}}, ValueError, r"moe\.freeze_experts\[0\] must look like"),
    ({"moe": {"freeze_experts": [-1]}}, ValueError, r"moe\.freeze_experts\[0\] must be an int >= 0"),
    ({"gradient_clipping": -1.0}, ValueError, r"gradient_clipping"),
    ({"gradient_accumulation_steps": 0}, ValueError, r"gradient_accumulation_steps must be an int >= 1"),
    ({"steps_per_print": 0}, ValueError, r"steps_per_print"),
    # bad types
    ({"optimizer": {"params": {"lr": "1e-3"}}}, TypeError, r"optimizer\.params\.lr must be a number, got str"),
    ({"optimizer": {"params": {"betas": 0.9}}}, TypeError, r"optimizer\.params\.betas must be a list"),
    ({"optimizer": "adam"}, TypeError, r"optimizer must be a mapping"),
    ({"optimizer": {"type": 3}}, TypeError, r"optimizer\.type must be a non-empty str"),
    ({"scheduler": {"type": "WarmupLR", "params": [1]}}, TypeError, r"scheduler\.params must be a mapping"),
    ({"train_micro_batch_size_per_gpu": 2.0}, TypeError, r"train_micro_batch_size_per_gpu must be an int"),
    ({"fp16": {"enabled": 1}}, TypeError, r"fp16\.enabled must be a bool"),
    ({"bf16": {"enabled": "yes"}}, TypeError, r"bf16\.enabled must be a bool"),
    ({"moe": {"freeze_experts": "0"}}, TypeError, r"moe\.freeze_experts must be a list"),
    ({"moe": {"freeze_experts": [1.0]}}, TypeError, r"moe\.freeze_experts\[0\] must be a str"),
    ({"moe": {"lr_scale": [1.0]}}, TypeError, r"moe\.lr_scale must be a mapping"),
])
def test_errors_name_the_key_path(config, error, pattern):
    with pytest.raises(error, match=pattern):
        load_config(config)


@pytest.mark.parametrize("config, pattern", [
    ({"fp16": {"initial_scale_power": True}}, r"fp16\.initial_scale_power must be an int, got bool"),
    ({"fp16": {"loss_scale": False}}, r"fp16\.loss_scale must be a number, got bool"),
    ({"gradient_clipping": True}, r"gradient_clipping must be a number, got bool"),
    ({"train_batch_size": True}, r"train_batch_size must be an int or null, got bool"),
    ({"optimizer": {"params": {"lr": True}}}, r"optimizer\.params\.lr must be a number, got bool"),
    ({"optimizer": {"params": {"betas": [True, 0.9]}}}, r"optimizer\.params\.betas\[0\] must be a number, got bool"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": True}}},
     r"scheduler\.params\.total_num_steps must be an int or null, got bool"),
    ({"moe": {"max_group_size": True}}, r"moe\.max_group_size must be an int or null, got bool"),
    ({"moe": {"lr_scale": {"g": True}}}, r"moe\.lr_scale\['g'\] must be a number, got bool"),
    ({"moe": {"freeze_experts": [False]}}, r"moe\.freeze_experts\[0\] must be a str .* or an int >= 0, got bool"),
])
def test_bools_rejected_as_numbers(config, pattern):
    with pytest.raises(TypeError, match=pattern):
        load_config(config)


@pytest.mark.parametrize("config, pattern", [
    ({"train_batch": 8},
     r"unknown key 'train_batch'; allowed keys at the top level: activation_checkpointing, bf16, checkpoint, .*steps_per_print"),
    ({"optimizer": {"type": "Adam", "param": {}}}, r"unknown key 'optimizer\.param'; allowed keys under optimizer: "
                                                   r"params, type"),
    ({"optimizer": {"type": "Adam", "params": {"momentum": 0.9}}},
     r"unknown key 'optimizer\.params\.momentum'; allowed keys under optimizer\.params: adam_w_mode, amsgrad, betas"),
    ({"optimizer": {"type": "SGD", "params": {"betas": [0.9, 0.9]}}}, r"unknown key 'optimizer\.params\.betas'"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_max_lr": 1.0}}},
     r"unknown key 'scheduler\.params\.warmup_max_lr'; allowed keys under scheduler\.params: cos_min_ratio"),
    ({"scheduler": {"type": "StepLR", "params": {"step_size": 2, "steps": 3}}},
     r"unknown key 'scheduler\.params\.steps'; torch\.optim\.lr_scheduler\.StepLR takes: step_size, gamma"),
    ({"moe": {"ep_size": 2}}, r"unknown key 'moe\.ep_size'; allowed keys under moe: freeze_experts, lr_scale"),
])
def test_unknown_keys(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(config)


@pytest.mark.parametrize("config, pattern", [
    # features moesaic lacks: refused by name with the reason, whatever the value
    ({"zero_optimization": {"stage": 1, "offload_param": {}}},
     r"zero_optimization\.offload_param is a DeepSpeed key that moesaic does not support: parameter offload"),
    ({"zero_optimization": {"stage3_max_live_parameters": 1e9}},
     r"zero_optimization\.stage3_max_live_parameters .*ZeRO-3"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "nvme_path": "/x"}}},
     r"zero_optimization\.offload_optimizer\.nvme_path .*NVMe"),
    ({"activation_checkpointing": {"partition_activations": True}},
     r"activation_checkpointing\.partition_activations=True is not supported by moesaic: .*tensor parallelism"),
    ({"pipeline": {"stages": 2}}, r"pipeline .*no tensor, pipeline or sequence parallelism"),
    # values describing something moesaic does not do: refused with what it does instead
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
     r"zero_optimization\.offload_optimizer\.device='nvme' is not supported by moesaic"),
    ({"fp16": {"enabled": True, "auto_cast": True}}, r"fp16\.auto_cast=True is not supported by moesaic"),
    ({"bf16": {"enabled": True, "immediate_grad_update": True}}, r"bf16\.immediate_grad_update=True is not supported"),
    ({"communication_data_type": "fp16"}, r"communication_data_type='fp16' is not supported by moesaic: .*fp32"),
    ({"gradient_predivide_factor": 2.0}, r"gradient_predivide_factor=2\.0 is not supported"),
    ({"optimizer": {"type": "Adam", "params": {"amsgrad": True}}}, r"optimizer\.params\.amsgrad=True is not supported"),
    ({"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}}, r"type AdamW always decouples weight decay"),
    ({"scheduler": {"type": "OneCycle"}}, r"scheduler\.type='OneCycle' is not supported by moesaic: .*OneCycleLR"),
])
def test_deepspeed_keys_refused_with_reason(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(config)


def test_deepspeed_keys_accepted():
    """A DeepSpeed ZeRO-2 config as its docs write it: what moesaic does is accepted, bucket sizes are honoured."""
    cfg = load_config({
        "train_batch_size": 16, "steps_per_print": 100, "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True, "communication_data_type": "fp32",
        "fp16": {"enabled": True, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": False, "check_grad_overflow": True},
        "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                              "overlap_comm": False, "reduce_scatter": True, "reduce_bucket_size": 5e8,
                              "contiguous_gradients": True, "offload_optimizer": {"device": "cpu"}},
        "flops_profiler": {"enabled": False}, "wandb": {"enabled": False},
        "checkpoint": {"tag_validation": "fail"}})
    z = cfg.zero_optimization
    assert (z.stage, z.reduce_bucket_size, z.allgather_bucket_size) == (2, 500_000_000, 200_000_000)
    assert cfg.offload() == "cpu" and cfg.checkpoint.tag_validation == "Fail"
    assert load_config({"zero_optimization": {"cpu_offload": True}}).offload() == "cpu"
    assert load_config({"zero_optimization": {"stage": 1, "overlap_comm": True}}).zero_optimization.overlap_comm
    with pytest.raises(TypeError, match=r"zero_optimization\.overlap_comm must be a bool"):
        load_config({"zero_optimization": {"overlap_comm": "yes"}})


def test_bf16_and_fp16_conflict():
    with pytest.raises(ValueError, match=r"bf16\.enabled and fp16\.enabled are both true"):
        load_config({"bf16": {"enabled": True}, "fp16": {"enabled": True}})
    assert load_config({"bf16": {"enabled": True}, "fp16": {"enabled": False}}).bf16.enabled


def test_dataclasses_validate_on_construction():
    with pytest.raises(ValueError, match=r"fp16\.hysteresis"):
        FP16Config(hysteresis=0)
    with pytest.raises(TypeError, match="fp16 must be a FP16Config"):
        EngineConfig(fp16={"enabled": True})
    cfg = OptimizerConfig("sgd", {"lr": 1})
    assert cfg.type == "SGD" and cfg.params["lr"] == 1.0 and isinstance(cfg.params["lr"], float)
    with pytest.raises(AttributeError):
        cfg.type = "Adam"  # frozen
    moe = MoEOptimConfig(lr_scale={"g/03": 2}, freeze_experts=["g/007"])
    assert moe.lr_scale == {"g/3": 2.0} and moe.freeze_experts == ("g/7",)  # expert numbers normalized


def test_file_errors(tmp_path):
    bad_json = tmp_path / "c.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_config(bad_json)
    bad_toml = tmp_path / "c.toml"
    bad_toml.write_text("a = = 1")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(bad_toml)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("a: 1")
    with pytest.raises(ValueError, match=r"must end in \.json or \.toml"):
        load_config(yaml)
    top_list = tmp_path / "list.json"
    top_list.write_text("[1, 2]")
    with pytest.raises(TypeError, match="config must be a mapping"):
        load_config(top_list)
    with pytest.raises(TypeError, match="config must be a dict, a path"):
        load_config(42)


def test_zero_optimization_stages():
    for stage in (0, 1, 2, 3):
        assert load_config({"zero_optimization": {"stage": stage}}).zero_optimization.stage == stage
    for bad in (4, -1):
        with pytest.raises(ValueError, match=rf"zero_optimization\.stage must be one of \[0, 1, 2, 3\], got {bad}"):
            load_config({"zero_optimization": {"stage": bad}})
    with pytest.raises(TypeError, match=r"zero_optimization\.stage must be an int, got str: '1'"):
        load_config({"zero_optimization": {"stage": "1"}})


def test_schedule_length_is_required_by_the_deepspeed_dict_only():
    # the section itself may leave total_num_steps open (moesaic train fills it from train.steps) ...
    cfg = EngineConfig.from_dict({"scheduler": {"type": "WarmupCosineLR"}})
    assert cfg.scheduler.params["total_num_steps"] is None and cfg.scheduler.needs_total()
    assert cfg.scheduler.with_total(50).params["total_num_steps"] == 50
    # ... but moesaic.initialize's config must say how long the schedule is, as DeepSpeed's does
    with pytest.raises(ValueError, match=r"scheduler\.params\.total_num_steps is required for scheduler type "
                                         r"WarmupCosineLR"):
        load_config(cfg)
    assert not load_config({"scheduler": {"type": "WarmupLR"}}).scheduler.needs_total()  # WarmupLR has no length


def test_sections_report_their_path_inside_a_bigger_tree():
    with pytest.raises(ValueError, match=r"^engine\.fp16\.hysteresis must be an int >= 1, got 0$"):
        EngineConfig.from_dict({"fp16": {"hysteresis": 0}}, "engine")
    with pytest.raises(ValueError, match=r"unknown key 'engine\.optimizer\.params\.momentum'"):
        EngineConfig.from_dict({"optimizer": {"params": {"momentum": 0.9}}}, "engine")
    with pytest.raises(ValueError, match=r"engine\.bf16\.enabled and engine\.fp16\.enabled are both true"):
        EngineConfig.from_dict({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "engine")
    with pytest.raises(ValueError, match=r"set engine\.train_batch_size or engine\.train_micro_batch_size_per_gpu"):
        EngineConfig().check_batch(1, "engine")


def test_each_default_has_one_source():
    """The optimizer takes its hyperparameter defaults from the config; the schedule constructors agree with it."""
    import inspect

    from moesaic.optim import mixed_precision, schedulers
    from moesaic.optim.config import SCHEDULER_PARAMS, optimizer_defaults

    for kind in ("AdamW", "Adam", "SGD"):
        assert mixed_precision._DEFAULTS[kind] == optimizer_defaults(kind) == OptimizerConfig(kind).update()[1]
    for kind in SCHEDULER_PARAMS:
        ctor = inspect.signature(getattr(schedulers, kind)).parameters
        for name, default in SchedulerConfig(kind).params.items():
            if name != "total_num_steps":  # required by the constructors; the config leaves it open
                assert ctor[name].default == default, (kind, name)


def test_deepspeed_hints_accepted_and_noted_once(capsys):
    """Speed, memory-placement and logging hints cannot change the numbers: accepted, each noted once."""
    from moesaic.deepspeed import keys as deepspeed_keys
    raw = {"train_micro_batch_size_per_gpu": 2, "tensorboard": {"enabled": True, "output_path": "x"},
           "comms_logger": {"enabled": True}, "memory_breakdown": True,
           "zero_optimization": {"stage": 1, "elastic_checkpoint": True, "contiguous_gradients": False,
                                 "round_robin_gradients": True, "cpu_offload_use_pin_memory": True,
                                 "offload_optimizer": {"device": "cpu", "buffer_count": 4}}}
    cfg = load_config(raw)
    assert cfg.zero_optimization.stage == 1 and cfg.offload() == "cpu"
    notes = deepspeed_keys.hint_notes(raw)
    assert [n.split(":")[0] for n in notes] == [
        "tensorboard", "comms_logger", "memory_breakdown=true", "zero_optimization.elastic_checkpoint=true",
        "zero_optimization.contiguous_gradients=false", "zero_optimization.round_robin_gradients=true",
        "zero_optimization.cpu_offload_use_pin_memory", "zero_optimization.offload_optimizer.buffer_count"]
    assert all("cannot change the numbers" in n for n in notes)
    assert deepspeed_keys.hint_notes({"zero_optimization": {"contiguous_gradients": True}}) == []
    seen = []
    deepspeed_keys._NOTED.clear()
    deepspeed_keys.note_hints_once(raw, seen.append)
    deepspeed_keys.note_hints_once(raw, seen.append)
    assert len(seen) == len(notes)  # once per process
