"""ExpertIndex: one object answers which layer and expert every tensor is, from the tags alone."""

import copy
import pickle

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer.identity import ExpertIndex, ExpertKey, tag_stacked_param


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("inp", nn.Linear(4, 4))
    model.add_module("ffn", moesaic.MoE(4, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), num_experts=3))
    moesaic.name_moe_layers(model)
    return model


def test_names_and_experts():
    idx = ExpertIndex.build(make_model())
    names = [r.name for r in idx]
    # dense tensors keep their model names; expert tensors are "<layer>/<number>/<name inside the expert>"
    assert names[:2] == ["inp.weight", "inp.bias"]
    assert "ffn/2/2.bias" in names
    assert idx.experts() == [ExpertKey("ffn", 0), ExpertKey("ffn", 1), ExpertKey("ffn", 2)]
    assert [r.name for r in idx.expert_refs(ExpertKey("ffn", 1))] == ["ffn/1/0.weight", "ffn/1/0.bias",
                                                                        "ffn/1/2.weight", "ffn/1/2.bias"]
    dense = [r.name for r in idx.dense()]
    assert dense[:2] == ["inp.weight", "inp.bias"] and len(dense) == 3 and dense[2].endswith("gate.wg.weight")
    assert idx.layers["ffn"].num_experts == 3 and idx.layers["ffn"].local_numbers == (0, 1, 2)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_identity_survives_copies(clone):
    model = make_model()
    twin = clone(model)
    a, b = ExpertIndex.build(model), ExpertIndex.build(twin)
    assert [(r.name, r.expert) for r in a] == [(r.name, r.expert) for r in b]
    for p in twin.ffn.experts[2].parameters():
        assert p.allreduce is False and p.group_name == "ffn" and p.expert_number == 2


def test_identity_survives_state_dict_round_trip():
    model, other = make_model(), make_model()
    other.load_state_dict(model.state_dict())
    assert [r.name for r in ExpertIndex.build(other)] == [r.name for r in ExpertIndex.build(model)]


def test_stacked_parameter_is_addressed_expert_by_expert():
    holder = nn.Module()
    holder.w = nn.Parameter(torch.arange(12.0).view(3, 4))
    tag_stacked_param(holder.w, "stack", 3, "w")
    model = nn.Sequential()
    model.add_module("ffn", moesaic.MoE(4, nn.Linear(4, 4), num_experts=6, expert_group_name="stack"))
    model.add_module("extra", holder)
    idx = ExpertIndex.build(model)
    refs = idx.refs_of(holder.w)
    assert [r.name for r in refs] == ["stack/3/w", "stack/4/w", "stack/5/w"]
    assert torch.equal(refs[1].data, torch.tensor([4.0, 5.0, 6.0, 7.0]))
    holder.w.grad = torch.ones(3, 4)
    refs[2].grad.mul_(5)  # a view: writes reach the stacked gradient
    assert holder.w.grad[2].sum() == 20
    with pytest.raises(ValueError, match="stacks 3 experts"):
        idx.ref_of(holder.w)


def test_two_layers_with_one_name_are_refused():
    model = nn.Sequential(moesaic.MoE(4, nn.Linear(4, 4), num_experts=2),
                          moesaic.MoE(4, nn.Linear(4, 4), num_experts=2))
    with pytest.raises(ValueError, match="are both named 'ep_size_1'.*name_moe_layers"):
        ExpertIndex.build(model)


def test_untagged_expert_parameter_is_refused():
    model = nn.Linear(2, 2)
    model.weight.allreduce = False
    with pytest.raises(ValueError, match="'weight' is marked allreduce=False .* carries no expert identity"):
        ExpertIndex.build(model)


def test_expert_key_parse():
    assert ExpertKey.parse("layers.1.mlp/03") == ExpertKey("layers.1.mlp", 3)
    with pytest.raises(ValueError, match="must look like"):
        ExpertKey.parse("layers.1.mlp")
    with pytest.raises(ValueError, match="number must be an int >= 0"):
        ExpertKey("x", -1)
