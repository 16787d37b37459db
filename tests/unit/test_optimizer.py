"""Group-by-group mixed-precision optimizer: same math as torch.optim, bounded fp32 working set."""

import copy

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer.identity import ExpertIndex
from moesaic.optim.build_groups import build_param_groups, freeze_experts
from moesaic.optim.mixed_precision import GroupedMixedPrecisionOptimizer


def model_with_moe(seed=0, experts=4):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 8), moesaic.MoE(8, nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)),
                                                   num_experts=experts, k=2, drop_tokens=False,
                                                   top2_2nd_expert_sampling=False))
    moesaic.name_moe_layers(m)
    return m


def loss_of(m, x):
    h = m[0](x)
    out, l_aux, _ = m[1](h)
    return out.pow(2).mean() + 0.01 * l_aux


@pytest.mark.parametrize("kind,hyper", [
    ("AdamW", dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.05)),
    ("SGD", dict(lr=1e-1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True)),
    ("SGD", dict(lr=1e-1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)),
])
@pytest.mark.parametrize("fuse", [None, 10**9])
def test_fp32_matches_torch_optim(kind, hyper, fuse):
    ours_m, ref_m = model_with_moe(), model_with_moe()
    groups = build_param_groups(ours_m, index=ExpertIndex.build(ours_m), split_by="expert")
    assert len(groups) == 1 + 4  # dense + one per expert
    opt = GroupedMixedPrecisionOptimizer(groups, kind, hyper, fuse_elems=fuse)
    ref = getattr(torch.optim, kind)(ref_m.parameters(), **hyper)
    for step in range(5):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        loss_of(ours_m, x).backward()
        loss_of(ref_m, x).backward()
        opt.step()
        ref.step()
        ref.zero_grad()
        for p in ours_m.parameters():
            assert p.grad is None, "gradients are released as each group is stepped"
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_master_weights_follow_fp32_math():
    ours_m = model_with_moe().to(torch.bfloat16)
    ref_m = model_with_moe()  # fp32 copy of the same init
    ref_m.load_state_dict({k: v.float() for k, v in ours_m.state_dict().items()})
    groups = build_param_groups(ours_m, index=ExpertIndex.build(ours_m), split_by="expert", max_group_size=None)
    opt = GroupedMixedPrecisionOptimizer(groups, "AdamW", dict(lr=1e-2, weight_decay=0.01))
    ref = torch.optim.AdamW(ref_m.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(3):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        loss_of(ours_m, x.bfloat16()).float().backward()
        # the reference sees exactly the (upcast) bf16 gradients
        for p_ref, p in zip(ref_m.parameters(), ours_m.parameters()):
            p_ref.grad = p.grad.float()
        opt.step()
        ref.step()
    for gi, g in enumerate(opt.param_groups):
        for p, master in zip(g["params"], opt.masters(gi)):
            assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
            assert torch.equal(p, master.to(torch.bfloat16)), "model weights are the rounded masters"
    masters = [m for gi in range(len(opt.param_groups)) for m in opt.masters(gi)]
    ours_by_id = {id(p): m for gi, g in enumerate(opt.param_groups) for p, m in zip(g["params"], opt.masters(gi))}
    for p, p_ref in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(ours_by_id[id(p)], p_ref, atol=1e-6, rtol=1e-5)
    assert len(masters) == len(list(ours_m.parameters()))


def test_fp32_working_set_is_one_group():
    m = model_with_moe(experts=8).to(torch.bfloat16)
    expert_size = sum(p.numel() for p in m[1].experts[0].parameters())
    groups = build_param_groups(m, index=ExpertIndex.build(m), split_by="expert", max_group_size=expert_size)
    assert max(sum(p.numel() for p in g["params"]) for g in groups) <= expert_size
    opt = GroupedMixedPrecisionOptimizer(groups, "AdamW", fuse_elems=expert_size)
    loss_of(m, torch.randn(64, 8).bfloat16()).float().backward()
    opt.step()
    total = sum(p.numel() for p in m.parameters())
    # the largest fp32 gradient working set is one group, never the model
    assert 0 < opt.peak_fp32_grad_elems <= expert_size < total


def test_fusing_many_groups_gives_identical_results_and_keeps_names():
    a, b = model_with_moe(experts=8), model_with_moe(experts=8)
    ga, gb = build_param_groups(a, index=ExpertIndex.build(a)), build_param_groups(b, index=ExpertIndex.build(b))
    fused = GroupedMixedPrecisionOptimizer(ga, "AdamW", dict(lr=1e-2), fuse_elems=10**9)
    alone = GroupedMixedPrecisionOptimizer(gb, "AdamW", dict(lr=1e-2), fuse_elems=None)
    assert len(fused._batches()) < len(fused.param_groups) == len(alone._batches())
    x = torch.randn(16, 8)
    for m, opt in ((a, fused), (b, alone)):
        loss_of(m, x).backward()
        opt.step(want_stats=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert fused.last_stats.keys() == alone.last_stats.keys()
    assert any(name.endswith("/expert_7") for name in fused.last_stats)
    for name, s in fused.last_stats.items():
        for key in ("grad_norm", "param_norm", "update_ratio"):
            assert s[key] == pytest.approx(alone.last_stats[name][key], rel=1e-6)


def test_per_group_stats_by_hand():
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = GroupedMixedPrecisionOptimizer([{"params": [p], "name": "only"}], "SGD", dict(lr=0.5))
    p.grad = torch.tensor([1.0, 0.0])
    opt.step(want_stats=True)
    # grad norm 1; new param (2.5, 4), norm sqrt(22.25); update (-0.5, 0), ratio 0.5 / sqrt(22.25)
    s = opt.last_stats["only"]
    assert s["grad_norm"] == pytest.approx(1.0)
    assert s["param_norm"] == pytest.approx(22.25 ** 0.5)
    assert s["update_ratio"] == pytest.approx(0.5 / 22.25 ** 0.5)


def test_lr_scale_and_grad_scale():
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = GroupedMixedPrecisionOptimizer([{"params": [p], "lr_scale": 0.5, "name": "half"},
                                          {"params": [q], "name": "full"}], "SGD", dict(lr=1.0))
    p.grad, q.grad = torch.ones(2), torch.ones(2)
    opt.step(grad_scale=0.25)
    assert p.tolist() == [1 - 0.5 * 0.25] * 2 and q.tolist() == [1 - 0.25] * 2


def test_frozen_expert_does_not_move_and_is_in_no_group():
    m = model_with_moe()
    frozen = freeze_experts(m, ["1/2"], ExpertIndex.build(m))
    assert frozen == ["1/2"]
    before = copy.deepcopy(m[1].experts[2].state_dict())
    groups = build_param_groups(m, index=ExpertIndex.build(m))
    assert not any(g.get("expert_number") == 2 for g in groups)
    opt = GroupedMixedPrecisionOptimizer(groups, "AdamW", dict(lr=0.1))
    loss_of(m, torch.randn(16, 8)).backward()
    opt.step()
    for k, v in m[1].experts[2].state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match=r"moe.freeze_experts entries \[9\] match no local expert"):
        freeze_experts(m, [9], ExpertIndex.build(m))


def test_state_dict_round_trip_continues_identically():
    a, b = model_with_moe(), model_with_moe()
    opt_a = GroupedMixedPrecisionOptimizer(build_param_groups(a, index=ExpertIndex.build(a)), "AdamW", dict(lr=1e-2))
    x = torch.randn(16, 8)
    loss_of(a, x).backward()
    opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = GroupedMixedPrecisionOptimizer(build_param_groups(b, index=ExpertIndex.build(b)), "AdamW", dict(lr=1e-2))
    opt_b.load_state_dict(opt_a.state_dict())
    for m, opt in ((a, opt_a), (b, opt_b)):
        loss_of(m, x).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_coverage_and_bad_input():
    m = model_with_moe()
    with pytest.raises(ValueError, match=r"trainable parameters in no optimizer group: \['0.weight', '0.bias'\]"):
        build_param_groups(m, [{"params": list(m[1].parameters())}], index=ExpertIndex.build(m))
    p = next(m.parameters())
    with pytest.raises(ValueError, match="is in param groups 0 and 1"):
        GroupedMixedPrecisionOptimizer([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match=r"optimizer must be one of \['AdamW', 'Adam', 'SGD'\], got 'Lion'"):
        GroupedMixedPrecisionOptimizer([{"params": [p]}], "Lion")
    with pytest.raises(ValueError, match=r"unknown AdamW hyperparameters \['momentum'\]"):
        GroupedMixedPrecisionOptimizer([{"params": [p]}], "AdamW", dict(momentum=0.9))
    with pytest.raises(ValueError, match="offload must be 'none' or 'cpu'"):
        GroupedMixedPrecisionOptimizer([{"params": [p]}], offload="gpu")


def test_cpu_offload_path_matches():
    a, b = model_with_moe().to(torch.bfloat16), model_with_moe().to(torch.bfloat16)
    opt_a = GroupedMixedPrecisionOptimizer(build_param_groups(a, index=ExpertIndex.build(a)), "AdamW", offload="cpu")
    opt_b = GroupedMixedPrecisionOptimizer(build_param_groups(b, index=ExpertIndex.build(b)), "AdamW", offload="none")
    x = torch.randn(16, 8).bfloat16()
    for m, opt in ((a, opt_a), (b, opt_b)):
        loss_of(m, x).float().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert all(m.device.type == "cpu" and m.dtype == torch.float32 for m in opt_a.masters(0))


# --- state keyed by identity ----------------------------------------------------------------------

def _opt(m, kind="AdamW", **build):
    index = ExpertIndex.build(m)
    return GroupedMixedPrecisionOptimizer(build_param_groups(m, index=index, **build), kind, dict(lr=1e-2),
                                          index=index)


def test_state_dict_is_keyed_by_tensor_identity():
    m = model_with_moe()
    opt = _opt(m)
    loss_of(m, torch.randn(16, 8)).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["optimizer"] == "AdamW"
    # dense tensors by model name, expert tensors as "<layer>/<number>/<name inside the expert>"
    assert "0.weight" in sd["state"] and "1/3/2.bias" in sd["state"]
    entry = sd["state"]["1/3/2.bias"]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq"} and int(entry["step"]) == 1
    group = next(g for g in sd["param_groups"] if g["name"] == "params/1/expert_3")
    assert group["params"] == ["1/3/0.weight", "1/3/0.bias", "1/3/2.weight", "1/3/2.bias"]


def test_state_moves_between_group_layouts():
    # per-expert groups save, per-layer groups capped differently load: names, not positions, match
    a, b = model_with_moe(), model_with_moe()
    opt_a = _opt(a, split_by="expert")
    x = torch.randn(16, 8)
    loss_of(a, x).backward()
    opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = _opt(b, split_by="layer", max_group_size=100)
    assert [g["name"] for g in opt_b.param_groups] != [g["name"] for g in opt_a.param_groups]
    opt_b.load_state_dict(opt_a.state_dict())
    for m, opt in ((a, opt_a), (b, opt_b)):
        loss_of(m, x).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_mismatches_and_changes_nothing():
    m = model_with_moe()
    adam = _opt(m)
    loss_of(m, torch.randn(16, 8)).backward()
    adam.step()
    sgd = _opt(model_with_moe(), kind="SGD")
    with pytest.raises(ValueError, match=r"state is for 'AdamW' but this optimizer is 'SGD'"):
        sgd.load_state_dict(adam.state_dict())
    other = _opt(model_with_moe())
    before = {k: {f: v.clone() for f, v in e.items()} for k, e in other.state_dict()["state"].items()}
    sd = adam.state_dict()
    sd["state"] = dict(sd["state"])
    del sd["state"]["1/2/0.weight"]
    with pytest.raises(ValueError, match=r"no entry for tensor '1/2/0.weight'"):
        other.load_state_dict(sd)
    sd = adam.state_dict()
    sd["state"] = {**sd["state"], "1/9/0.weight": sd["state"]["1/0/0.weight"]}
    with pytest.raises(ValueError, match=r"does not have: \['1/9/0.weight'\]"):
        other.load_state_dict(sd)
    after = other.state_dict()["state"]
    assert all(torch.equal(after[k][f], v) for k, e in before.items() for f, v in e.items())


def test_group_names_must_be_unique():
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"param_groups\[0\] and param_groups\[1\] are both named 'decay'"):
        GroupedMixedPrecisionOptimizer([{"params": [p], "name": "decay"}, {"params": [q], "name": "decay"}])


def test_lr_scale_naming_no_layer_or_expert_is_refused():
    m = model_with_moe()
    with pytest.raises(ValueError, match=r"moe.lr_scale key 'ffn' names no MoE layer or expert"):
        build_param_groups(m, index=ExpertIndex.build(m), lr_scale={"ffn": 0.5})
    with pytest.raises(ValueError, match=r"moe.lr_scale key '1/4' names no MoE layer or expert"):
        build_param_groups(m, index=ExpertIndex.build(m), lr_scale={"1/4": 0.5})
    assert build_param_groups(m, index=ExpertIndex.build(m), lr_scale={"1/3": 0.5})[-1]["lr_scale"] == 0.5


def test_a_tensor_without_gradient_is_not_stepped_as_in_torch():
    # torch.optim keeps a step count per tensor: one that got no gradient keeps its count and weights
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    p2, q2 = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    ours = GroupedMixedPrecisionOptimizer([{"params": [p, q], "name": "g"}], "Adam", dict(lr=0.1))
    ref = torch.optim.Adam([p2, q2], lr=0.1)
    for step in range(3):
        p.grad, p2.grad = torch.full((2,), step + 1.0), torch.full((2,), step + 1.0)
        if step != 1:
            q.grad, q2.grad = torch.full((2,), 2.0), torch.full((2,), 2.0)
        ours.step()
        ref.step()
        ref.zero_grad()
    assert int(ours.state_dict()["state"]["g/1"]["step"]) == 2
    torch.testing.assert_close(p, p2)
    torch.testing.assert_close(q, q2)
