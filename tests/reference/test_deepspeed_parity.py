"""Numerical parity with DeepSpeed 0.19.8's MoE layer.

Runs where ``deepspeed`` is importable (``make parity`` builds ``.venv-deepspeed`` for it; it is
never a runtime dependency). Both layers get the same router and expert weights and the same
inputs in a deterministic setting (no random token selection, no noise, no 2nd-expert sampling);
``output``, ``l_aux``, ``exp_counts`` and the gradients of the input and of every parameter must
agree within fp32 round-off, for k = 1, 2, 4, capped and dropless, in train and eval mode.

One documented exception: k=1 with dropping and ``use_rts=False``. DeepSpeed keeps whichever of
the tied tokens ``torch.topk`` returns; moesaic keeps the earliest. There we check every other
output and that exactly ``capacity`` tokens survive in each over-full expert.
"""

import logging
import os

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed not installed (make parity builds .venv-deepspeed)")
from deepspeed.moe.layer import MoE as DSMoE  # noqa: E402

import moesaic  # noqa: E402
from moesaic.layer.gate import expert_capacity  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

D, H, E = 16, 32, 8
ATOL, RTOL = 2e-6, 2e-5


def make_expert():
    return nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))


def build_pair(k, drop_tokens, capacity_factor, use_residual=False, min_capacity=4, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(num_experts=E, k=k, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor * 1.5,
                  min_capacity=min_capacity, use_residual=use_residual, drop_tokens=drop_tokens, use_rts=False,
                  top2_2nd_expert_sampling=False)
    ds = DSMoE(D, make_expert(), **kwargs)
    ours = moesaic.MoE(D, make_expert(), **kwargs)
    # an uneven router so that experts overflow
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.mul_(4.0)
    ours.load_state_dict(ds.state_dict(), strict=True)  # the same module structure, the same keys
    return ds, ours


def run(layer, x, used_token=None):
    x = x.clone().requires_grad_(True)
    out, l_aux, counts = layer(x, used_token)
    # a loss that weights every output element differently, plus l_aux, so all grads are exercised
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (torch.sum(out * weights) + 0.1 * l_aux).backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}
    return out.detach(), l_aux.detach(), counts, x.grad, grads


def assert_close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


CASES = [(k, drop, cf, train) for k in (1, 2, 4) for drop, cf in ((True, 1.0), (True, 0.5), (False, 1.0))
         for train in (True, False)]


@pytest.mark.parametrize("k,drop_tokens,capacity_factor,train", CASES)
def test_matches_deepspeed(k, drop_tokens, capacity_factor, train):
    ds, ours = build_pair(k, drop_tokens, capacity_factor)
    ds.train(train)
    ours.train(train)
    x = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(1))
    d_out, d_aux, d_counts, d_xg, d_grads = run(ds, x)
    o_out, o_aux, o_counts, o_xg, o_grads = run(ours, x)

    assert_close(o_aux, d_aux, "l_aux")
    assert torch.equal(o_counts, d_counts.to(o_counts.dtype)), f"exp_counts {o_counts} != {d_counts}"
    if k == 1 and drop_tokens:
        # tie order differs; the kept set is pinned by the capacity and by DeepSpeed's own kept rows
        factor = capacity_factor if train else capacity_factor * 1.5
        capacity = expert_capacity(64, E, factor, 1, 4)
        assert torch.equal(ours.tokens_per_expert, o_counts.clamp(max=capacity))
        kept_ds = d_out.reshape(-1, D).abs().sum(1) > 0
        kept_ours = o_out.reshape(-1, D).abs().sum(1) > 0
        assert int(kept_ds.sum()) == int(kept_ours.sum())
        both = kept_ds & kept_ours
        assert_close(o_out.reshape(-1, D)[both], d_out.reshape(-1, D)[both], "output of tokens both keep")
        return
    if drop_tokens:
        assert ours.num_dropped_routes > 0 or capacity_factor >= 1.0, "case should exercise dropping"
    assert_close(o_out, d_out, "output")
    assert_close(o_xg, d_xg, "input grad")
    assert list(o_grads) == list(d_grads)
    for name in o_grads:
        assert_close(o_grads[name], d_grads[name], f"grad of {name}")


@pytest.mark.parametrize("k", [1, 2])
def test_residual_moe_matches_deepspeed(k):
    ds, ours = build_pair(k, drop_tokens=False, capacity_factor=1.0, use_residual=True)
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(2))
    d = run(ds, x)
    o = run(ours, x)
    for a, b, what in zip(o[:2], d[:2], ("output", "l_aux")):
        assert_close(a, b, what)
    assert_close(o[3], d[3], "input grad")
    dg = d[4]
    assert list(o[4]) == list(dg)
    for name in o[4]:
        assert_close(o[4][name], dg[name], f"grad of {name}")


def test_used_token_top1_matches_deepspeed():
    ds, ours = build_pair(1, drop_tokens=False, capacity_factor=1.0)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(3))
    used = (torch.arange(32) % 3 != 0).long()
    d = run(ds, x, used)
    o = run(ours, x, used)
    assert_close(o[0], d[0], "output")
    assert_close(o[1], d[1], "l_aux")
    assert torch.equal(o[2], d[2].long())
    assert_close(o[3], d[3], "input grad")


def test_capacity_formula_matches_deepspeed():
    from deepspeed.moe.sharded_moe import _capacity
    for S in (1, 7, 64, 100, 2048, 4097):
        for e in (1, 3, 8, 64):
            for cf in (0.1, 0.3, 1.0, 1.1, 1.25, 2.0):
                for k in (1, 2, 4):
                    gates = torch.empty(S, e)
                    want = int(_capacity(gates, torch.tensor(cf * k), torch.tensor(4)))
                    assert expert_capacity(S, e, cf, k, 4) == want, (S, e, cf, k)
