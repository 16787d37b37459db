"""DeepSpeed-only config keys live in the DeepSpeed bridge, not in the core engine config.

The bridge (``moesaic.initialize``, ``moesaic.deepspeed.load_config``, ``moesaic train``'s
``[engine]``) accepts them with the values describing what moesaic does and drops them; the core
``EngineConfig`` given one directly names the bridge. Configs written before the keys moved (a
checkpoint's engine.json, a run's run.json) still read.
"""

import json
from dataclasses import fields
from pathlib import Path

import pytest

from moesaic._config import MISSING
from moesaic.deepspeed import load_config
from moesaic.deepspeed.accepted import ACCEPTED, accepted_rows
from moesaic.engine import EngineConfig
from moesaic.optim.config import DEEPSPEED_ONLY, OPTIMIZER_PARAMS
from moesaic.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
# written by the code before the keys moved (commit 45dc1af): every engine key at its default, the moved ones too
OLD_ENGINE = json.loads((Path(__file__).parent / "data" / "checkpoint_v2_deepspeed_nesting" / "step3"
                         / "engine.json").read_text())["config"]


def _core_section(path):
    if path == "optimizer.params":
        return OPTIMIZER_PARAMS["Adam"]
    cls = EngineConfig
    for part in path.split(".") if path else ():
        cls = next(f.metadata["section"] for f in fields(cls) if f.name == part)
    return cls


def _with(path, key, value):
    data = {"train_batch_size": 2}
    node = data
    for part in path.split(".") if path else ():
        node = node.setdefault(part, {})
    node[key] = value
    return data


ROWS = [(where, f.name, f.default) for where, cls in ACCEPTED.items() for f in fields(cls)]


def test_the_core_names_exactly_the_bridge_s_keys():
    """Each core section's MOVED table lists the bridge's keys at its path, and holds none of them as a setting."""
    for where, cls in ACCEPTED.items():
        core = _core_section(where)
        names = {f.name for f in fields(cls)}
        assert {k for k, v in core.MOVED.items() if v == DEEPSPEED_ONLY} == names, where
        assert not names & {f.name for f in fields(core)}, where
    assert OPTIMIZER_PARAMS["AdamW"].MOVED == OPTIMIZER_PARAMS["Adam"].MOVED and not OPTIMIZER_PARAMS["SGD"].MOVED
    documented = {row.path for row in accepted_rows()}  # docs/config-reference.md's table of them
    assert {f"{w}.{k}".lstrip(".") for w, k, _ in ROWS if k != "activation_checkpointing"} < documented
    assert "activation_checkpointing.partition_activations" in documented


@pytest.mark.parametrize("where, key, default", ROWS, ids=[f"{w}.{k}".lstrip(".") for w, k, _ in ROWS])
def test_the_bridge_accepts_the_key_and_the_core_names_the_bridge(where, key, default):
    value = {} if default is MISSING or key == "activation_checkpointing" else default
    assert load_config(_with(where, key, value)) == load_config({"train_batch_size": 2})  # it changes nothing
    path = f"{where}.{key}".lstrip(".")
    with pytest.raises(ValueError, match=rf"^{path} is a key of DeepSpeed's config, not a setting of moesaic's "
                                         r"engine: the DeepSpeed bridge accepts it \(moesaic\.initialize and "
                                         r"moesaic\.deepspeed\.load_config"):
        EngineConfig.from_dict(_with(where, key, value))
    # moesaic train's [engine] reads through the bridge: --set works, a refused value names the engine. path
    cfg = load_train_config(TINY, {f"engine.{path}": value})
    assert cfg == load_train_config(TINY)


@pytest.mark.parametrize("config, pattern", [
    ({"prescale_gradients": True}, r"^engine\.prescale_gradients=True is not supported by moesaic: .*divides after "
                                   r"the sum.*; allowed: false$"),
    ({"bf16": {"immediate_grad_update": True}}, r"^engine\.bf16\.immediate_grad_update=True is not supported"),
    ({"zero_optimization": {"load_from_fp32_weights": False}},
     r"^engine\.zero_optimization\.load_from_fp32_weights=False is not supported by moesaic: .*fp32 copy"),
    ({"activation_checkpointing": {"partition": False}},
     r"^unknown key 'engine\.activation_checkpointing\.partition'; allowed keys under "
     r"engine\.activation_checkpointing: contiguous_memory_optimization"),
    ({"zero_optimization": {"stages": 1}}, r"^unknown key 'engine\.zero_optimization\.stages'; allowed keys under "
                                           r"engine\.zero_optimization: allgather_bucket_size, allgather_partitions"),
])
def test_under_moesaic_train_the_messages_name_the_engine_path(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_train_config(TINY, {f"engine.{k}": v for k, v in config.items()})


def test_torch_adam_belongs_to_adam_only():
    assert load_config({"optimizer": {"type": "adam", "params": {"torch_adam": True}}}) == \
        load_config({"optimizer": {"type": "Adam"}})
    with pytest.raises(ValueError, match=r"unknown key 'optimizer\.params\.torch_adam'; allowed keys under "
                                         r"optimizer\.params: dampening, lr, momentum, nesterov, weight_decay$"):
        load_config({"optimizer": {"type": "SGD", "params": {"torch_adam": False}}})


def test_configs_written_before_the_move_still_read():
    """engine.json's config and run.json's engine section, as the code before the move wrote them (every key at its
    value, the DeepSpeed-only ones included), read through the bridge into the same engine config."""
    assert {"prescale_gradients", "activation_checkpointing", "zero_force_ds_cpu_optimizer"} <= set(OLD_ENGINE)
    cfg = load_config(OLD_ENGINE)
    core = {k: v for k, v in OLD_ENGINE.items() if k not in EngineConfig.MOVED}
    assert cfg.to_dict()["optimizer"] == {**core["optimizer"], "params": {
        k: v for k, v in core["optimizer"]["params"].items() if k != "torch_adam"}}
    assert cfg == EngineConfig.from_dict(load_config(OLD_ENGINE).to_dict())
    old_run = load_train_config(TINY).to_dict()
    old_run["engine"] = OLD_ENGINE  # run.json {"config": ...} of a run written then
    assert load_train_config(json.loads(json.dumps(old_run))).engine == cfg


def test_deepspeed_s_optimizer_and_schedule_names_are_refused_by_the_bridge():
    """The reasons for DeepSpeed's names (its own, and torch.optim's) live in the bridge; the core lists its own."""
    from moesaic.optim.config import OptimizerConfig, SchedulerConfig

    for config, pattern in (({"optimizer": {"type": "OneBitAdam"}}, r"^optimizer\.type='OneBitAdam' is not supported "
                                                                    r"by moesaic: DeepSpeed's 1-bit Adam"),
                            ({"optimizer": {"type": "RMSprop"}}, r"^optimizer\.type='RMSprop' is not supported by "
                                                                 r"moesaic: torch\.optim\.RMSprop is not implemented"),
                            ({"scheduler": {"type": "LRRangeTest"}}, r"^scheduler\.type='LRRangeTest' is not "
                                                                     r"supported by moesaic: DeepSpeed's LRRangeTest")):
        with pytest.raises(ValueError, match=pattern):
            load_config(config)
        with pytest.raises(ValueError, match=pattern.replace("^", "^engine\\.")):
            load_train_config(TINY, {f"engine.{k}.type": v["type"] for k, v in config.items()})
    with pytest.raises(ValueError, match=r"^optimizer\.type must be one of \['AdamW', 'Adam', 'SGD'\] \(any case\), "
                                         r"got 'OneBitAdam'$"):
        OptimizerConfig("OneBitAdam")
    with pytest.raises(ValueError, match=r"^scheduler\.type must be one of WarmupLR, .* got 'LRRangeTest'$"):
        SchedulerConfig("LRRangeTest")


def test_the_moved_section_class_names_its_new_place():
    import moesaic.engine.config
    from moesaic.deepspeed.accepted import ActivationCheckpointingConfig

    with pytest.raises(AttributeError, match=r"moesaic\.engine\.config\.ActivationCheckpointingConfig moved: use "
                                             r"moesaic\.deepspeed\.accepted\.ActivationCheckpointingConfig"):
        moesaic.engine.config.ActivationCheckpointingConfig
    assert ActivationCheckpointingConfig().profile is False


def test_cpu_offload_is_deepspeed_s_former_spelling_of_the_offload_device():
    for zero in ({"cpu_offload": True}, {"cpu_offload": True, "offload_optimizer": {"device": "none"}},
                 {"cpu_offload": False, "offload_optimizer": {"device": "cpu"}}):
        assert load_config({"zero_optimization": zero}).offload() == "cpu", zero
    assert load_config({"zero_optimization": {"cpu_offload": False}}).offload() == "none"
    with pytest.raises(TypeError, match=r"^zero_optimization\.cpu_offload must be a bool"):
        load_config({"zero_optimization": {"cpu_offload": "yes"}})
