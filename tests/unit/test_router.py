"""The router: routing worked out by hand, RouterConfig validation, the fingerprint, the losses."""

import dataclasses
import math

import pytest
import torch

import moesaic
from moesaic.layer.losses import load_balancing_loss, router_z_loss
from moesaic.layer.gate import RouterConfig, TopKGate, compute_routing, config_fingerprint, expert_capacity


# --- routing by hand ----------------------------------------------------------------------------

def test_top1_routing_by_position_keeps_first_tokens():
    # 5 tokens, 2 experts; tokens 0,1,3,4 prefer expert 0, token 2 prefers expert 1.
    logits = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [4.0, 0.0]])
    # capacity = max(ceil(5 / 2 * 0.1 * 1), min_capacity=2) = 2
    config = RouterConfig(num_experts=2, k=1, capacity_factor=0.1, min_capacity=2, use_rts=False)
    r = compute_routing(logits, config, training=True)
    assert r.capacity == 2
    # expert-major order: expert 0 keeps tokens 0 and 1 (3 and 4 dropped), expert 1 keeps token 2
    assert r.token_idx_N.tolist() == [0, 1, 2]
    assert r.expert_idx_N.tolist() == [0, 0, 1]
    assert r.slot_N.tolist() == [0, 1, 0]
    assert r.exp_counts_E.tolist() == [4, 1]
    assert r.tokens_per_expert_E.tolist() == [2, 1]
    assert r.num_dropped == 2
    gates = torch.softmax(logits, 1)
    # k=1 weights are the raw probabilities (no renormalisation)
    torch.testing.assert_close(r.weight_N, gates[[0, 1, 2], [0, 0, 1]])
    # l_aux = E * sum_e mean_prob_e * frac_e = 2 * (me0 * 4/5 + me1 * 1/5)
    me = gates.mean(0)
    torch.testing.assert_close(r.l_aux, 2 * (me[0] * 0.8 + me[1] * 0.2))


def test_top2_places_first_choices_ahead_of_second_choices():
    # 3 tokens, 3 experts. Choices (1st, 2nd): t0 (1, 0), t1 (0, 1), t2 (1, 2).
    logits = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    # capacity = max(ceil(3 / 3 * 0.1 * 2), min_capacity=2) = 2
    config = RouterConfig(num_experts=3, k=2, capacity_factor=0.1, min_capacity=2, top2_2nd_expert_sampling=False)
    r = compute_routing(logits, config, training=True)
    assert r.capacity == 2 and r.expert_ids_SK.tolist() == [[1, 0], [0, 1], [1, 2]]
    # expert 1 receives t0 (1st), t2 (1st) and t1 (2nd): first choices win, t1's 2nd choice is dropped
    assert r.exp_counts_E.tolist() == [2, 3, 1]
    pairs = list(zip(r.expert_idx_N.tolist(), r.token_idx_N.tolist()))
    # inside a block routes stand in priority order: expert 0 holds t1 (a 1st choice) before t0 (a 2nd)
    assert pairs == [(0, 1), (0, 0), (1, 0), (1, 2), (2, 2)]
    # t1 lost its 2nd route, so its 1st route's weight renormalises to exactly 1
    w = dict(zip(pairs, r.weight_N.tolist()))
    assert w[(0, 1)] == pytest.approx(1.0)
    g = torch.softmax(logits, 1)
    assert w[(1, 0)] == pytest.approx((g[0, 1] / (g[0, 1] + g[0, 0])).item())


def test_topk_probs_policy_keeps_highest_probabilities():
    # 4 tokens, 4 experts, k=3, capacity 2: expert 0 is chosen by all four tokens.
    logits = torch.tensor([[0.5, 3, 2, 1], [3.0, 2, 1, 0], [1.0, 0, 2, 3], [2.5, 0, 1, 3]])
    # capacity = max(ceil(4 / 4 * 0.1 * 3), min_capacity=2) = 2; drop_policy defaults to "probs" for k > 2
    r = compute_routing(logits, RouterConfig(num_experts=4, k=3, capacity_factor=0.1, min_capacity=2), training=True)
    assert r.capacity == 2 and r.config.drop_policy == "probs"
    g = torch.softmax(logits, 1)
    kept = sorted(t for e, t in zip(r.expert_idx_N.tolist(), r.token_idx_N.tolist()) if e == 0)
    want = sorted(g[:, 0].argsort(descending=True)[:2].tolist())
    assert kept == want == [1, 3]


def test_dropless_keeps_every_route_and_weights_sum_to_one():
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 5
    r = compute_routing(logits, RouterConfig(num_experts=8, k=2, drop_tokens=False), training=False)
    assert r.capacity is None
    assert r.num_dropped == 0 and r.token_idx_N.numel() == 128
    per_token = torch.zeros(64).index_add(0, r.token_idx_N, r.weight_N)
    torch.testing.assert_close(per_token, torch.ones(64))
    assert torch.all(r.expert_idx_N[1:] >= r.expert_idx_N[:-1]), "routes must be in expert order"


def test_rts_keeps_exactly_capacity_and_is_random():
    logits = torch.zeros(40, 2)
    logits[:, 0] = 1.0  # all 40 tokens want expert 0
    kept = set()
    for seed in range(3):
        torch.manual_seed(seed)
        # capacity = ceil(40 / 2 * 0.5) = 10
        r = compute_routing(logits, RouterConfig(num_experts=2, k=1, capacity_factor=0.5, min_capacity=0),
                            training=True)
        assert r.tokens_per_expert_E.tolist() == [10, 0]
        kept.add(tuple(sorted(r.token_idx_N.tolist())))
    assert len(kept) > 1, "random token selection must not always keep the same tokens"


def test_capacity_formula():
    # ceil(S / E * factor * k), floored at min_capacity
    assert expert_capacity(64, 8, 1.0, 1, 4) == 8
    assert expert_capacity(64, 8, 1.25, 2, 4) == 20
    assert expert_capacity(10, 8, 1.0, 1, 4) == 4  # ceil(1.25) = 2 < min_capacity 4
    assert expert_capacity(100, 3, 1.0, 1, 0) == 34


def test_capacity_never_exceeded_over_many_shapes():
    g = torch.Generator().manual_seed(0)
    for S in (1, 3, 17, 64):
        for k in (1, 2, 3):
            for cf in (0.5, 1.0, 1.5):
                logits = torch.randn(S, 4, generator=g) * 3
                cap = expert_capacity(S, 4, cf, k, 1)
                config = RouterConfig(num_experts=4, k=k, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=1)
                r = compute_routing(logits, config, training=False)
                assert r.capacity == cap
                assert int(r.tokens_per_expert_E.max()) <= cap
                assert torch.equal(r.tokens_per_expert_E, r.exp_counts_E.clamp(max=cap))
                assert r.token_idx_N.numel() == int(r.tokens_per_expert_E.sum())
                assert math.isfinite(float(r.l_aux))




# --- RouterConfig -------------------------------------------------------------------------------

def test_config_resolves_drop_policy_and_is_frozen():
    assert RouterConfig(num_experts=4, k=2).drop_policy == "position"
    assert RouterConfig(num_experts=4, k=3).drop_policy == "probs"
    assert RouterConfig(num_experts=4, k=2) == RouterConfig(num_experts=4, k=2, drop_policy="position")
    config = RouterConfig(num_experts=4, capacity_factor=2)
    assert isinstance(config.capacity_factor, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k = 2


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_experts=0), ValueError, r"num_experts must be an int >= 1, got 0"),
    (dict(num_experts=4, k=5), ValueError, r"k must be an int in \[1, num_experts=4\], got 5"),
    (dict(num_experts=4, eval_capacity_factor=float("nan")), ValueError, r"eval_capacity_factor must be a finite"),
    (dict(num_experts=4, capacity_factor="1"), TypeError, r"capacity_factor must be a number, got str: '1'"),
    (dict(num_experts=4, min_capacity=2.0), TypeError, r"min_capacity must be an int, got float: 2.0"),
    (dict(num_experts=4, use_rts="yes"), TypeError, r"use_rts must be a bool, got str: 'yes'"),
    (dict(num_experts=4, top2_2nd_expert_sampling=None), TypeError, r"top2_2nd_expert_sampling must be a bool"),
    (dict(num_experts=4, noisy_gate_policy="gumbel"), ValueError,
     r"Unknown noisy_gate_policy 'gumbel'; choose one of \[None, 'None', 'Jitter', 'RSample'\]"),
    (dict(num_experts=4, z_loss_coef=True), TypeError, r"z_loss_coef must be a number, got bool"),
])
def test_config_names_the_bad_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RouterConfig(**kwargs)


def test_capacity_follows_mode_and_drop_tokens():
    config = RouterConfig(num_experts=8, k=2, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    # ceil(64 / 8 * 1.0 * 2) = 16 in training, ceil(64 / 8 * 2.0 * 2) = 32 in eval
    assert config.capacity(64, training=True) == 16 and config.capacity(64, training=False) == 32
    assert dataclasses.replace(config, drop_tokens=False).capacity(64, training=True) is None


def test_fingerprint_covers_every_config_field():
    # a field added to RouterConfig is covered without touching the expert-parallel code
    base = RouterConfig(num_experts=8, k=2, top2_2nd_expert_sampling=False)
    # a second value per field; fields that only exist together change together (both differ in the fingerprint)
    other_values = dict(num_experts=16, k=3, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0,
                        noisy_gate_policy="Jitter", drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=True,
                        drop_policy="probs", z_loss_coef=1e-3, score_func="sigmoid", softmax_after_topk=True,
                        router_bias=True, norm_topk_prob=True, routed_scaling_factor=2.5,
                        n_group=dict(n_group=2, topk_group=2), topk_group=dict(n_group=2, topk_group=1),
                        enable_expert_bias=True, bias_update_rate=dict(enable_expert_bias=True, bias_update_rate=0.01),
                        seq_aux_loss_coef=1e-3, routing_type="expert_choice", use_residual=True,
                        stacked_experts=True, shared_experts=1, shared_expert_gate=dict(shared_experts=1,
                                                                                        shared_expert_gate=True))
    assert set(other_values) == {f.name for f in dataclasses.fields(RouterConfig)}
    fp = config_fingerprint(base, 64, torch.float32)
    assert fp == config_fingerprint(RouterConfig(num_experts=8, k=2, top2_2nd_expert_sampling=False), 64,
                                    torch.float32)  # equal configs agree
    seen = {fp}
    for name, value in other_values.items():
        change = value if isinstance(value, dict) else {name: value}
        other = config_fingerprint(dataclasses.replace(base, **change), 64, torch.float32)
        assert other not in seen, name
        seen.add(other)
    assert config_fingerprint(base, 32, torch.float32) != fp
    assert config_fingerprint(base, 64, torch.bfloat16) != fp
    assert 0 <= fp < 2**31


# --- TopKGate -----------------------------------------------------------------------------------

def test_gate_reads_options_by_deepspeeds_names_and_changes_them_through_its_config():
    gate = TopKGate(8, 4, k=2, capacity_factor=1.25, min_capacity=0)
    assert (gate.num_experts, gate.k, gate.capacity_factor, gate.min_capacity) == (4, 2, 1.25, 0)
    assert gate.wg.weight.shape == (4, 8) and gate.wg.bias is None
    with pytest.raises(AttributeError, match=r"gate.config = dataclasses.replace\(gate.config, k=1\)"):
        gate.k = 1
    gate.config = dataclasses.replace(gate.config, capacity_factor=2.0)
    # ceil(16 / 4 * 2.0 * 2) = 16
    assert gate.capacity_factor == 2.0 and gate.capacity(16) == 16
    with pytest.raises(ValueError, match=r"config.num_experts \(8\) must equal the router's 4 outputs"):
        gate.config = RouterConfig(num_experts=8)
    with pytest.raises(TypeError, match="config must be a moesaic.MoEConfig, got dict"):
        gate.config = {"num_experts": 4}
    twin = TopKGate.from_config(8, gate.config)
    assert twin.config == gate.config
    with pytest.raises(ValueError, match="model_dim must be an int >= 1, got 0"):
        TopKGate(0, 4)


def test_gate_routes_in_fp32_and_records_its_config():
    torch.manual_seed(0)
    gate = TopKGate(8, 4, k=2).to(torch.bfloat16)
    x = torch.randn(10, 8, dtype=torch.bfloat16)
    r = gate.eval()(x)
    assert r.probs_SE.dtype == torch.float32 and r.weight_N.dtype == torch.float32
    assert r.config is gate.config
    torch.testing.assert_close(r.probs_SE, torch.softmax(x.float() @ gate.wg.weight.float().t(), dim=1))
    assert torch.equal(r.expert_ids_SK[:, 0], r.probs_SE.argmax(1))


# --- losses -------------------------------------------------------------------------------------

def test_load_balancing_loss_by_hand():
    # 4 tokens, 2 experts: mean probabilities me = (0.6, 0.4)
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.3, 0.7]])
    # k=1: choices 0, 0, 0, 1 -> ce = (3/4, 1/4); l_aux = E * sum(me * ce) = 2 * (0.45 + 0.1) = 1.1
    ids_1 = torch.tensor([[0], [0], [0], [1]])
    counts_1 = torch.tensor([3, 1])
    torch.testing.assert_close(load_balancing_loss(probs, ids_1, counts_1, 1), torch.tensor(1.1))
    # k=2: first choices as above; l_aux = E^2 * mean(me * ce) = 4 * (0.45 + 0.1) / 2 = 1.1
    ids_2 = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    torch.testing.assert_close(load_balancing_loss(probs, ids_2, torch.tensor([4, 4]), 2), torch.tensor(1.1))
    # k=3 (3 experts): ce = exp_counts / S; l_aux = E^2 / k * mean(me * ce)
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    ids3 = torch.tensor([[0, 1, 2], [1, 2, 0]])
    counts3 = torch.tensor([2, 2, 2])
    me = probs3.mean(0)  # (0.35, 0.4, 0.25); ce = (1, 1, 1)
    torch.testing.assert_close(load_balancing_loss(probs3, ids3, counts3, 3), 9 / 3 * me.mean())
    # a masked token (id E) chooses nothing but still counts in S: k=1, ce = (2/4, 1/4)
    ids_masked = torch.tensor([[0], [0], [2], [1]])
    want = 2 * (0.6 * 0.5 + 0.4 * 0.25)
    torch.testing.assert_close(load_balancing_loss(probs, ids_masked, torch.tensor([2, 1]), 1), torch.tensor(want))


def test_z_loss_by_hand_and_exactly_zero_when_off():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # logsumexp = (log 2, 1 + log 2); z = coef * mean(lse^2)
    lse = torch.tensor([math.log(2), 1 + math.log(2)])
    torch.testing.assert_close(router_z_loss(logits, 0.5), 0.5 * (lse ** 2).mean())
    zero = router_z_loss(logits, 0.0)
    assert zero.item() == 0.0 and zero.dtype == logits.dtype


def test_layer_l_aux_equals_the_pure_function():
    torch.manual_seed(0)
    moe = moesaic.MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=2, top2_2nd_expert_sampling=False)
    x = torch.randn(32, 8)
    _, l_aux, counts = moe(x)
    r = moe.gate(x)
    torch.testing.assert_close(l_aux, load_balancing_loss(r.probs_SE, r.expert_ids_SK, r.exp_counts_E, 2))
    assert torch.equal(counts, r.exp_counts_E)
