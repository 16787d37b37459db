"""shard_model refuses bad input before any process-group work (no torch.distributed needed here)."""

import pytest
import torch
from torch import nn

import moesaic
from moesaic.optim.fsdp import check_shardable, clip_grad_norm_, grad_norm, shard_info


def _net(ep_size=2, name="ffn"):
    return nn.Sequential(nn.Linear(4, 4), moesaic.MoE(4, nn.Linear(4, 4), num_experts=4, ep_size=ep_size,
                                                      expert_group_name=name))


def test_mesh_that_does_not_divide_the_world_names_the_layer():
    with pytest.raises(ValueError, match=r"MoE layer 'ffn'.*ep_size=2.*does not divide the world of 3.*\[1, 3\]"):
        check_shardable(_net(2), 3)
    check_shardable(_net(2), 4)


def test_low_precision_model_is_refused_naming_the_parameter():
    with pytest.raises(ValueError, match=r"parameter '0.weight' is torch.bfloat16.*model.float\(\)"):
        check_shardable(_net(1).to(torch.bfloat16), 2)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"param_dtype": "bf16"}, TypeError, "param_dtype must be a floating torch.dtype"),
    ({"reduce_dtype": torch.int32}, TypeError, "reduce_dtype must be a floating torch.dtype"),
    ({"reshard_after_forward": 0}, ValueError, "reshard_after_forward must be a bool or an int >= 1"),
    ({"use_data_before_expert_parallel_": 1}, TypeError, "use_data_before_expert_parallel_ must be a bool"),
    ({"collectives": "nccl"}, ValueError, "collectives must be 'auto' or 'torch', got 'nccl'"),
    ({}, RuntimeError, "shard_model needs torch.distributed"),
])
def test_bad_arguments_fail_before_process_group_work(kwargs, err, match):
    with pytest.raises(err, match=match):
        moesaic.shard_model(_net(1), **kwargs)
    assert not torch.distributed.is_initialized()


def test_not_a_module_and_bad_world():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        check_shardable("model", 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        check_shardable(_net(1), 0)


def test_clip_on_one_process_matches_torch():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    got = clip_grad_norm_(a.parameters(), 0.1)
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    torch.testing.assert_close(got, want)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(grad_norm(a.parameters(), float("inf")),
                               max(p.grad.abs().max() for p in a.parameters()))
    with pytest.raises(ValueError, match="max_norm must be a number > 0"):
        clip_grad_norm_(a.parameters(), 0)
    with pytest.raises(ValueError, match="norm_type must be 2.0 or math.inf"):
        grad_norm(a.parameters(), 1.0)
    assert shard_info(a) is None


def _config(**over):
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 3}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


@pytest.mark.parametrize("over,kwargs,match", [
    ({}, {"optimizer": "client"}, r"stage=3 builds its own torch optimizer .*pass optimizer=None"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, {}, r"stage=3 with CPU offload .*allowed: "
                                                                           r"offload 'none'"),
    ({"zero_optimization": {"reduce_scatter": False}}, {}, r"reduce_scatter=false with stage=3: FSDP2 always"),
    ({"zero_optimization": {"stage3_max_live_parameters": 10}}, {}, r"stage3_max_live_parameters .*FSDP2\) gathers "
                                                                    r"one unit"),
    ({"zero_optimization": {"stage3_prefetch_bucket_size": 10}}, {}, r"prefetches whole units"),
    # DeepSpeed's keys with an FSDP2 meaning: the values that say what FSDP2 does are accepted, others refused
    ({"zero_optimization": {"stage3_max_reuse_distance": 1e9}}, {},
     r"stage3_max_reuse_distance=1000000000.0 is not supported .*not by a reuse distance .*set "
     r"zero_optimization.reshard_after_forward false instead; allowed: null or 0"),
    ({"zero_optimization": {"max_reuse_distance": 5}}, {}, r"max_reuse_distance=5 is not supported"),
    ({"zero_optimization": {"stage3_param_persistence_threshold": 1e4}}, {},
     r"stage3_param_persistence_threshold=10000.0 is not supported .*shards every parameter of every unit"),
    ({"zero_optimization": {"param_persistence_threshold": 1}}, {}, r"param_persistence_threshold=1 is not supported"),
    ({"zero_optimization": {"stage3_max_reuse_distance": 0, "reshard_after_forward": False}}, {},
     r"stage3_max_reuse_distance=0 .*contradicts zero_optimization.reshard_after_forward=false"),
    ({"zero_optimization": {"stage": 2, "reshard_after_forward": False}}, {},
     r"reshard_after_forward=false is a stage-3 setting .*stage=2"),
    ({"zero_optimization": {"reshard_after_forward": "no"}}, {}, r"reshard_after_forward must be a bool"),
    ({"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True}}, {},
     r"stage-3 checkpoints store each rank's fp32 rows by identity"),
    # accepted: FSDP2's meaning; the refusal that follows is the missing process group
    ({"zero_optimization": {"stage3_max_reuse_distance": 0, "stage3_param_persistence_threshold": 0,
                            "param_persistence_threshold": 0, "max_reuse_distance": None}}, {},
     r"stage=3 shards parameters with torch's FSDP2 and needs torch.distributed"),
    ({"zero_optimization": {"reshard_after_forward": False}}, {},
     r"stage=3 shards parameters with torch's FSDP2 and needs torch.distributed"),
    ({}, {}, r"stage=3 shards parameters with torch's FSDP2 and needs torch.distributed: call "
             r"moesaic.init_distributed\(\) before moesaic.initialize \(one process started without a launcher joins "
             r"a group of itself alone"),
])
def test_initialize_stage3_refusals_come_before_process_group_work(over, kwargs, match):
    model = _net(1)
    if kwargs.get("optimizer") == "client":
        kwargs = {"optimizer": torch.optim.AdamW(model.parameters())}
    with pytest.raises((ValueError, TypeError), match=match):
        moesaic.initialize(model=model, config=_config(**over), **kwargs)
    assert not torch.distributed.is_initialized()


def test_initialize_stage3_mesh_that_does_not_divide_the_world(monkeypatch):
    # a launched job of 3 processes (as torchrun would say), a layer of ep_size 2: refused before joining
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match=r"MoE layer 'ffn' .*ep_size=2, which does not divide the world of 3"):
        moesaic.initialize(model=_net(2), config=_config())
    assert not torch.distributed.is_initialized()
