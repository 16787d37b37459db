"""Stacked experts on CUDA: the grouped-matmul path (``F.grouped_mm``, bf16, sm90+) against the loop.

Skipped without CUDA, and the grouped-matmul comparison without a compute-capability-9.0 device.
The loop path is the one the CPU suite proves identical to per-module experts; here the grouped
path must agree with it to bf16 round-off (outputs, input and weight gradients), with experts
that receive no token, with biases (GPT-OSS's clamped SwiGLU) and with a two-layer FFN; and the
layer options of today's routers must run on CUDA with every tensor on the device.
"""

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer.stacked import _grouped_mm_usable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

D, F, E = 64, 128, 8


def _grouped_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) and \
        hasattr(torch.nn.functional, "grouped_mm")


def _experts():
    return [moesaic.GLUExpert(D, F), moesaic.GLUExpert(D, F, bias=True, swiglu_limit=7.0),
            nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))]


@pytest.mark.skipif(not _grouped_available(), reason="grouped_mm needs compute capability >= 9.0")
@pytest.mark.parametrize("which", [0, 1, 2], ids=["swiglu", "clamped_swiglu_bias", "ffn"])
def test_grouped_mm_matches_the_loop(which):
    torch.manual_seed(0)
    layer = moesaic.MoE(D, _experts()[which], num_experts=E, k=2, drop_tokens=False, top2_2nd_expert_sampling=False,
                        stacked_experts=True).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.05)
        layer.gate.wg.weight[E - 1].fill_(-100.0)  # expert E-1 gets no token
    assert _grouped_mm_usable(layer.experts.projections()[0].weight)
    x = torch.randn(4, 96, D, device="cuda", dtype=torch.bfloat16)
    results = []
    for grouped in (False, True):
        layer.experts.use_grouped_mm = grouped
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out, _, counts = layer(xi)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view(out.shape)).sum().backward()
        results.append((out.float(), xi.grad.float(), [p.grad.float() for p in layer.experts.parameters()]))
        assert counts[E - 1] == 0
    (o1, g1, w1), (o2, g2, w2) = results
    torch.testing.assert_close(o2, o1, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(g2, g1, atol=2e-2, rtol=2e-2)
    for a, b in zip(w2, w1):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
        assert torch.equal(a[E - 1], torch.zeros_like(a[E - 1]))  # the idle expert: zero gradient


def test_modern_router_options_run_on_cuda():
    torch.manual_seed(0)
    layer = moesaic.MoE(D, moesaic.GLUExpert(D, F), num_experts=E, k=3, drop_tokens=False, score_func="sigmoid",
                        norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2,
                        enable_expert_bias=True, seq_aux_loss_coef=1e-3, stacked_experts=True,
                        shared_expert=moesaic.GLUExpert(D, F)).cuda()
    x = torch.randn(2, 16, D, device="cuda", requires_grad=True)
    out, l_aux, _ = layer(x)
    (out.sum() + l_aux + layer.seq_aux_loss).backward()
    assert out.device.type == "cuda" and layer.gate.expert_load.device.type == "cuda"
    moesaic.update_expert_bias(layer)
    assert layer.gate.expert_bias.device.type == "cuda" and layer.gate.expert_bias.abs().sum() > 0
    ec = moesaic.MoE(D, moesaic.GLUExpert(D, F), num_experts=E, k=2, routing_type="expert_choice").cuda()
    out, _, _ = ec(x)
    out.sum().backward()
    assert ec.num_unrouted_tokens >= 0
