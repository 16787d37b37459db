"""The byte-level MoE GPT: shapes, init loss, causality, MoE layers, objective, generation, config errors."""

import math

import pytest
import torch

import moesaic
from moesaic.models import GPT, GPTConfig, unigram_baseline_loss

SMALL = dict(block_size=16, n_layer=4, n_head=2, n_embd=32)  # the moe table's defaults: 4 experts, top-2


def make(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides}))


def test_shapes_and_loss_at_init_is_uniform():
    model = make()
    idx = torch.randint(0, 256, (3, 16))
    targets = torch.randint(0, 256, (3, 16))
    logits, loss, aux = model(idx, targets)
    assert logits.shape == (3, 16, 256)
    assert loss.dim() == 0 and aux.dim() == 0 and aux.dtype == torch.float32
    # small init => nearly uniform predictions over 256 bytes
    assert abs(loss.item() - math.log(256)) < 0.1
    model.eval()  # routing samples the 2nd expert in training: compare in eval mode
    logits1, _, _ = model(idx, targets)
    logits2, loss2, _ = model(idx)
    assert loss2 is None and torch.allclose(logits1, logits2)


def test_weight_tying_and_init():
    model = make()
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - 16 * 32
    residual = model.blocks[0].attn.proj.weight.std().item()
    assert residual < 0.02 / math.sqrt(2 * 4) * 1.3  # scaled by 1/sqrt(2 * n_layer)
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = make().eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, _, _ = model(idx)
        b, _, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_moe_every_places_and_names_moe_layers():
    model = make()
    assert list(model.moe_layers) == ["blocks.1.ffn", "blocks.3.ffn"]
    for name, layer in model.moe_layers.items():
        assert isinstance(layer, moesaic.MixtureOfExperts) and layer.expert_group_name == name
        assert all(p.group_name == name for p in layer.experts.parameters())
    assert isinstance(model.blocks[0].ffn, torch.nn.Sequential)
    assert len(make(moe_every=1).moe_layers) == 4
    assert list(make(moe_every=3).moe_layers) == ["blocks.2.ffn"]
    dense = make(moe_every=0)
    assert dense.moe_layers == {}
    _, _, aux = dense(torch.randint(0, 256, (1, 8)))
    assert aux.item() == 0.0
    assert moesaic.has_moe_layers(model)[0]


def test_aux_positive_and_objective_backpropagates_to_experts_and_gate():
    model = make(aux_loss_coef=0.5)
    idx, targets = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    _, loss, aux = model(idx, targets)
    assert aux.item() > 0
    objective = model.objective(loss, aux)
    assert torch.allclose(objective, loss + 0.5 * aux)
    objective.backward()
    moe = model.blocks[1].ffn
    assert moe.gate.wg.weight.grad is not None and moe.gate.wg.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in moe.experts.parameters())


def test_generate_length_determinism_and_mode():
    model = make().train()
    prompt = torch.randint(0, 256, (2, 5))
    out1 = model.generate(prompt, 20, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(1))
    out2 = model.generate(prompt, 20, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(1))
    assert out1.shape == (2, 25) and out1.dtype == torch.int64
    assert torch.equal(out1, out2) and torch.equal(out1[:, :5], prompt)
    assert model.training  # mode restored
    greedy = model.generate(prompt, 3, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 3, temperature=0))
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 256\], got 0"):
        model.generate(prompt, 1, top_k=0)
    with pytest.raises(TypeError, match=r"top_k must be an int or None, got float"):
        model.generate(prompt, 1, top_k=2.0)


def test_forward_rejects_too_long_sequences():
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        make()(torch.zeros(1, 17, dtype=torch.long))


def test_unigram_baseline_loss():
    assert unigram_baseline_loss(torch.ones(256)) == pytest.approx(math.log(256))
    counts = torch.zeros(256)
    counts[:2] = 5
    assert unigram_baseline_loss(counts) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="not all zero"):
        unigram_baseline_loss(torch.zeros(256))


@pytest.mark.parametrize("overrides, exc, match", [
    (dict(n_embd=30, n_head=4), ValueError, r"model.n_embd \(30\) must be divisible by model.n_head \(4\)"),
    (dict(moe=dict(num_experts=6), ep_size=4), ValueError,
     r"model.moe.num_experts \(6\) must be divisible by model.ep_size \(4\)"),
    (dict(moe=dict(k=5, num_experts=4)), ValueError, r"model.moe.k must be an int in \[1, model.moe.num_experts=4\], got 5"),
    (dict(moe=dict(k=0)), ValueError, r"model.moe.k must be an int in \[1, model.moe.num_experts=4\], got 0"),
    (dict(block_size=0), ValueError, r"block_size must be an int >= 1, got 0"),
    (dict(vocab_size=100), ValueError, r"vocab_size must be an int >= 256, got 100"),
    (dict(dropout=1.0), ValueError, r"dropout must be a finite number in \[0, 1\), got 1.0"),
    (dict(moe=dict(capacity_factor=0)), ValueError, r"model.moe.capacity_factor must be a finite number in \(0, inf\)"),
    (dict(n_layer=True), TypeError, r"n_layer must be an int, got bool"),
    (dict(moe=dict(drop_tokens=1)), TypeError, r"model.moe.drop_tokens must be a bool"),
])
def test_config_errors(overrides, exc, match):
    with pytest.raises(exc, match=match):
        GPTConfig.from_dict(overrides)


def test_config_dict_round_trip_and_prefixed_errors():
    cfg = GPTConfig.from_dict({"n_layer": 2, "moe": {"capacity_factor": 2}})
    assert cfg.moe.capacity_factor == 2.0 and isinstance(cfg.moe.capacity_factor, float)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig.from_dict({"n_layer": 2}).n_embd == 128
    with pytest.raises(ValueError, match=r"unknown key 'model.n_layers'; allowed keys under model: aux_loss_coef, "):
        GPTConfig.from_dict({"n_layers": 2})
    with pytest.raises(ValueError, match=r"model.moe.k must be an int in \[1, model.moe.num_experts=2\], got 3"):
        GPTConfig.from_dict({"moe": {"num_experts": 2, "k": 3}})
    with pytest.raises(ValueError, match=r"^net.moe.k must be an int in \[1, net.moe.num_experts=2\], got 3$"):
        GPTConfig.from_dict({"moe": {"num_experts": 2, "k": 3}}, "net")  # inside another tree: its own path
    with pytest.raises(TypeError):
        GPT({"n_layer": 2})
