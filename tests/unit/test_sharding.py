"""ZeRO ownership of optimizer groups: deterministic, balanced, experts kept whole, visible."""

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer.identity import ExpertIndex
from moesaic.optim.build_groups import build_param_groups
from moesaic.optim.mixed_precision import GroupedMixedPrecisionOptimizer
from moesaic.optim.sharding import ReplicaSet, ShardPlan, plan_shards


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), moesaic.MoE(8, nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)),
                                                   num_experts=4, k=2, drop_tokens=False))
    moesaic.name_moe_layers(m)
    return m


def test_one_process_owns_everything_and_splitting_keeps_experts_whole():
    m = model()
    index = ExpertIndex.build(m)
    groups = build_param_groups(m, index=index, max_group_size=100)  # experts of 296 elements: 3+ parts each
    plan = plan_shards([g["name"] for g in groups], [g["params"] for g in groups], index, stage=2)
    assert set(plan.owner) == {0} and all(plan.owns(gi) for gi in range(len(groups)))
    assert {rs.key for rs in plan.replica_sets()} == {("dense",), ("experts", 1, False)}


def test_assignment_is_balanced_largest_first_and_deterministic(monkeypatch):
    # 4 dense groups on 2 ranks, sizes b=7, d=5, a=4, c=2 taken largest first, each to the least
    # loaded rank: b -> 0 (0/0, tie to the lower), d -> 1 (7/0), a -> 1 (7/5), c -> 0 (7/9)
    from moesaic.layer.identity import ParamRef
    import moesaic.optim.sharding as sharding
    tensors = {n: nn.Parameter(torch.zeros(size)) for n, size in (("a", 4), ("b", 7), ("c", 2), ("d", 5))}
    refs = [[ParamRef(n, p)] for n, p in tensors.items()]
    monkeypatch.setattr(sharding, "_world", lambda: (1, 2))  # this process plays rank 1 of 2
    plan = plan_shards(list(tensors), refs, ExpertIndex([r[0] for r in refs], {}), stage=1)
    assert plan.ownership() == {"b": 0, "d": 1, "a": 1, "c": 0}
    assert plan.owns(0) and not plan.owns(1) and plan.steps(3) and not plan.steps(2)
    assert plan_shards(list(tensors), refs, ExpertIndex([r[0] for r in refs], {}), stage=1).owner == plan.owner


def test_only_owned_groups_hold_state():
    m = model()
    index = ExpertIndex.build(m)
    groups = build_param_groups(m, index=index)
    refs = [g["params"] for g in groups]
    names = [g["name"] for g in groups]
    rs = ReplicaSet(("dense",), None, (0, 1))
    plan = ShardPlan(stage=1, rank=0, world_size=2, owner=[0, 1, 0, 1, 0], replica=[rs] * 5, names=names)
    opt = GroupedMixedPrecisionOptimizer(groups, "AdamW", index=index, shard=plan)
    owned = {r.name for gi in (0, 2, 4) for r in refs[gi]}
    assert set(opt.state_names()) == owned
    assert set(opt.state_dict()["state"]) == owned
    assert opt.ownership() == dict(zip(names, [0, 1, 0, 1, 0]))
    assert all(opt.writes_state(n) for n in owned)


def test_bad_stage():
    m = model()
    index = ExpertIndex.build(m)
    with pytest.raises(ValueError, match=r"zero_optimization.stage must be one of \[0, 1, 2\], got 3"):
        plan_shards([], [], index, stage=3)
