"""Stage 3's optimizer over stacked experts, one process (no sharding): stage 0-2's groups and numbers.

* ``build_zero3_groups`` gives a stacked layer one group per expert with stage 0-2's names and
  ``lr_scale`` (``build_param_groups``);
* ``Zero3Optimizer`` steps each expert's slice at its group's learning rate as moesaic's stage 0
  optimizer does (AdamW, Adam, SGD with momentum and Nesterov);
* a stage-3 checkpoint written before this (one ``params/ffn/stacked`` group per layer, fixture
  tests/unit/data/checkpoint_v3_stage3_stacked_layer_group) loads, its layer group's settings
  carried to every expert's group.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import moesaic  # noqa: E402
from moesaic.layer.identity import ExpertIndex  # noqa: E402
from moesaic.optim.build_groups import build_param_groups  # noqa: E402
from moesaic.optim.zero3 import Zero3Optimizer, build_zero3_groups  # noqa: E402
from support.moe_net import MoENet  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "checkpoint_v3_stage3_stacked_layer_group"
LR_SCALE = {"ffn/1": 2.0, "ffn": 0.5}


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)


def test_groups_are_stage0s_per_expert_groups():
    model = MoENet(1, use_rts=False, stacked=True)
    index = ExpertIndex.build(model)
    z3 = build_zero3_groups(model, index, lr_scale=LR_SCALE)
    z0 = build_param_groups(model, index=index, lr_scale=LR_SCALE)
    assert [g["name"] for g in z3] == [g["name"] for g in z0] == \
        ["params", "params/ffn/expert_0", "params/ffn/expert_1", "params/ffn/expert_2", "params/ffn/expert_3"]
    assert [g.get("lr_scale", 1.0) for g in z3] == [g.get("lr_scale", 1.0) for g in z0] == [1.0, 0.5, 2.0, 0.5, 0.5]
    assert [[r.name for r in g["params"]] for g in z3[1:]] == [[r.name for r in g["params"]] for g in z0[1:]]
    other = MoENet(1, stacked=True)
    by_layer = build_zero3_groups(other, ExpertIndex.build(other), split_by="layer")
    assert [g["name"] for g in by_layer] == ["params", "params/ffn"]


@pytest.mark.parametrize("kind,params", [("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
                                         ("Adam", {"lr": 1e-2, "weight_decay": 0.1}),
                                         ("SGD", {"lr": 1e-1, "momentum": 0.9, "nesterov": True,
                                                  "weight_decay": 0.01})])
def test_each_expert_steps_as_at_stage0(kind, params):
    ref = MoENet(1, use_rts=False, stacked=True)
    engine, *_ = moesaic.initialize(model=ref, config={
        "train_micro_batch_size_per_gpu": 12, "moe": {"lr_scale": LR_SCALE},
        "optimizer": {"type": kind, "params": {**params, **({"adam_w_mode": False} if kind == "Adam" else {})}}})
    assert engine.optimizer.kind == kind
    model = MoENet(1, use_rts=False, stacked=True)
    index = ExpertIndex.build(model)
    opt = Zero3Optimizer(build_zero3_groups(model, index, lr_scale=LR_SCALE), kind, params, index=index)
    assert opt.group_names() == [g["name"] for g in engine.optimizer.param_groups]
    for step in range(3):
        engine.backward(engine(*_batch(step)))
        engine.step()
        model(*_batch(step)).backward()
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{kind} {name}: {m}")
    stacked = next(p for p in model.parameters() if getattr(p, "moe_stacked", None) is not None)
    assert int(opt.state[stacked]["step"]) == 3
    assert all(p.grad is None for p in model.parameters())


def test_duplicate_members_are_refused():
    model = MoENet(1, stacked=True)
    index = ExpertIndex.build(model)
    groups = build_zero3_groups(model, index)
    groups[1]["params"] = groups[1]["params"] + groups[2]["params"][:1]
    with pytest.raises(ValueError, match="is in groups 'params/ffn/expert_0' and 'params/ffn/expert_1'"):
        Zero3Optimizer(groups, "AdamW", {"lr": 1e-2}, index=index)
    with pytest.raises(TypeError, match=r"groups\[0\] \('params'\) holds a str"):
        Zero3Optimizer([{"name": "params", "params": ["w"]}], "AdamW", {"lr": 1e-2}, index=index)


def test_a_stage3_checkpoint_with_the_old_layer_group_loads_its_settings_into_each_experts_group():
    model = MoENet(1, use_rts=False, stacked=True)
    engine, *_ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 12, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    assert [g["lr_scale"] for g in engine.optimizer.param_groups] == [1.0] * 5
    engine.load_checkpoint(str(FIXTURE), tag="step2")
    saved = load_file(str(FIXTURE / "state_dict.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    # the old "params/ffn/stacked" group held the layer's lr_scale 0.5 and weight decay 0.1: every expert's now
    groups = {g["name"]: g for g in engine.optimizer.param_groups}
    assert [groups[f"params/ffn/expert_{n}"]["lr_scale"] for n in range(4)] == [0.5] * 4
    assert [groups[f"params/ffn/expert_{n}"]["weight_decay"] for n in range(4)] == [0.1] * 4
    assert groups["params"]["lr_scale"] == 1.0
    stacked = next(p for p in model.parameters() if getattr(p, "moe_stacked", None) is not None)
    assert float(moesaic.safe_get_full_optimizer_state(stacked, "exp_avg").abs().sum()) > 0


def test_state_dict_round_trips_by_name():
    model = MoENet(1, use_rts=False, stacked=True)
    index = ExpertIndex.build(model)
    opt = Zero3Optimizer(build_zero3_groups(model, index, lr_scale=LR_SCALE), "AdamW", {"lr": 1e-2}, index=index)
    model(*_batch(0)).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["optimizer"] == "AdamW" and sorted(sd["state"]) == sorted(r.name for r in index)
    assert all(sd["state"][r.name]["exp_avg"].shape == r.shape for r in index)  # a stacked expert: its slice
    assert any(r.index is not None for r in index)
    again = Zero3Optimizer(build_zero3_groups(model, index), "AdamW", {"lr": 1e-2}, index=index)
    again.load_state_dict(sd)
    for p in model.parameters():
        for f in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(again.state[p][f], opt.state[p][f])
        assert int(again.state[p]["step"]) == 1
    assert [g["lr_scale"] for g in again.param_groups] == [g["lr_scale"] for g in opt.param_groups]
