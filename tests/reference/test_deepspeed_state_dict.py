"""State dicts move between DeepSpeed 0.19.8's MoE and moesaic's with plain ``load_state_dict``.

The module structure is DeepSpeed's (``deepspeed_moe`` -> ``gate.wg`` and
``experts.deepspeed_experts.<i>``; ``mlp`` and ``coefficient`` for a residual MoE), so the keys,
their order and the shapes are the same, in both directions, with ``strict=True``.
"""

import logging
import os

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed not installed (make parity builds .venv-deepspeed)")
from deepspeed.moe.layer import MoE as DSMoE  # noqa: E402

import moesaic  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

D = 8


def expert():
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D))


def _model(cls, **kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(D, D))
    model.add_module("moe_1", cls(D, expert(), **kw))
    return model


@pytest.mark.parametrize("kw", [dict(num_experts=4, k=2), dict(num_experts=4, k=1, use_residual=True),
                                dict(num_experts=8, ep_size=2, k=2)],
                         ids=["plain", "residual", "ep_size=2 (local experts)"])
def test_state_dicts_load_both_ways_strictly(kw):
    ds, ours = _model(DSMoE, **kw), _model(moesaic.MoE, **kw)
    ds_state = ds.state_dict()
    assert list(ours.state_dict()) == list(ds_state)
    assert "moe_1.deepspeed_moe.gate.wg.weight" in ds_state
    assert "moe_1.deepspeed_moe.experts.deepspeed_experts.0.0.weight" in ds_state
    with torch.no_grad():
        for p in ds.parameters():
            p.uniform_(-1, 1)  # values neither side started with
    ours.load_state_dict(ds.state_dict(), strict=True)
    for k, v in ds.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(2)
    ds.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(ds.state_dict()[k], v), k


def test_loaded_weights_give_deepspeeds_output():
    kw = dict(num_experts=4, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    ds, ours = _model(DSMoE, **kw), _model(moesaic.MoE, **kw)
    ours.load_state_dict(ds.state_dict(), strict=True)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))
    d_out, d_aux, d_counts = ds.moe_1(ds.embed(x))
    o_out, o_aux, o_counts = ours.moe_1(ours.embed(x))
    torch.testing.assert_close(o_out, d_out, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(o_aux, d_aux)
    assert torch.equal(o_counts, d_counts.long())


def test_module_paths_match_deepspeeds():
    ds, ours = _model(DSMoE, num_experts=4, use_residual=True), _model(moesaic.MoE, num_experts=4, use_residual=True)
    ds_paths = [n for n, _ in ds.named_modules()]
    assert [n for n, _ in ours.named_modules()] == ds_paths
    assert type(ours.moe_1.deepspeed_moe).__name__ == type(ds.moe_1.deepspeed_moe).__name__ == "MOELayer"
    assert type(ours.moe_1.deepspeed_moe.gate).__name__ == type(ds.moe_1.deepspeed_moe.gate).__name__ == "TopKGate"
    assert type(ours.moe_1.deepspeed_moe.experts).__name__ == "Experts"


def test_deepspeeds_state_dict_loads_into_the_core_layer():
    # the core layer has its own nesting (gate.*, experts.local_experts.<i>.*); its load hook respells
    # DeepSpeed's keys, so a DeepSpeed state dict gives DeepSpeed's output there too
    kw = dict(num_experts=4, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    ds = _model(DSMoE, **kw)
    core = nn.Sequential()
    core.add_module("embed", nn.Linear(D, D))
    core.add_module("moe_1", moesaic.MixtureOfExperts(D, expert(), moesaic.MoEConfig(**kw)))
    core.load_state_dict(ds.state_dict(), strict=True)
    assert "moe_1.gate.wg.weight" in core.state_dict()
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(2))
    d_out, d_aux, _ = ds.moe_1(ds.embed(x))
    o_out, o_aux, _ = core.moe_1(core.embed(x))
    torch.testing.assert_close(o_out, d_out, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(o_aux, d_aux)


def test_the_routed_part_runs_through_deepspeed_moe_as_in_deepspeed():
    # a forward hook on deepspeed_moe (DeepSpeed's routed part) sees one call per forward, its input and
    # an output of the input's shape, on both
    seen = {}
    for name, cls in (("ds", DSMoE), ("ours", moesaic.MoE)):
        model = _model(cls, num_experts=4, k=1)
        calls = []
        model.moe_1.deepspeed_moe.register_forward_hook(lambda m, args, out: calls.append((args[0].shape, out.shape)))
        model(torch.randn(2, 3, D))
        seen[name] = calls
    assert seen["ours"] == seen["ds"] and len(seen["ds"]) == 1
