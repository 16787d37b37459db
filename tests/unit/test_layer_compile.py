"""``torch.compile`` and the MoE layer: what compiles as one graph and what breaks it (docs/architecture-layer.md).

The capacity is host arithmetic on the token count (pure Python, float32-exact), so under
``torch.compile`` with a static token count it is a constant, not a ``.item()`` graph break. The
rest of the routing and the dispatch have data-dependent sizes (kept routes, tokens per expert),
so the layer compiles with graph breaks, and ``fullgraph=True`` compiles the router's logits and
capacity, not the layer. Every trace uses ``backend="eager"`` (Dynamo only, no code generation):
the router's is tiny; the layer's, marked ``slow``, takes a few seconds on a CPU.
"""

import random

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer.gate import expert_capacity

torch_dynamo = pytest.importorskip("torch._dynamo")


def _tensor_capacity(S, E, capacity_factor, k, min_capacity):
    """DeepSpeed's form: ``ceil(S / E * factor)`` with the factor in a float32 tensor."""
    factor = torch.tensor(capacity_factor * k, dtype=torch.float32)
    return max(int(torch.ceil((S / E) * factor).item()), min_capacity)


def test_expert_capacity_is_the_float32_tensor_formula_to_the_slot():
    # factors whose float32 and float64 values differ (0.1, 1.1, 1/3...) and token counts where
    # S / E * factor lands on or next to an integer, where a double-precision formula would round
    # differently: e.g. S=100, E=1, factor 0.07: in doubles 100 * 0.07 = 7.000000000000001, ceil 8;
    # in float32, 0.07 is 0.070000000298..., and 100 * that rounds to 7.0 exactly, ceil 7
    rng = random.Random(0)
    factors = [1.0, 1.25, 0.07, 0.1, 1.1, 2.0, 0.3, 1 / 3, 0.7, 1.2, 1.5, 0.01, 3.7, 0.9, 1.05]
    cases = [(S, E, f, k) for S in range(0, 130) for E in (1, 3, 4, 7, 64) for f in factors for k in (1, 2, 3)]
    cases += [(rng.randrange(10 ** 7), rng.randrange(1, 300), rng.uniform(0, 8), rng.randrange(1, 9))
              for _ in range(3000)]
    for S, E, f, k in cases:
        assert expert_capacity(S, E, f, k, 0) == _tensor_capacity(S, E, f, k, 0), (S, E, f, k)
    assert expert_capacity(100, 1, 0.07, 1, 0) == 7  # the float32 rounding, worked out above
    assert expert_capacity(3, 4, 1.0, 1, 4) == 4  # min_capacity floors it


def test_the_router_logits_and_capacity_compile_as_one_graph():
    torch.manual_seed(0)
    gate = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=2, capacity_factor=1.1).gate

    def logits_and_capacity(x):
        return gate.logits(x), gate.capacity(x.shape[0])

    # no graph break (a tensor .item() in the capacity was one), and so fullgraph=True compiles it
    assert torch_dynamo.explain(logits_and_capacity)(torch.randn(10, 8)).graph_break_count == 0
    compiled = torch.compile(logits_and_capacity, fullgraph=True, backend="eager")
    x = torch.randn(10, 8)
    logits, capacity = compiled(x)
    assert torch.equal(logits, gate.logits(x))
    assert capacity == expert_capacity(10, 4, 1.1, 2, 4) == _tensor_capacity(10, 4, 1.1, 2, 4) == 6


@pytest.mark.slow
def test_fullgraph_does_not_compile_the_layer():
    # the kept routes and the tokens per expert are data: Dynamo cannot guard on them in one graph
    # (GuardOnDataDependentSymNode / UserError, both RuntimeErrors), and the recompute bookkeeping
    # (layer/recompute.py) inspects the Python stack, so it runs eagerly; without fullgraph the layer
    # compiles in pieces around them (docs/architecture-layer.md, "torch.compile")
    torch.manual_seed(0)
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=2, drop_tokens=True)
    with pytest.raises(RuntimeError, match=r"data-dependent|torch.compiler.disable|skip"):
        torch.compile(moe, fullgraph=True, backend="eager")(torch.randn(2, 5, 8))


@pytest.mark.slow
def test_the_layer_compiles_in_pieces_and_computes_as_eager():
    # without fullgraph, Dynamo breaks the graph at the data-dependent sizes and at the recompute
    # bookkeeping (run eagerly): the compiled layer's output equals eager's to fp32 round-off
    torch.manual_seed(0)
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=2, drop_tokens=True)
    x = torch.randn(2, 5, 8)
    torch.manual_seed(5)  # the second expert is sampled (DeepSpeed's top2_2nd_expert_sampling): same draws
    want, _, counts = moe(x)
    counts = counts.clone()
    torch.manual_seed(5)
    got, _, got_counts = torch.compile(moe, backend="eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_counts, counts)
