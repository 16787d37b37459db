"""The core layer's own module nesting and keys, DeepSpeed's in ``moesaic.MoE``, and the upgrade between them.

Until issue 23 the core layer held DeepSpeed's nesting (``deepspeed_moe.gate.*``,
``deepspeed_moe.experts.deepspeed_experts.<i>.*``); state dicts and checkpoints written then must
still load, bit for bit (fixture written by commit 45dc1af: tests/unit/data/checkpoint_v2_deepspeed_nesting).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import moesaic
from moesaic.checkpoint.legacy import upgrade_dense_names
from moesaic.layer.keys import CORE_LAYOUT, NESTED_LAYOUT, respell_key, upgrade_legacy_keys
from support.checkpoint_net import train

FIXTURE = Path(__file__).parent / "data" / "checkpoint_v2_deepspeed_nesting"
D = 8
CONFIG = {"train_micro_batch_size_per_gpu": 16,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 1e-2}}}


def _mlp():
    return nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))


class Net(nn.Module):
    """The fixture's model (tests/unit/data/make_checkpoint_deepspeed_nesting.py)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        config = moesaic.MoEConfig(num_experts=4, k=2, enable_expert_bias=True, bias_update_rate=0.01,
                                   top2_2nd_expert_sampling=False, shared_experts=1, shared_expert_gate=True)
        self.ffn = moesaic.MixtureOfExperts(D, _mlp(), config,
                                            shared_expert=nn.Sequential(nn.Linear(D, 8), nn.GELU(), nn.Linear(8, D)))
        moesaic.name_moe_layers(self)

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.pow(2).mean() + 0.01 * l_aux


def _core(key):
    """A key of the fixture's model as the core layer spells it."""
    return "ffn." + respell_key(key[len("ffn."):], CORE_LAYOUT) if key.startswith("ffn.") else key


def test_the_core_layer_has_its_own_nesting():
    layer = moesaic.MixtureOfExperts(D, _mlp(), moesaic.MoEConfig(num_experts=2, k=1, use_residual=True))
    assert [n for n, _ in layer.named_children()] == ["gate", "experts", "mlp", "coefficient"]
    assert list(layer.state_dict()) == [
        "gate.wg.weight",
        "experts.local_experts.0.0.weight", "experts.local_experts.0.0.bias",
        "experts.local_experts.0.2.weight", "experts.local_experts.0.2.bias",
        "experts.local_experts.1.0.weight", "experts.local_experts.1.0.bias",
        "experts.local_experts.1.2.weight", "experts.local_experts.1.2.bias",
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "coefficient.weight", "coefficient.bias"]
    assert not any("deepspeed" in n for n, _ in layer.named_modules())


def test_respell_key_between_the_two_nestings():
    assert respell_key("deepspeed_moe.experts.deepspeed_experts.3.0.weight", CORE_LAYOUT) == \
        "experts.local_experts.3.0.weight"
    assert respell_key("experts.local_experts.3.0.weight", NESTED_LAYOUT) == \
        "deepspeed_moe.experts.deepspeed_experts.3.0.weight"
    assert respell_key("gate.wg.weight::exp_avg", NESTED_LAYOUT) == "deepspeed_moe.gate.wg.weight::exp_avg"
    assert respell_key("deepspeed_moe.experts.fc1.weight", CORE_LAYOUT) == "experts.fc1.weight"  # stacked
    for key in ("mlp.0.weight", "coefficient.bias", "shared_expert_gate.weight", "gate.wg.weight"):
        assert respell_key(key, CORE_LAYOUT) == key
    with pytest.raises(TypeError, match="to must be a KeyLayout, got str"):
        respell_key("gate.wg.weight", "core")
    with pytest.raises(TypeError, match="key must be a str, got int"):
        respell_key(3, CORE_LAYOUT)


def test_a_state_dict_of_the_former_nesting_loads_into_the_core_layer_bitwise():
    old = load_file(FIXTURE / "state_dict.safetensors")
    assert "ffn.deepspeed_moe.gate.wg.weight" in old and "ffn.deepspeed_moe.experts.deepspeed_experts.3.2.bias" in old
    model = Net()
    model.load_state_dict(old, strict=True)
    new = model.state_dict()
    assert sorted(new) == sorted(map(_core, old))
    for key, value in old.items():
        assert torch.equal(new[_core(key)], value), key
    assert torch.equal(model.ffn.gate.expert_bias, old["ffn.deepspeed_moe.gate.expert_bias"])
    # the same upgrade as a function (names with a suffix too), the one the load hook runs
    up = upgrade_legacy_keys({"ffn.deepspeed_moe.gate.wg.weight::exp_avg": 1, "inp.weight": 2}, model)
    assert up == {"ffn.gate.wg.weight::exp_avg": 1, "inp.weight": 2}


@pytest.mark.parametrize("stacked", [False, True])
def test_deepspeeds_moe_and_the_core_layer_load_each_others_state_dicts(stacked):
    options = dict(num_experts=4, k=2, top2_2nd_expert_sampling=False, stacked_experts=stacked)
    torch.manual_seed(0)
    ds = moesaic.MoE(D, moesaic.GLUExpert(D, 16), use_residual=True, **options)
    core = moesaic.MixtureOfExperts(D, moesaic.GLUExpert(D, 16), moesaic.MoEConfig(use_residual=True, **options))
    core.load_state_dict(ds.state_dict(), strict=True)
    assert [respell_key(k, CORE_LAYOUT) for k in ds.state_dict()] == list(core.state_dict())
    for a, b in zip(ds.state_dict().values(), core.state_dict().values()):
        assert torch.equal(a, b)
    back = moesaic.MoE(D, moesaic.GLUExpert(D, 16), use_residual=True, **options)
    back.load_state_dict(core.state_dict(), strict=True)
    for (ka, a), (kb, b) in zip(ds.state_dict().items(), back.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    x = torch.randn(6, D)
    assert torch.equal(ds.eval()(x)[0], core.eval()(x)[0])


def test_deepspeeds_nesting_is_a_view_of_the_same_parts():
    moe = moesaic.MoE(D, _mlp(), num_experts=2, k=1)
    assert type(moe.deepspeed_moe).__name__ == "MOELayer" and type(moe.experts).__name__ == "Experts"
    assert moe.experts.copies is moe.deepspeed_moe.experts.deepspeed_experts
    out, l_aux, counts = moe(torch.randn(5, D))
    assert moe.deepspeed_moe.l_aux is l_aux and moe.deepspeed_moe.exp_counts is counts  # DeepSpeed's attributes
    with pytest.raises(RuntimeError, match="call that MoE"):
        moe.deepspeed_moe(torch.randn(5, D))
    moesaic.name_moe_layers(nn.Sequential(moe))
    assert moe.deepspeed_moe.ep_group_name == moe.expert_group_name == "0"


def test_dense_names_upgrade_both_ways():
    assert upgrade_dense_names(["b.ffn.deepspeed_moe.gate.wg.weight", "inp.weight"],
                               {"b.ffn.gate.wg.weight", "inp.weight"}) == \
        {"b.ffn.deepspeed_moe.gate.wg.weight": "b.ffn.gate.wg.weight"}
    assert upgrade_dense_names(["b.ffn.gate.wg.weight"], {"b.ffn.deepspeed_moe.gate.wg.weight"}) == \
        {"b.ffn.gate.wg.weight": "b.ffn.deepspeed_moe.gate.wg.weight"}
    # a name the checkpoint holds under its own spelling is never a rename's target
    assert upgrade_dense_names(["a.deepspeed_moe.gate.w", "a.gate.w"], {"a.gate.w"}) == {}


def _load_and_step(steps=2):
    engine, *_ = moesaic.initialize(model=Net(), config=CONFIG)
    engine.load_checkpoint(str(FIXTURE), tag="step3")
    return engine, train(engine, steps)


def test_a_checkpoint_of_the_former_nesting_loads_its_tensors_bitwise():
    engine, *_ = moesaic.initialize(model=Net(), config=CONFIG)
    engine.load_checkpoint(str(FIXTURE), tag="step3")
    dense = load_file(FIXTURE / "step3" / "dense.safetensors")
    assert torch.equal(engine.module.ffn.gate.wg.weight, dense["ffn.deepspeed_moe.gate.wg.weight"])
    assert torch.equal(engine.module.ffn.gate.expert_bias, dense["ffn.deepspeed_moe.gate.expert_bias"])
    expert_2 = load_file(FIXTURE / "step3" / "experts" / "ffn" / "2.safetensors")
    assert torch.equal(engine.module.ffn.experts[2][0].weight, expert_2["0.weight"])
    state = load_file(FIXTURE / "state_dict.safetensors")
    for key, value in engine.module.state_dict().items():
        old = key if not key.startswith("ffn.") else "ffn." + respell_key(key[len("ffn."):], NESTED_LAYOUT)
        assert torch.equal(value, state[old]), key


def test_a_checkpoint_of_the_former_nesting_resumes_as_the_old_code_did():
    # optimizer state (the router's included), scheduler and RNG came back; expected.json was written on
    # this project's machine by 45dc1af: equal to fp32 round-off on any CPU, bitwise where it was written
    _, losses = _load_and_step()
    recorded = json.loads((FIXTURE / "expected.json").read_text())["next_losses"]
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), torch.tensor(recorded, dtype=torch.float64),
                               rtol=1e-5, atol=0.0)
    first, again = _load_and_step(), _load_and_step()
    assert first[1] == again[1]


def test_the_classes_a_former_whole_module_pickle_names_are_gone():
    """docs/checkpoints.md: a torch.save(model) pickle from before the move names these; it does not unpickle (the
    state dict and moesaic checkpoints are the supported paths, tested above)."""
    import importlib.util

    import moesaic.layer.moe

    assert not hasattr(moesaic.layer.moe, "MoE") and hasattr(moesaic.layer.moe, "MixtureOfExperts")
    assert importlib.util.find_spec("moesaic.layer.moe_layer") is None
    assert importlib.util.find_spec("moesaic.layer.router") is None
