"""The router options of today's MoE models, worked out by hand: scores, weights, group limit, the
expert bias and its update, the sequence-level balance loss, expert-choice routing, bad input."""

import math

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer.losses import sequence_balance_loss
from moesaic.layer.gate import RouterConfig, TopKGate, compute_routing


def _route_table(r):
    """{(token, expert): weight} of the kept routes."""
    return {(t, e): w for t, e, w in zip(r.token_idx_N.tolist(), r.expert_idx_N.tolist(), r.weight_N.tolist())}


# --- scores and weights -------------------------------------------------------------------------

def test_sigmoid_scores_norm_topk_prob_and_scaling_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    s = torch.sigmoid(logits[0])  # (0.881, 0.5, 0.269, 0.731): top-2 = experts 0 and 3
    cfg = dict(num_experts=4, k=2, drop_tokens=False, score_func="sigmoid", top2_2nd_expert_sampling=False)
    raw = compute_routing(logits, RouterConfig(**cfg, norm_topk_prob=False), training=False)
    assert _route_table(raw) == pytest.approx({(0, 0): s[0].item(), (0, 3): s[3].item()})
    norm = compute_routing(logits, RouterConfig(**cfg, norm_topk_prob=True, routed_scaling_factor=2.5), training=False)
    # w = 2.5 * s_e / (s_0 + s_3)
    want = {(0, e): 2.5 * (s[e] / (s[0] + s[3])).item() for e in (0, 3)}
    assert _route_table(norm) == pytest.approx(want)
    # the losses read the sigmoid scores normalised over the experts
    torch.testing.assert_close(norm.probs_SE[0], s / s.sum())


def test_softmax_after_topk_weights_the_chosen_logits_only():
    logits = torch.tensor([[3.0, 1.0, 2.0, -5.0], [0.0, 0.5, 0.25, 1.0]])
    r = compute_routing(logits, RouterConfig(num_experts=4, k=2, drop_tokens=False, softmax_after_topk=True,
                                             top2_2nd_expert_sampling=False), training=False)
    # token 0 keeps experts 0 and 2: softmax([3, 2]); token 1 keeps 3 and 1: softmax([1, 0.5])
    a, b = torch.softmax(torch.tensor([3.0, 2.0]), 0).tolist()
    c, d = torch.softmax(torch.tensor([1.0, 0.5]), 0).tolist()
    assert _route_table(r) == pytest.approx({(0, 0): a, (0, 2): b, (1, 3): c, (1, 1): d})


def test_norm_topk_prob_true_keeps_the_chosen_share_when_capacity_drops_a_route():
    # 3 tokens all prefer expert 0; token 2's 2nd choice is expert 2. Capacity 2 (min_capacity) drops
    # token 2's route to expert 0 (first choices in token order)
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    base = dict(num_experts=3, k=2, capacity_factor=0.1, min_capacity=2, top2_2nd_expert_sampling=False)
    p = torch.softmax(logits[2], 0)
    ds = compute_routing(logits, RouterConfig(**base), training=True)
    hf = compute_routing(logits, RouterConfig(**base, norm_topk_prob=True), training=True)
    assert (2, 0) not in _route_table(ds) and (2, 0) not in _route_table(hf)
    # DeepSpeed renormalises over the surviving route (weight 1); norm_topk_prob over the chosen two
    assert _route_table(ds)[(2, 2)] == pytest.approx(1.0)
    assert _route_table(hf)[(2, 2)] == pytest.approx((p[2] / (p[0] + p[2])).item())


def test_router_bias_is_a_gate_parameter_in_the_logits():
    gate = TopKGate(4, 3, router_bias=True)
    with torch.no_grad():
        gate.wg.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    assert "wg.bias" in dict(gate.named_parameters())
    x = torch.randn(6, 4)
    torch.testing.assert_close(gate.logits(x), x @ gate.wg.weight.t() + gate.wg.bias)


# --- group-limited top-k ------------------------------------------------------------------------

def test_group_limited_topk_by_hand():
    # 6 experts in 3 groups {0,1} {2,3} {4,5}; sigmoid scores of the logits below
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0, 2.5, -4.0]])
    s = torch.sigmoid(logits[0])
    # group scores = sum of the two best in each group: g0 = s0 + s1 = 0.953 + 0.047 = 1.0,
    # g1 = s2 + s3 = 0.731 * 2 = 1.462, g2 = s4 + s5 = 0.924 + 0.018 = 0.942 -> best 2 groups: g1, g0
    cfg = RouterConfig(num_experts=6, k=2, drop_tokens=False, score_func="sigmoid", n_group=3, topk_group=2,
                       norm_topk_prob=False, top2_2nd_expert_sampling=False)
    r = compute_routing(logits, cfg, training=False)
    # expert 4 (the 2nd best score overall) is in a dropped group: the top-2 among {0,1,2,3} is 0 and 2 or 3
    assert r.expert_ids_SK[0, 0].item() == 0 and r.expert_ids_SK[0, 1].item() in (2, 3)
    no_limit = compute_routing(logits, RouterConfig(num_experts=6, k=2, drop_tokens=False, score_func="sigmoid",
                                                    norm_topk_prob=False, top2_2nd_expert_sampling=False),
                               training=False)
    assert no_limit.expert_ids_SK[0].tolist() == [0, 4]
    assert _route_table(r)[(0, 0)] == pytest.approx(s[0].item())


# --- aux-loss-free bias -------------------------------------------------------------------------

def test_expert_bias_steers_selection_but_not_weights():
    logits = torch.tensor([[1.0, 0.0, 0.5]])
    cfg = RouterConfig(num_experts=3, k=1, drop_tokens=False, score_func="sigmoid", enable_expert_bias=True,
                       norm_topk_prob=False)
    r = compute_routing(logits, cfg, training=False, expert_bias_E=torch.tensor([0.0, 0.0, 0.6]))
    # choice scores 0.731, 0.5, 0.622 + 0.6 -> expert 2 chosen, weighted by its unbiased score 0.622
    assert r.expert_ids_SK.tolist() == [[2]]
    assert r.weight_N.item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())


def test_update_expert_bias_counts_micro_batches_in_training_and_steps_by_sign():
    torch.manual_seed(0)
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=2, drop_tokens=False, score_func="sigmoid",
                      enable_expert_bias=True, bias_update_rate=0.1, top2_2nd_expert_sampling=False)
    gate = moe.gate
    assert gate.expert_bias.dtype == torch.float32 and not any(n.endswith("expert_bias") for n, _ in
                                                                 moe.named_parameters())
    assert "deepspeed_moe.gate.expert_bias" in moe.state_dict()
    assert "deepspeed_moe.gate.expert_load" not in moe.state_dict()  # counts are not state
    x1, x2 = torch.randn(10, 8), torch.randn(6, 8)
    moe.eval()
    moe(x1)
    assert gate.expert_load.sum() == 0, "eval forwards do not count"
    moe.train()
    moe(x1)
    c1 = moe.exp_counts.clone()
    moe(x2)
    c2 = moe.exp_counts.clone()
    load = c1 + c2  # summed over both micro-batches: 16 tokens x k=2 = 32 routes
    assert torch.equal(gate.expert_load, load) and int(load.sum()) == 32
    loads = moesaic.update_expert_bias(moe)
    assert loads == {"ep_size_1": load.tolist()}
    # mean load is 8: bias += 0.1 * sign(8 - load)
    want = 0.1 * torch.sign(8.0 - load.float())
    torch.testing.assert_close(gate.expert_bias, want)
    assert gate.expert_load.sum() == 0
    moe(x1)
    assert moesaic.update_expert_bias(moe, apply=False) == {} and gate.expert_load.sum() == 0
    torch.testing.assert_close(gate.expert_bias, want)  # a skipped step leaves the bias alone


def test_expert_bias_stays_fp32_when_the_model_is_cast():
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=1, score_func="sigmoid", enable_expert_bias=True)
    with torch.no_grad():
        moe.gate.expert_bias.fill_(1e-3 + 1e-7)
    moe.to(torch.bfloat16)
    assert moe.gate.wg.weight.dtype == torch.bfloat16
    assert moe.gate.expert_bias.dtype == torch.float32 and moe.gate.expert_bias[0].item() == pytest.approx(1e-3 + 1e-7)
    out, _, _ = moe(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_default_layer_has_deepspeeds_keys_only():
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4)
    assert sorted(k for k in moe.state_dict() if not k.startswith("deepspeed_moe.experts")) == \
        ["deepspeed_moe.gate.wg.weight"]


# --- sequence-level balance loss ----------------------------------------------------------------

def test_sequence_balance_loss_by_hand():
    # 2 sequences of 2 tokens, 2 experts, k=1
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    ids = torch.tensor([[0], [0], [1], [0]])
    # seq 0: f = E/(K*T) * counts = 2/2 * (2, 0) = (2, 0); P = (0.7, 0.3): sum f*P = 1.4
    # seq 1: f = (1, 1); P = (0.4, 0.6): sum f*P = 1.0 -> mean 1.2, times coef 0.5 = 0.6
    torch.testing.assert_close(sequence_balance_loss(probs, ids, 2, 0.5), torch.tensor(0.6))
    # one sequence of 4: f = 2/4 * (3, 1) = (1.5, 0.5); P = (0.55, 0.45): 0.825 + 0.225 = 1.05
    torch.testing.assert_close(sequence_balance_loss(probs, ids, 1, 1.0), torch.tensor(1.05))
    # masking token 1 (its id is E=2): seq 0 has T=1: f = 2 * (1, 0), P = (0.8, 0.2): 1.6; mean (1.6 + 1.0) / 2
    masked = torch.tensor([[0], [2], [1], [0]])
    valid = torch.tensor([True, False, True, True])
    torch.testing.assert_close(sequence_balance_loss(probs, masked, 2, 1.0, valid), torch.tensor(1.3))
    assert sequence_balance_loss(probs, ids, 2, 0.0).item() == 0.0


def test_layer_reports_the_sequence_loss_per_row_of_a_3d_input():
    torch.manual_seed(0)
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=2, drop_tokens=False, seq_aux_loss_coef=0.01,
                      top2_2nd_expert_sampling=False)
    x = torch.randn(3, 5, 8)
    moe(x)
    r = moe.gate(x.reshape(15, 8), num_sequences=3)
    torch.testing.assert_close(moe.seq_aux_loss, sequence_balance_loss(r.probs_SE, r.expert_ids_SK, 3, 0.01))
    moe(x.reshape(15, 8))  # a 2-D input is one sequence of 15 tokens
    torch.testing.assert_close(moe.seq_aux_loss, sequence_balance_loss(r.probs_SE, r.expert_ids_SK, 1, 0.01))
    assert moe.seq_aux_loss.requires_grad


# --- expert choice ------------------------------------------------------------------------------

def test_expert_choice_by_hand():
    # 4 tokens, 2 experts, k=1, capacity_factor=1: C = ceil(4 / 2 * 1 * 1) = 2 tokens per expert
    logits = torch.tensor([[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.0, 3.0]])
    p = torch.softmax(logits, 1)
    cfg = RouterConfig(num_experts=2, k=1, min_capacity=0, routing_type="expert_choice")
    r = compute_routing(logits, cfg, training=True)
    # expert 0 takes its 2 best tokens by p[:, 0] = (0.881, 0.818, 0.731, 0.047): tokens 0, 1;
    # expert 1 by p[:, 1] = (0.119, 0.182, 0.269, 0.953): tokens 3, 2. Nobody takes... every token is taken.
    assert r.token_idx_N.tolist() == [0, 1, 3, 2] and r.expert_idx_N.tolist() == [0, 0, 1, 1]
    assert r.slot_N.tolist() == [0, 1, 0, 1] and r.capacity == 2 and r.tokens_per_expert_E.tolist() == [2, 2]
    torch.testing.assert_close(r.weight_N, p[[0, 1, 3, 2], [0, 0, 1, 1]])
    assert r.expert_ids_SK is None and r.l_aux.item() == 0.0 and r.num_unrouted_tokens() == 0
    # with capacity 1 each: token 0 to expert 0, token 3 to expert 1; tokens 1 and 2 go nowhere
    r1 = compute_routing(logits, RouterConfig(num_experts=2, k=1, capacity_factor=0.5, min_capacity=0,
                                              routing_type="expert_choice"), training=True)
    assert r1.token_idx_N.tolist() == [0, 3] and r1.num_unrouted_tokens() == 2
    # a masked token is never taken: mask token 0, expert 0 takes 1 and 2
    r2 = compute_routing(logits, cfg, training=True, used_token_S=torch.tensor([0, 1, 1, 1]))
    assert r2.token_idx_N.tolist() == [1, 2, 3, 2] and r2.num_valid_tokens == 3


def test_expert_choice_layer_outputs_and_telemetry():
    torch.manual_seed(0)
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=2, routing_type="expert_choice", capacity_factor=0.5)
    x = torch.randn(16, 8, requires_grad=True)
    out, l_aux, counts = moe(x)
    # C = ceil(16 / 4 * 0.5 * 2) = 4 tokens per expert; a token's output sums its experts' weighted outputs
    assert counts.tolist() == [4, 4, 4, 4] and moe.tokens_per_expert.tolist() == [4, 4, 4, 4]
    r = moe.gate(x.detach())
    want = torch.zeros(16, 8)
    for t, e, w in zip(r.token_idx_N.tolist(), r.expert_idx_N.tolist(), r.weight_N.tolist()):
        want[t] += w * moe.experts[e](x.detach()[t])
    torch.testing.assert_close(out.detach(), want)
    picked = len(set(r.token_idx_N.tolist()))
    assert moe.num_unrouted_tokens == 16 - picked
    out.sum().backward()
    assert moe.gate.wg.weight.grad is not None and moe.gate.wg.weight.grad.abs().sum() > 0


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(n_group=3, topk_group=1), ValueError, r"n_group must divide num_experts=8 .*got n_group=3; pick one of "
                                                r"\[1, 2, 4, 8\]"),
    (dict(n_group=2, topk_group=3), ValueError, r"topk_group must be an int in \[1, n_group=2\], got 3"),
    (dict(n_group=4, topk_group=1, k=3), ValueError,
     r"k must be at most the experts eligible under the group limit, topk_group x num_experts / n_group = "
     r"1 x 2 = 2, got k=3"),
    (dict(n_group=4), ValueError, r"n_group and topk_group go together"),
    (dict(enable_expert_bias=True, bias_update_rate=-0.1), ValueError,
     r"bias_update_rate must be a finite number in \[0, inf\), got -0.1"),
    (dict(bias_update_rate=0.01), ValueError, r"bias_update_rate=0.01 needs enable_expert_bias=True"),
    (dict(score_func="tanh"), ValueError, r"Unknown score_func 'tanh'; choose one of \['softmax', 'sigmoid'\]"),
    (dict(routing_type="expert_choice", drop_tokens=False), ValueError,
     r"routing_type='expert_choice' cannot honour drop_tokens=False"),
    (dict(routing_type="expert_choice", enable_expert_bias=True, seq_aux_loss_coef=0.1), ValueError,
     r"cannot honour enable_expert_bias=True, seq_aux_loss_coef=0.1.*Allowed with it: score_func"),
    (dict(routing_type="expert_choice", norm_topk_prob=True), ValueError, r"cannot honour norm_topk_prob=True"),
    (dict(routing_type="tokens"), ValueError, r"Unknown routing_type 'tokens'"),
    (dict(k=2, score_func="sigmoid"), ValueError, r"top2_2nd_expert_sampling=True .* pass top2_2nd_expert_sampling"),
    (dict(score_func="sigmoid", noisy_gate_policy="RSample"), ValueError, r"'RSample' .* score_func='sigmoid'"),
    (dict(softmax_after_topk=True, score_func="sigmoid"), ValueError, r"softmax_after_topk=True needs score_func"),
    (dict(softmax_after_topk=True, norm_topk_prob=True), ValueError, r"leave norm_topk_prob=None"),
    (dict(norm_topk_prob=1), TypeError, r"norm_topk_prob must be None or a bool, got int: 1"),
    (dict(routed_scaling_factor=0), ValueError, r"routed_scaling_factor must be a finite number in \(0, inf\)"),
    (dict(seq_aux_loss_coef=-1.0), ValueError, r"seq_aux_loss_coef must be a finite number in \[0, inf\)"),
])
def test_router_options_name_the_bad_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RouterConfig(**{"num_experts": 8, **kwargs})
    with pytest.raises(exc, match=match):  # and through the layer's keyword arguments
        moesaic.MoE(4, nn.Linear(4, 4), **{"num_experts": 8, **kwargs})


def test_gate_config_cannot_change_its_tensors():
    gate = TopKGate(4, 4)
    import dataclasses
    with pytest.raises(ValueError, match=r"config.router_bias=True does not match this gate"):
        gate.config = dataclasses.replace(gate.config, router_bias=True)
    with pytest.raises(ValueError, match=r"config.enable_expert_bias=True does not match"):
        gate.config = dataclasses.replace(gate.config, enable_expert_bias=True)
    with pytest.raises(TypeError, match=r"TopKGate got unknown options \['n_groups'\]"):
        TopKGate(4, 4, n_groups=2)


def test_expert_choice_capacity_matches_deepspeed_formula():
    cfg = RouterConfig(num_experts=4, k=2, capacity_factor=1.25, min_capacity=0, routing_type="expert_choice")
    assert cfg.capacity(64, training=True) == math.ceil(64 / 4 * 1.25 * 2)
