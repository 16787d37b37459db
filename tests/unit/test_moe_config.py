"""One MoE config: the layer is built from ``MoEConfig``; ``[model.moe]`` is that section; moved keys name their place."""

import dataclasses

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer import MixtureOfExperts, MoEConfig, TopKGate
from moesaic.layer.keys import CORE_LAYOUT, respell_key
from moesaic.models.gpt import GPT, GPTConfig

D = 8


def _expert():
    return nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))


def test_the_layer_built_from_its_config_is_deepspeeds_constructor_bit_for_bit():
    options = dict(num_experts=4, k=2, capacity_factor=0.75, eval_capacity_factor=1.5, min_capacity=1,
                   use_residual=True, top2_2nd_expert_sampling=False, z_loss_coef=1e-3)
    torch.manual_seed(0)
    ds = moesaic.MoE(D, _expert(), **options)
    torch.manual_seed(0)
    core = MixtureOfExperts(D, _expert(), MoEConfig(**options), expert_group_name="ep_size_1")
    # the same tensors in the same order; the keys differ only by DeepSpeed's nesting (moesaic.layer.keys)
    assert [respell_key(k, CORE_LAYOUT) for k in ds.state_dict()] == list(core.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ds.state_dict().values(), core.state_dict().values()))
    assert ds.config == core.config == ds.gate.config and ds.expert_group_name == core.expert_group_name
    x = torch.randn(3, 5, D)
    for layer in (ds, core):
        layer.train()
    torch.manual_seed(1)
    out_ds = ds(x)
    torch.manual_seed(1)
    out_core = core(x)
    for a, b in zip(out_ds, out_core):
        assert torch.equal(a, b)


def test_moe_and_gate_take_deepspeeds_positional_arguments_into_one_config():
    moe = moesaic.MoE(D, _expert(), 4, 2, 2, 1.5, 2.0, 3)  # hidden, expert, num_experts, ep_size, k, cf, ecf, min
    assert moe.expert_group_name == "ep_size_2" and moe.ep_size == 2
    assert (moe.config.num_experts, moe.config.k, moe.config.capacity_factor, moe.config.eval_capacity_factor,
            moe.config.min_capacity) == (4, 2, 1.5, 2.0, 3)
    gate = TopKGate(D, 4, 2, 1.5, 2.0, 3, "Jitter", False, False, False)
    assert gate.config == MoEConfig(num_experts=4, k=2, capacity_factor=1.5, eval_capacity_factor=2.0,
                                    min_capacity=3, noisy_gate_policy="Jitter", drop_tokens=False, use_rts=False,
                                    top2_2nd_expert_sampling=False)
    assert gate.k == 2 and gate.drop_tokens is False  # DeepSpeed's attribute names read the config
    with pytest.raises(TypeError, match=r"TopKGate got \['k'\] both by position and by name"):
        TopKGate(D, 4, 2, k=2)
    with pytest.raises(TypeError, match=r"MoE got unknown options \['score_fn'\]; the options are the fields of "
                                        r"moesaic.MoEConfig"):
        moesaic.MoE(D, _expert(), num_experts=4, score_fn="sigmoid")
    assert moesaic.RouterConfig is MoEConfig  # the former name


def test_shared_experts_and_their_module_go_together():
    config = MoEConfig(num_experts=4, shared_experts=1)
    with pytest.raises(ValueError, match=r"shared_experts=1 and shared_expert=None disagree"):
        MixtureOfExperts(D, _expert(), config)
    with pytest.raises(ValueError, match=r"shared_expert_gate=True gates shared experts; set shared_experts >= 1"):
        MoEConfig(num_experts=4, shared_expert_gate=True)
    with pytest.raises(ValueError, match=r"^model.moe.shared_experts=1 cannot be combined with model.moe.use_residual"):
        GPTConfig.from_dict({"moe": {"shared_experts": 1, "use_residual": True}})
    moe = moesaic.MoE(D, _expert(), num_experts=4, shared_expert=_expert(), shared_expert_gate=True)
    assert moe.config.shared_experts == 1 and moe.shared_expert_gate is not None


def test_gpt_holds_the_section_with_its_own_defaults():
    cfg = GPTConfig()
    assert cfg.moe == MoEConfig(num_experts=4, k=2, capacity_factor=1.25, eval_capacity_factor=2.0)
    assert GPTConfig.from_dict({"moe": {"k": 1}}).moe.capacity_factor == 1.25  # a partial table keeps the rest
    rows = {r.path: r for r in GPTConfig.describe()}
    assert rows["model.moe.k"].default == "2" and rows["model.moe.score_func"].default == '"softmax"'
    cfg = GPTConfig.from_dict({"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 8, "moe_every": 1,
                               "moe": {"score_func": "sigmoid", "top2_2nd_expert_sampling": False, "n_group": 2,
                                       "topk_group": 1, "enable_expert_bias": True, "stacked_experts": True,
                                       "shared_experts": 2, "shared_expert_gate": True}})
    model = GPT(cfg)
    layer = model.blocks[0].ffn
    assert layer.config == cfg.moe and isinstance(layer.experts, moesaic.StackedExperts)
    assert layer.shared_expert[0].out_features == 2 * cfg.ffn_mult * cfg.n_embd  # two experts wide
    assert "blocks.0.ffn.gate.expert_bias" in model.state_dict()
    logits, loss, aux = model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("old,new", [("top_k", "moe.k"), ("num_experts", "moe.num_experts"),
                                     ("capacity_factor", "moe.capacity_factor"), ("drop_tokens", "moe.drop_tokens"),
                                     ("use_residual", "moe.use_residual")])
def test_a_moved_key_is_refused_naming_its_new_place(old, new):
    with pytest.raises(ValueError, match=rf"^model.{old} = 3 is now model.{new} \(every MoE layer option lives in "
                                         r"the \[model.moe\] table"):
        GPTConfig.from_dict({old: 3})


def test_a_stored_config_of_the_former_layout_still_reads():
    # checkpoints and run.json written before the moe table: `moesaic generate` and --resume read them
    old = {"n_layer": 2, "num_experts": 8, "top_k": 1, "capacity_factor": 2.0, "use_residual": True}
    cfg = GPTConfig.from_dict(GPTConfig.upgrade(old))
    assert (cfg.moe.num_experts, cfg.moe.k, cfg.moe.capacity_factor, cfg.moe.use_residual) == (8, 1, 2.0, True)
    assert GPTConfig.fixed_values(old) == GPTConfig.fixed_values(cfg.to_dict())
    assert GPTConfig.fixed_values({})["moe.num_experts"] == 4  # absent keys: today's defaults
    new = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=4))
    assert GPTConfig.fixed_values(new.to_dict())["moe.num_experts"] != GPTConfig.fixed_values(old)["moe.num_experts"]
