"""Optimizer parameter groups: identity-aware splitting of expert parameters (moesaic.optim.param_groups)."""

import math
import re
from collections import defaultdict

import pytest
import torch
from torch import nn

from moesaic.deepspeed.moe import MoE
from moesaic.layer.moe import name_moe_layers
from moesaic.optim.param_groups import (
    configure_moe_param_groups,
    describe_param_groups,
    has_moe_layers,
    is_moe_param,
    is_moe_param_group,
    split_params_grads_into_shared_and_expert_params,
    split_params_into_different_moe_groups_for_optimizer as split_groups,
    split_params_into_shared_and_expert_params,
)

D = 8
EXPERT_NUMEL = 32 + 4 + 32 + 8  # Linear(8, 4) + Linear(4, 8)
IDENTITY = {"params", "name", "moe", "expert_group_name", "expert_number"}
LAYERS = ("layers.0.mlp", "layers.1.mlp")


class Block(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = nn.Linear(D, D)
        expert = nn.Sequential(nn.Linear(D, 4), nn.ReLU(), nn.Linear(4, D))
        self.mlp = MoE(D, expert, num_experts=4, expert_group_name=name)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        y, l_aux, _ = self.mlp(x)
        return x + y, l_aux


class Net(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.layers = nn.ModuleList([Block(n) for n in names])
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        x, aux = self.embed(x), 0.0
        for block in self.layers:
            x, l_aux = block(x)
            aux = aux + l_aux
        return self.head(x).pow(2).mean() + aux


def make_model(seed=0, names=LAYERS):
    torch.manual_seed(seed)
    return Net(names)


def wd_groups(model):
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2], "lr": 1e-3, "weight_decay": 0.1, "name": "decay"},
        {"params": [p for p in params if p.dim() < 2], "lr": 2e-3, "weight_decay": 0.0, "name": "no_decay"},
    ]


def part_of(name):
    return int(name.rsplit("/part_", 1)[1]) if "/part_" in name else 0


def check_properties(inp_params, inp_hyper, out, cap, split_by):
    """Properties 1-5 of the brief; inp_params/inp_hyper: params list and other keys per input group."""
    nb = len(inp_params)
    origin = {id(p): gi for gi, ps in enumerate(inp_params) for p in ps}
    out_ids = [id(p) for g in out for p in g["params"]]
    # 1. every parameter exactly once; dense params stay in their (kept) base group, in order
    assert len(out_ids) == len(set(out_ids)) and set(out_ids) == set(origin)
    for gi in range(nb):
        assert not is_moe_param_group(out[gi])
        assert [id(p) for p in out[gi]["params"]] == [id(p) for p in inp_params[gi] if not is_moe_param(p)]
        assert {k: v for k, v in out[gi].items() if k != "params"} == inp_hyper[gi]
    moe = out[nb:]
    assert moe and all(g["moe"] is True for g in moe)
    for g in moe:
        ps = g["params"]
        assert ps and all(is_moe_param(p) for p in ps)
        # 2. one layer, and one expert in expert mode
        assert {p.group_name for p in ps} == {g["expert_group_name"]}
        if split_by == "expert":
            assert {p.expert_number for p in ps} == {g["expert_number"]}
        else:
            assert g["expert_number"] is None
        # 3. size cap, except for a lone parameter
        if cap is not None:
            assert sum(p.numel() for p in ps) <= cap or len(ps) == 1
        # 4. hyperparameters of the single base group; readable name
        (b,) = {origin[id(p)] for p in ps}
        assert {k: v for k, v in g.items() if k not in IDENTITY} == \
            {k: v for k, v in inp_hyper[b].items() if k != "name"}
        base_name = inp_hyper[b].get("name", f"group_{b}")
        expert = f"/expert_{g['expert_number']}" if split_by == "expert" else ""
        assert re.fullmatch(rf"{re.escape(base_name)}/{re.escape(g['expert_group_name'])}{expert}(/part_\d+)?",
                            g["name"])
    names = [g["name"] for g in out]
    assert len(set(names)) == len(names) or any("name" not in h for h in inp_hyper)
    assert len({g["name"] for g in moe}) == len(moe)
    # 3 (layer mode): an expert spans groups only when it alone exceeds the cap, and then alone
    if split_by == "layer":
        where, size = defaultdict(set), defaultdict(int)
        for i, g in enumerate(moe):
            for p in g["params"]:
                key = (origin[id(p)], p.group_name, p.expert_number)
                where[key].add(i)
                size[key] += p.numel()
        for key, idxs in where.items():
            if len(idxs) > 1:
                assert cap is not None and size[key] > cap
                assert all((origin[id(p)], p.group_name, p.expert_number) == key
                           for i in idxs for p in moe[i]["params"])
    # 5. order: (base group, first appearance of the layer, expert number, part)
    def key(g):
        b = origin[id(g["params"][0])]
        layer_order = list(dict.fromkeys(p.group_name for p in inp_params[b] if is_moe_param(p)))
        return b, layer_order.index(g["expert_group_name"]), g["expert_number"] or 0, part_of(g["name"])
    keys = [key(g) for g in moe]
    assert keys == sorted(keys)


# --- splitting: properties -------------------------------------------------------------------------

CASES = [  # (split_by, cap, MoE groups for one group of all params: 2 layers x 4 experts of 76 = [32, 4, 32, 8])
    ("expert", 40, 16),  # cap smaller than an expert: [32, 4] | [32, 8]
    ("expert", EXPERT_NUMEL, 8),  # cap equal to one expert
    ("expert", 2.5 * EXPERT_NUMEL, 8),  # float cap holding 2.5 experts
    ("expert", None, 8),
    ("expert", 1, 32),  # every parameter alone
    ("layer", 40, 16),  # each expert too big: split on its own
    ("layer", EXPERT_NUMEL, 8),  # one whole expert per group
    ("layer", 2.5 * EXPERT_NUMEL, 4),  # two whole experts per group, never 2.5
    ("layer", None, 2),
    ("layer", 1, 32),
]


@pytest.mark.parametrize("split_by,cap,n_moe", CASES)
def test_properties_single_group(split_by, cap, n_moe):
    model = make_model()
    params = list(model.parameters())
    out = split_groups({"params": params, "lr": 0.01, "name": "all"}, cap, split_by=split_by)
    assert len(out) == 1 + n_moe
    check_properties([params], [{"lr": 0.01, "name": "all"}], out, cap, split_by)
    if split_by == "layer" and cap == 2.5 * EXPERT_NUMEL:
        assert [sorted({p.expert_number for p in g["params"]}) for g in out[1:]] == [[0, 1], [2, 3]] * 2


@pytest.mark.parametrize("split_by,cap", [(s, c) for s, c, _ in CASES])
@pytest.mark.parametrize("container", [list, tuple])
def test_properties_weight_decay_groups(split_by, cap, container):
    model = make_model()
    inp = wd_groups(model)
    out = split_groups(container(inp), cap, split_by=split_by)
    check_properties([g["params"] for g in inp], [{k: v for k, v in g.items() if k != "params"} for g in inp],
                     out, cap, split_by)
    assert [g["name"] for g in out[:2]] == ["decay", "no_decay"]
    assert {g["expert_group_name"] for g in out[2:]} == set(LAYERS)


def test_single_dict_and_generator_params():
    model = make_model()
    out = split_groups({"params": model.parameters(), "name": "all"}, split_by="expert")
    params = list(model.parameters())
    check_properties([params], [{"name": "all"}], out, None, "expert")
    assert len(out) == 1 + 8 and isinstance(out[0]["params"], list)


def test_single_tensor_params_and_base_group_kept_when_empty():
    model = make_model()
    expert_weight = model.layers[0].mlp.experts[2][0].weight
    dense = {"params": model.embed.weight, "name": "embed"}
    only_expert = {"params": expert_weight, "name": "one", "lr": 0.5}
    out = split_groups([dense, only_expert])
    assert out[0]["params"] == [model.embed.weight]
    assert out[1] == {"params": [], "name": "one", "lr": 0.5}  # kept, empty, for alignment
    assert out[2]["name"] == "one/layers.0.mlp/expert_2" and out[2]["params"] == [expert_weight]
    assert out[2]["lr"] == 0.5 and len(out) == 3


def test_input_not_mutated():
    model = make_model()
    inp = wd_groups(model)
    snapshot = [({k: v for k, v in g.items()}, list(g["params"])) for g in inp]
    out = split_groups(inp, 40)
    assert len(inp) == 2 and all(o is not g for o in out for g in inp)
    for g, (keys, params) in zip(inp, snapshot):
        assert g == keys and g["params"] is keys["params"]  # same dict content, same list object
        assert [id(p) for p in g["params"]] == [id(p) for p in params]
        assert "moe" not in g


def test_exact_names_small_case():
    torch.manual_seed(0)
    moe = MoE(4, nn.Linear(4, 4), num_experts=2, expert_group_name="layers.1.mlp")  # gate 8, expert [16, 4]
    params = list(moe.parameters())
    group = {"params": params, "name": "decay", "lr": 0.01}
    names = lambda out: [g["name"] for g in out]  # noqa: E731
    pre = "decay/layers.1.mlp"
    assert names(split_groups(group, None)) == ["decay", f"{pre}/expert_0", f"{pre}/expert_1"]
    assert names(split_groups(group, 16)) == ["decay", f"{pre}/expert_0/part_0", f"{pre}/expert_0/part_1",
                                              f"{pre}/expert_1/part_0", f"{pre}/expert_1/part_1"]
    assert names(split_groups(group, None, split_by="layer")) == ["decay", pre]
    assert names(split_groups(group, 20, split_by="layer")) == ["decay", f"{pre}/part_0", f"{pre}/part_1"]
    assert names(split_groups(group, 10, split_by="layer")) == ["decay"] + [f"{pre}/part_{i}" for i in range(4)]
    out = split_groups(group, 16)
    assert [g["params"] for g in out] == [[params[0]], [params[1]], [params[2]], [params[3]], [params[4]]]
    assert [g["expert_number"] for g in out[1:]] == [0, 0, 1, 1]
    assert all(g["expert_group_name"] == "layers.1.mlp" and g["lr"] == 0.01 for g in out[1:])

    # no name (DeepSpeed raises KeyError): the base stays nameless, MoE groups use the position
    out = split_groups([{"params": [params[0]]}, {"params": params[1:], "lr": 0.1}])
    assert [g.get("name") for g in out] == [None, None, "group_1/layers.1.mlp/expert_0",
                                            "group_1/layers.1.mlp/expert_1"]
    # the same base name twice still gives unique names
    out = split_groups([{"params": params[1:3], "name": "x"}, {"params": params[3:], "name": "x"}])
    assert names(out)[2:] == ["x[0]/layers.1.mlp/expert_0", "x[1]/layers.1.mlp/expert_1"]


def test_deterministic_order():
    model = make_model(seed=3)
    first, second = split_groups(wd_groups(model), 40), split_groups(wd_groups(model), 40)
    assert [g["name"] for g in first] == [g["name"] for g in second]
    assert [[id(p) for p in g["params"]] for g in first] == [[id(p) for p in g["params"]] for g in second]
    rebuilt = split_groups(wd_groups(make_model(seed=3)), 40)
    assert [g["name"] for g in rebuilt] == [g["name"] for g in first]
    for a, b in zip(first, rebuilt):
        assert len(a["params"]) == len(b["params"])
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


def test_layers_with_one_default_name_mix_until_named():
    """DeepSpeed issue 5064: every layer defaults to ``ep_size_1``, so one group holds all layers."""
    model = make_model(names=(None, None))
    layer_ids = [{id(p) for p in block.mlp.experts.parameters()} for block in model.layers]
    mixed = split_groups(wd_groups(model), None, split_by="layer")
    assert [g["name"] for g in mixed[2:]] == ["decay/ep_size_1", "no_decay/ep_size_1"]
    assert all(ids & {id(p) for p in mixed[2]["params"]} for ids in layer_ids)  # both layers in one group

    assert sorted(name_moe_layers(model)) == list(LAYERS)
    for split_by in ("layer", "expert"):
        out = split_groups(wd_groups(model), None, split_by=split_by)
        for g in out[2:]:
            owners = [i for i, ids in enumerate(layer_ids) if ids & {id(p) for p in g["params"]}]
            assert len(owners) == 1 and g["expert_group_name"] == LAYERS[owners[0]]
        assert len(out) == 2 + (4 if split_by == "layer" else 16)


def test_untagged_expert_number_is_own_unit_in_layer_mode():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(5))
    for p in (a, b):  # tagged as DeepSpeed's own Experts does: no expert_number
        p.allreduce, p.group_name = False, "ds"
    out = split_groups({"params": [a, b], "name": "g"}, 4, split_by="layer")
    assert [(g["name"], g["params"]) for g in out[1:]] == [("g/ds/part_0", [a]), ("g/ds/part_1", [b])]
    with pytest.raises(ValueError, match=r"shape \(3,\) in layer 'ds' .*no expert_number.*split_by='layer'"):
        split_groups({"params": [a, b]}, 4)


@pytest.mark.parametrize("cap", [40, None])
def test_groups_work_with_adamw(cap):
    model = make_model()
    groups = split_groups(wd_groups(model), cap)
    optimizer = torch.optim.AdamW(groups)
    assert [g["name"] for g in optimizer.param_groups] == [g["name"] for g in groups]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(16, D)).backward()
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(c or not p.grad.any() for c, p in zip(changed, model.parameters()))
    assert changed[0] and any(changed[i] for i, p in enumerate(model.parameters()) if is_moe_param(p))

    # a base group left empty is accepted by the optimizer too
    only_experts = {"params": [p for p in model.parameters() if is_moe_param(p)], "lr": 0.1}
    torch.optim.AdamW(split_groups(only_experts) + [{"params": [model.embed.weight]}]).step()


# --- splitting: errors ------------------------------------------------------------------------------

def test_error_cases():
    model = make_model()
    w, b = model.embed.weight, model.embed.bias
    with pytest.raises(TypeError, match="param_groups must be a dict, list or tuple of dicts, got set"):
        split_groups({1})
    with pytest.raises(TypeError, match="param_groups must be a dict, list or tuple of dicts, got generator"):
        split_groups(g for g in wd_groups(model))
    with pytest.raises(TypeError, match=r"param_groups\[1\] must be a dict, got Parameter"):
        split_groups([{"params": [w]}, b])
    with pytest.raises(ValueError, match=r"param_groups\[0\] has no 'params' key \(keys: \['lr'\]\)"):
        split_groups([{"lr": 0.1}])
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[1\] must be a torch.Tensor, got str"):
        split_groups([{"params": [w]}, {"params": [b, "bias"]}])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\] must be a Tensor or an ordered iterable.*"
                                        r"got int"):
        split_groups({"params": 5})
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\] must be .*got set"):
        split_groups({"params": {w, b}})
    with pytest.raises(ValueError, match=r"shape \(8, 8\) appears in both param_groups\[0\] and param_groups\[2\]"):
        split_groups([{"params": [w]}, {"params": [b]}, {"params": [w]}])
    with pytest.raises(ValueError, match=r"shape \(8,\) appears twice in param_groups\[0\]"):
        split_groups({"params": [w, b, b]})
    lost = nn.Parameter(torch.zeros(2, 3))
    lost.allreduce = False
    with pytest.raises(ValueError, match=r"shape \(2, 3\) in param_groups\[0\] needs a non-empty str group_name, "
                                         r"got none"):
        split_groups({"params": [w, lost]})
    lost.group_name, lost.expert_number = "l", "3"
    with pytest.raises(ValueError, match=r"expert_number='3'; it must be an int"):
        split_groups({"params": [lost]})
    with pytest.raises(ValueError, match=r"max_group_size must be > 0 elements .*got 0"):
        split_groups({"params": [w]}, 0)
    with pytest.raises(ValueError, match=r"max_group_size must be > 0 elements .*got -1.5"):
        split_groups({"params": [w]}, -1.5)
    with pytest.raises(ValueError, match=r"max_group_size must be > 0 elements .*got nan"):
        split_groups({"params": [w]}, math.nan)
    with pytest.raises(TypeError, match=r"max_group_size must be an int, a float or None, got bool \(True\)"):
        split_groups({"params": [w]}, True)
    with pytest.raises(TypeError, match=r"max_group_size must be an int, a float or None, got str \('10'\)"):
        split_groups({"params": [w]}, "10")
    with pytest.raises(ValueError, match=r"split_by must be one of \('expert', 'layer'\), got 'param'"):
        split_groups({"params": [w]}, split_by="param")


# --- configure_moe_param_groups ---------------------------------------------------------------------

def test_configure_from_parameters():
    model = make_model()
    dense = [p for p in model.parameters() if not is_moe_param(p)]
    for given in (list(model.parameters()), model.parameters()):
        out = configure_moe_param_groups(given)
        assert out[0] == {"params": dense, "name": "dense-params"}
        assert [g["name"] for g in out[1:5]] == [f"dense-params/layers.0.mlp/expert_{i}" for i in range(4)]
        assert len(out) == 9
    out = configure_moe_param_groups(list(model.parameters()), max_group_size=None, split_by="layer")
    assert [g["name"] for g in out] == ["dense-params", "dense-params/layers.0.mlp", "dense-params/layers.1.mlp"]


def test_configure_from_groups():
    model = make_model()
    inp = wd_groups(model)
    out = configure_moe_param_groups(inp)
    assert out == split_groups(inp) and len(out) == 2 + 16
    already = split_groups(inp)
    kept = configure_moe_param_groups(already)
    assert len(kept) == len(already) and all(a is b for a, b in zip(kept, already))


def test_configure_errors():
    model = make_model()
    with pytest.raises(ValueError, match="model_parameters is empty"):
        configure_moe_param_groups([])
    with pytest.raises(TypeError, match=r"model_parameters\[1\] must be a Tensor like model_parameters\[0\].*got dict"):
        configure_moe_param_groups([model.embed.weight, {"params": [model.embed.bias]}])
    with pytest.raises(TypeError, match=r"model_parameters\[2\] must be a dict .*got int"):
        configure_moe_param_groups([{"params": [model.embed.weight]}, {"params": [model.embed.bias]}, 3])
    with pytest.raises(TypeError, match="model_parameters must be a list .* got dict"):
        configure_moe_param_groups({"params": [model.embed.weight]})
    with pytest.raises(TypeError, match="model_parameters must be a list .* got int"):
        configure_moe_param_groups(7)


# --- small helpers ----------------------------------------------------------------------------------

def test_is_moe_param_and_has_moe_layers():
    model = make_model()
    moe = model.layers[1].mlp
    assert is_moe_param(moe.experts[3][2].bias) is True
    assert is_moe_param(moe.gate.wg.weight) is False and is_moe_param(torch.zeros(2)) is False
    with pytest.raises(TypeError, match="param must be a torch.Tensor, got list"):
        is_moe_param([1.0])
    assert has_moe_layers(model) == (True, 4)
    assert has_moe_layers(nn.Sequential(nn.Linear(2, 2))) == (False, 0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        has_moe_layers("model")


def test_split_shared_and_expert_params_and_grads():
    model = make_model()
    params = list(model.parameters())
    shared, expert = split_params_into_shared_and_expert_params(model.parameters())
    assert [id(p) for p in shared] == [id(p) for p in params if not hasattr(p, "allreduce")]
    assert [id(p) for p in expert] == [id(p) for p in params if hasattr(p, "allreduce")]
    assert len(expert) == 2 * 4 * 4
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor, got int"):
        split_params_into_shared_and_expert_params([params[0], 1])

    model.head.weight.grad = torch.ones(1, D)
    model.layers[0].mlp.experts[1][0].weight.grad = torch.full((4, D), 2.0)
    shared_grads, expert_grads = split_params_grads_into_shared_and_expert_params(params)
    assert len(shared_grads) == 1 and torch.equal(shared_grads[0], torch.ones(1, D))  # params without grad skipped
    assert len(expert_grads) == 1 and torch.equal(expert_grads[0], torch.full((4, D), 2.0))
    with pytest.raises(TypeError, match=r"group must be a Tensor or an ordered iterable .*got NoneType"):
        split_params_grads_into_shared_and_expert_params(None)


def test_is_moe_param_group():
    out = split_groups(wd_groups(make_model()))
    assert [is_moe_param_group(g) for g in out] == [False, False] + [True] * 16
    assert is_moe_param_group({"params": [], "moe": 0}) is False
    with pytest.raises(TypeError, match="group must be a dict .*got list"):
        is_moe_param_group([])


def test_describe_param_groups():
    torch.manual_seed(0)
    moe = MoE(4, nn.Linear(4, 4), num_experts=2, expert_group_name="layers.1.mlp")
    out = split_groups({"params": list(moe.parameters()), "name": "decay", "lr": 0.001, "weight_decay": 0.1,
                        "amsgrad": False})
    assert describe_param_groups(out) == [
        "decay: 1 tensor, 8 params, lr=0.001, weight_decay=0.1",
        "decay/layers.1.mlp/expert_0: 2 tensors, 20 params, lr=0.001, weight_decay=0.1",
        "decay/layers.1.mlp/expert_1: 2 tensors, 20 params, lr=0.001, weight_decay=0.1",
    ]
    assert describe_param_groups({"params": [torch.zeros(1000, 2)]}) == ["group_0: 1 tensor, 2,000 params"]
    with pytest.raises(TypeError, match="groups must be a dict, list or tuple of dicts, got int"):
        describe_param_groups(3)
