"""The MoE layer on one process: routing worked out by hand, dense equivalences, identity tags, errors."""

import math
import warnings

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer.router import RouterConfig, compute_routing, expert_capacity

D = 8


def mlp(d=D, h=16):
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))


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


# --- the layer ----------------------------------------------------------------------------------

def test_single_expert_equals_dense_mlp_in_output_and_grads():
    torch.manual_seed(0)
    dense = mlp()
    moe = moesaic.MoE(D, dense, num_experts=1, k=1, drop_tokens=False)
    x = torch.randn(3, 5, D, requires_grad=True)
    out, l_aux, counts = moe(x)
    # one expert: softmax over one logit is 1, so the layer is exactly the expert
    torch.testing.assert_close(out, dense(x))
    assert counts.tolist() == [15]
    out.pow(2).sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    dense.zero_grad()
    dense(xd).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    for p_moe, p_dense in zip(moe.experts[0].parameters(), dense.parameters()):
        torch.testing.assert_close(p_moe.grad, p_dense.grad)


def test_output_equals_explicit_per_token_sum():
    torch.manual_seed(1)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    x = torch.randn(20, D)
    out, _, _ = moe(x)
    logits = x @ moe.gate.wg.weight.t()
    g = torch.softmax(logits, 1)
    top = g.topk(2, dim=1)
    want = torch.zeros_like(x)
    for t in range(20):
        w = top.values[t] / top.values[t].sum()
        for j in range(2):
            want[t] += w[j] * moe.experts[int(top.indices[t, j])](x[t:t + 1])[0]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def test_no_dense_dispatch_tensor_even_at_huge_s_e_c():
    # a one-hot [S, E, C] fp32 tensor here would take 32768 * 512 * 128 * 4 B = 8 GiB
    torch.manual_seed(0)
    moe = moesaic.MoE(4, nn.Linear(4, 4), num_experts=512, k=2, capacity_factor=2.0)
    x = torch.randn(32768, 4)
    out, _, counts = moe(x)
    assert out.shape == x.shape and int(counts.sum()) == 65536


def test_experts_tagged_with_identity_and_dense_params_untagged():
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=1, expert_group_name="blocks.1.ffn", use_residual=True)
    assert len(moe.experts) == 4 and moe.num_local_experts == 4
    for i in range(4):
        for p in moe.experts[i].parameters():
            assert p.allreduce is False and p.group_name == "blocks.1.ffn" and p.expert_number == i
    for p in list(moe.gate.parameters()) + list(moe.mlp.parameters()) + list(moe.coefficient.parameters()):
        assert not hasattr(p, "allreduce") and not hasattr(p, "expert_number")
    assert isinstance(moe.gate.wg, nn.Linear) and moe.gate.wg.weight.shape == (4, D) and moe.gate.wg.bias is None


def test_default_name_is_deepspeeds_and_name_moe_layers_uses_module_paths():
    model = nn.ModuleDict({"a": moesaic.MoE(D, mlp(), num_experts=2), "b": moesaic.MoE(D, mlp(), num_experts=2)})
    assert model["a"].expert_group_name == "ep_size_1"
    named = moesaic.name_moe_layers(model)
    assert sorted(named) == ["a", "b"]
    assert {p.group_name for p in model["b"].experts.parameters()} == {"b"}


def test_used_token_masks_tokens_for_every_k():
    torch.manual_seed(0)
    for k in (1, 2, 3):
        moe = moesaic.MoE(D, mlp(), num_experts=4, k=k, drop_tokens=False, top2_2nd_expert_sampling=False)
        x = torch.randn(2, 6, D)
        used = torch.ones(2, 6, dtype=torch.bool)
        used[1, 2:] = False
        out, _, counts = moe(x, used)
        assert torch.all(out[1, 2:] == 0)
        assert int(counts.sum()) == 8 * k
        full, _, _ = moe(x)
        torch.testing.assert_close(out[~used.logical_not()], full[used])


def test_eval_mode_is_deterministic_and_uses_eval_capacity():
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=2, capacity_factor=0.25, eval_capacity_factor=4.0,
                      noisy_gate_policy="RSample")
    x = torch.randn(64, D)
    moe.eval()
    a, _, _ = moe(x)
    b, _, _ = moe(x)
    assert torch.equal(a, b)
    assert moe.num_dropped_routes == 0  # eval factor 4.0 makes room for every route
    moe.train()
    moe(x)
    assert moe.num_dropped_routes > 0  # train factor 0.25 does not


def test_z_loss_reported_separately():
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=1, z_loss_coef=1e-3)
    x = torch.randn(16, D)
    _, l_aux, _ = moe(x)
    logits = x @ moe.gate.wg.weight.t()
    torch.testing.assert_close(moe.z_loss, 1e-3 * torch.logsumexp(logits, 1).pow(2).mean())
    plain = moesaic.MoE(D, mlp(), num_experts=4, k=1)
    plain.load_state_dict(moe.state_dict())
    _, l_aux_plain, _ = plain(x)
    torch.testing.assert_close(l_aux, l_aux_plain)  # l_aux keeps DeepSpeed's meaning


def test_bf16_experts_and_fp32_router():
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=2).to(torch.bfloat16)
    x = torch.randn(32, D, dtype=torch.bfloat16, requires_grad=True)
    out, l_aux, _ = moe(x)
    assert out.dtype == torch.bfloat16 and l_aux.dtype == torch.float32
    (out.float().sum() + l_aux).backward()
    assert moe.gate.wg.weight.grad is not None and torch.isfinite(moe.gate.wg.weight.grad.float()).all()


def test_non_finite_input_propagates():
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=1, drop_tokens=False)
    x = torch.randn(8, D)
    x[3, 0] = float("nan")
    out, _, _ = moe(x)
    assert torch.isnan(out[3]).any()
    assert torch.isfinite(out[[0, 1, 2, 4, 5, 6, 7]]).all()


def test_unused_experts_get_zero_grads_not_none():
    moe = moesaic.MoE(D, mlp(), num_experts=8, k=1, drop_tokens=False)
    out, _, counts = moe(torch.randn(2, D))
    out.sum().backward()
    idle = [i for i in range(8) if counts[i] == 0]
    assert idle
    for i in idle:
        for p in moe.experts[i].parameters():
            assert p.grad is not None and torch.all(p.grad == 0)


def test_use_tutel_warns_once_per_calling_line_and_is_ignored():
    with pytest.warns(UserWarning, match="use_tutel is ignored"):
        moesaic.MoE(D, mlp(), num_experts=2, use_tutel=True)
    # Python's default filter reports a warning once per location; the location is the caller's line
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            moe = moesaic.MoE(D, mlp(), num_experts=2, use_tutel=True)
    assert [str(w.message) for w in seen] == ["MoE(use_tutel=True): moesaic always dispatches by index; "
                                              "use_tutel is ignored"]
    assert seen[0].filename == __file__
    out, _, _ = moe(torch.randn(4, D))
    assert out.shape == (4, D)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_experts=6, ep_size=4), ValueError, r"num_experts \(6\) must be divisible .* ep_size \(4\)"),
    (dict(num_experts=4, k=0), ValueError, r"k must be an int in \[1, num_experts=4\], got 0"),
    (dict(num_experts=4, k=5), ValueError, r"k must be an int in \[1, num_experts=4\], got 5"),
    (dict(num_experts=4, noisy_gate_policy="Gaussian"), ValueError, r"Unknown noisy_gate_policy 'Gaussian'"),
    (dict(num_experts=4, drop_policy="random"), ValueError, r"Unknown drop_policy 'random'"),
    (dict(num_experts=4, capacity_factor=0.0), ValueError, r"capacity_factor must be a finite number in \(0, inf\), got 0.0"),
    (dict(num_experts=4, eval_capacity_factor=-1), ValueError, r"eval_capacity_factor must be"),
    (dict(num_experts=4, min_capacity=-1), ValueError, r"min_capacity must be an int >= 0, got -1"),
    (dict(num_experts=4, k=1.5), TypeError, r"k must be an int, got float: 1.5"),
    (dict(num_experts=4, drop_tokens=1), TypeError, r"drop_tokens must be a bool, got int: 1"),
    (dict(num_experts=4, expert_group_name=""), ValueError, r"expert_group_name must be a non-empty str"),
    (dict(num_experts=4, z_loss_coef=-1.0), ValueError, r"z_loss_coef must be a finite number in \[0, inf\), got -1.0"),
    (dict(num_experts=4, enable_expert_tensor_parallelism=True), ValueError, r"no tensor parallelism"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        moesaic.MoE(D, mlp(), **kwargs)


def test_bad_expert_and_hidden_size():
    with pytest.raises(TypeError, match="expert must be a torch.nn.Module"):
        moesaic.MoE(D, lambda x: x, num_experts=2)
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got 0"):
        moesaic.MoE(0, mlp(), num_experts=2)


def test_bad_forward_inputs():
    moe = moesaic.MoE(D, mlp(), num_experts=2)
    with pytest.raises(ValueError, match=r"last dimension hidden_size=8, got shape \(4, 7\)"):
        moe(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"used_token must have shape \(2, 3\) or \(6,\)"):
        moe(torch.randn(2, 3, D), torch.ones(5))
    with pytest.raises(ValueError, match="used_token must hold only 0 and 1"):
        moe(torch.randn(6, D), torch.full((6,), 0.5))
    with pytest.raises(TypeError, match="hidden_states must be a Tensor"):
        moe([[0.0] * D])


def test_expert_parallel_layer_without_process_group_says_what_to_do():
    moe = moesaic.MoE(D, mlp(), num_experts=4, ep_size=2)
    assert moe.num_local_experts == 2 and len(moe.experts) == 2
    with pytest.raises(RuntimeError, match="no expert-parallel process group"):
        moe(torch.randn(4, D))


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


class _InPlaceFirst(nn.Module):
    """An expert that scales its input in place before its first matmul."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        x.mul_(2.0)
        return self.lin(x)


@pytest.mark.parametrize("expert_factory", [mlp, _InPlaceFirst])
def test_grads_match_a_per_token_reference(expert_factory):
    # the layer re-gathers expert inputs in backward instead of keeping them; the gradients must
    # equal those of an explicit per-token loop, also for an expert that edits its input in place
    torch.manual_seed(0)
    moe = moesaic.MoE(D, expert_factory(), num_experts=3, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    x = torch.randn(12, D, requires_grad=True)
    out, _, _ = moe(x)
    out.pow(2).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in moe.experts.parameters()]

    moe.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.softmax(x2 @ moe.gate.wg.weight.t(), 1)
    top = g.topk(2, dim=1)
    rows = []
    for t in range(12):
        w = top.values[t] / top.values[t].sum()
        rows.append(sum(w[j] * moe.experts[int(top.indices[t, j])](x2[t:t + 1].clone())[0] for j in range(2)))
    torch.stack(rows).pow(2).sum().backward()
    want = [x2.grad] + [p.grad for p in moe.experts.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
