"""Activation checkpointing at ``ep_size`` 2 and 4: the recompute moves the same rows and counts nothing twice.

On 2 and 4 gloo ranks, a block holding ``MoE(ep_size=world)`` (aux-loss-free bias, Jitter noise, capacity
mode and dropless, per-module and stacked experts) run under ``torch.utils.checkpoint`` (both
modes, ``preserve_rng_state=False`` and the RNG moved before backward) gives the output, every
gradient, ``expert_load`` and the layer's statistics of the plain run on the same rank, and the
recompute does no second routing-header exchange. A recorded forward replayed after a step sends
every token of each rank to the recorded experts.
"""

import os
import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.layer import all_to_all  # noqa: E402

D, F, E = 8, 12, 4


class _Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.moe = layer
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        out, l_aux, _ = self.moe(self.norm(x))
        return x + self.drop(out), l_aux


_OPTIONS = (dict(k=2, capacity_factor=0.75, noisy_gate_policy="Jitter", top2_2nd_expert_sampling=False),
            dict(k=1, drop_tokens=False, noisy_gate_policy="Jitter"))


def _worker(rank, world):
    calls = []
    exchange = all_to_all.exchange_counts

    def counting(*args, **kwargs):
        calls.append(1)
        return exchange(*args, **kwargs)

    all_to_all.exchange_counts = counting
    # ep_size = world; at 4 ranks one expert per rank, each layout with one of the options (a few seconds)
    cases = [(s, o) for s in (False, True) for o in _OPTIONS] if world == 2 else list(zip((False, True), _OPTIONS))
    for stacked, options in cases:
        torch.manual_seed(0)
        layer = moesaic.MoE(D, moesaic.GLUExpert(D, F), num_experts=E, ep_size=world, expert_group_name="moe",
                            enable_expert_bias=True, stacked_experts=stacked, **options)
        layer.set_deepspeed_parallelism()
        block = _Block(layer).train()
        x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(10 + rank))
        results = {}
        for mode in (None, False, True):
            block.zero_grad(set_to_none=True)
            layer.gate.expert_load.zero_()
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(5)
            if mode is None:
                y, aux = block(xi)
            else:
                y, aux = checkpoint(block, xi, use_reentrant=mode, preserve_rng_state=False)
            before = len(calls)
            torch.manual_seed(99 + rank)
            ((y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + aux).backward()
            assert len(calls) == before, f"rank {rank}: the backward exchanged routing headers again"
            results[mode] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()},
                             layer.gate.expert_load.clone(), layer.exp_counts.clone(),
                             layer.tokens_per_expert.clone())
        ref = results[None]
        for mode in (False, True):
            got = results[mode]
            what = f"rank {rank} stacked={stacked} {options} use_reentrant={mode}"
            assert torch.equal(ref[0], got[0]), f"{what}: output"
            assert torch.equal(ref[1], got[1]), f"{what}: input gradient"
            for n in ref[2]:
                assert torch.equal(ref[2][n], got[2][n]), f"{what}: gradient of {n}"
            assert torch.equal(ref[3], got[3]), f"{what}: expert_load {got[3].tolist()} vs {ref[3].tolist()}"
            assert torch.equal(ref[4], got[4]) and torch.equal(ref[5], got[5]), f"{what}: statistics"


def _replay_worker(rank, world):
    torch.manual_seed(0)
    layer = moesaic.MoE(D, moesaic.GLUExpert(D, F), num_experts=E, ep_size=world, k=2, expert_group_name="moe",
                        capacity_factor=0.5, noisy_gate_policy="Jitter")
    layer.set_deepspeed_parallelism()
    model = nn.Sequential(layer)
    moesaic.name_moe_layers(model)
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(rank))
    with moesaic.record_routing(model) as routes:
        layer(x)[0].sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5 * p.grad)
    with moesaic.replay_routing(model, routes), moesaic.record_routing(model) as again:
        out = layer(x)[0]
        out.sum().backward()
    assert torch.equal(again["0"], routes["0"]), f"rank {rank}: replay chose other experts"
    assert layer.num_dropped_routes == 0 and int(layer.exp_counts.sum()) == 24


@pytest.mark.parametrize("world", [2, 4])
def test_replay_at_ep_size_world_uses_the_recorded_experts(world):
    run_ranks(_replay_worker, world, timeout_s=120)


@pytest.mark.parametrize("world", [2, 4])
def test_checkpointed_layer_at_ep_size_world_is_exact_and_counts_once(world):
    run_ranks(_worker, world, timeout_s=240)
