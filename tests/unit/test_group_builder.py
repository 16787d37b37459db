"""The one group builder: the engine (by the passed ExpertIndex) and DeepSpeed's helper (by tags) agree."""

import pytest
import torch
from torch import nn

import moesaic
from moesaic import checkpoint
from moesaic.layer.identity import ExpertIndex, ParamRef
from moesaic.optim.build_groups import build_param_groups, freeze_experts, pack
from moesaic.optim.param_groups import split_params_into_different_moe_groups_for_optimizer as split_groups


def model(stacked=False):
    torch.manual_seed(0)
    def moe(name, stack):
        return moesaic.MoE(8, nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), num_experts=4,
                           expert_group_name=name, stacked_experts=stack)
    return nn.Sequential(nn.Linear(8, 8), moe("a", False), nn.Linear(8, 8), moe("b", stacked), nn.LayerNorm(8))


def _layout(groups):
    return [(g["name"], [p.name if isinstance(p, ParamRef) else id(p) for p in g["params"]]) for g in groups]


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("split_by,cap", [("expert", None), ("expert", 100), ("layer", None), ("layer", 500)])
def test_engine_and_deepspeed_helper_make_the_same_moe_groups(stacked, split_by, cap):
    m = model(stacked)
    index = ExpertIndex.build(m)
    engine = build_param_groups(m, index=index, split_by=split_by, max_group_size=cap)
    helper = split_groups({"params": list(m.parameters()), "name": "params"}, cap, split_by=split_by,
                          stacked="views")
    as_refs = [{**g, "params": [p if isinstance(p, ParamRef) else index.ref_of(p) for p in g["params"]]}
               for g in helper if g.get("moe")]
    assert _layout([g for g in engine if g.get("moe")]) == _layout(as_refs)
    # the engine's groups hold refs named by the index, every trainable tensor once
    assert all(isinstance(p, ParamRef) for g in engine for p in g["params"])
    assert sorted(p.name for g in engine for p in g["params"]) == sorted(r.name for r in index.refs())


def test_one_packer_keeps_units_together_and_caps():
    a, b, c = torch.zeros(3), torch.zeros(4), torch.zeros(9)
    assert pack([[a, b], [c]], None) == [[a, b, c]]
    assert pack([[a, b], [c]], 7) == [[a, b], [c]]  # c alone is larger than the cap: a chunk of its own
    assert pack([[a, b, c]], 8) == [[a, b], [c]]  # a unit over the cap is packed tensor by tensor
    assert pack([], 8) == []


def test_the_index_is_passed_never_built_as_a_fallback(tmp_path):
    m = model()
    with pytest.raises(TypeError, match=r"build_param_groups\(index=\.\.\.\) must be the model's ExpertIndex "
                                        r"\(build it once per model with moesaic.ExpertIndex.build\(model\) and pass it\), "
                                        r"got NoneType"):
        build_param_groups(m, index=None)
    with pytest.raises(TypeError, match=r"freeze_experts\(index=\.\.\.\) must be the model's ExpertIndex .*got "
                                        r"Sequential"):
        freeze_experts(m, [1], m)
    with pytest.raises(TypeError, match=r"checkpoint.save\(index=\.\.\.\) must be the model's ExpertIndex .*got "
                                        r"NoneType"):
        checkpoint.save(tmp_path, m, tag="t", index=None)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(TypeError, match=r"checkpoint.prepare\(index=\.\.\.\) must be the model's ExpertIndex"):
        checkpoint.load(tmp_path, m, index={})
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'index'"):
        build_param_groups(m)


def test_a_bare_model_saves_and_loads_with_the_public_index(tmp_path):
    """docs/checkpoints.md: a bare model's checkpoint takes ``index=moesaic.ExpertIndex.build(model)``."""
    src, dst = model(), model()
    with torch.no_grad():
        for p in dst.parameters():
            p.add_(1.0)
    checkpoint.save(tmp_path, src, tag="t", index=moesaic.ExpertIndex.build(src))
    checkpoint.load(tmp_path, dst, index=moesaic.ExpertIndex.build(dst))
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name


def test_model_parameters_outside_the_model_are_named():
    m, other = model(), nn.Linear(2, 2)
    index = ExpertIndex.build(m)
    with pytest.raises(ValueError, match=r"model_parameters\[0\] \(group 'extra'\) holds a parameter of shape "
                                         r"\(2, 2\) that is not in the model; allowed: the model's parameters"):
        build_param_groups(m, [{"params": [other.weight], "name": "extra"}], index=index)
    with pytest.raises(TypeError, match=r"model_parameters\[0\] \(group 'group_0'\) holds a str; allowed"):
        build_param_groups(m, [{"params": ["w"]}], index=index)


def test_groups_split_by_the_helper_with_stacked_tensors_whole_train():
    """The helper's default keeps a stacked tensor whole (for torch optimizers); handed to ``initialize`` as
    model_parameters, its group is held as per-expert views (before: 'trainable parameters in no optimizer group')."""
    m = model(stacked=True)
    groups = split_groups({"params": list(m.parameters()), "name": "p"})
    assert any(g["name"] == "p/b/stacked" for g in groups)
    engine, opt, _, _ = moesaic.initialize(model=m, model_parameters=groups,
                                           config={"train_micro_batch_size_per_gpu": 2})
    names = [r.name for gi in range(len(opt.param_groups)) for r in opt.refs(gi)]
    assert sorted(names) == sorted(r.name for r in engine.index.refs())
    stacked = next(gi for gi, g in enumerate(opt.param_groups) if g["name"] == "p/b/stacked")
    assert {r.expert.number for r in opt.refs(stacked)} == {0, 1, 2, 3}
