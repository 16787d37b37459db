"""zero_optimization.overlap_comm: gradients reduced during backward equal those reduced after it.

One net holds every awkward case at once: a layer used twice in a forward, a layer that only
rank 0 uses (no gradient on the other ranks), frozen tensors (a dense bias and the second expert each rank holds),
and an MoE layer whose router sends rank 0's tokens to experts 0-2 only (expert 3 gets no token
there, tokens on the other ranks). Each rank trains it twice, overlap off and on, at ZeRO stages
0, 1 and 2 with gradient accumulation, and compares every gradient right after each boundary's
backward and every parameter after the run: bitwise at W=2 (a sum of two is exact whatever the
bucket), to fp32 round-off at W=4. A no_sync backward must not reduce (stages 0-1). Small buckets
make many collectives, and some must start before backward ends (the overlap is real). Stacked
experts (one parameter for all of a rank's experts) are checked at W=2.
"""

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.layer.identity import ExpertIndex  # noqa: E402

D, E, TOKENS, STEPS, ACCUM = 8, 4, 12, 2, 2


class Net(nn.Module):
    def __init__(self, ep_size, rank, stacked=False):
        super().__init__()
        torch.manual_seed(0)
        self.rank = rank
        self.inp = nn.Linear(D, D)
        self.only_rank0 = nn.Linear(D, D)
        expert = moesaic.GLUExpert(D, 16) if stacked else nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        self.ffn = moesaic.MoE(D, expert, num_experts=E, ep_size=ep_size, k=2, drop_tokens=False, use_rts=False,
                               top2_2nd_expert_sampling=False, expert_group_name="ffn", stacked_experts=stacked)
        with torch.no_grad():  # positive inputs never pick expert 3; negative ones always do
            self.ffn.deepspeed_moe.gate.wg.weight[3].fill_(-3.0)
        self.out = nn.Linear(D, D)
        self.out.bias.requires_grad_(False)

    def forward(self, x, y):
        h = torch.tanh(self.inp(torch.tanh(self.inp(x))))  # inp used twice
        if self.rank == 0:
            h = h + self.only_rank0(h)
        h = h.abs() if self.rank == 0 else -h.abs()  # rank 0 routes nothing to expert 3
        h, l_aux, _ = self.ffn(h)
        return (self.out(h) - y).pow(2).mean() + 0.01 * l_aux


def _batch(rank, step, micro):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _train(rank, ep_size, stage, overlap, no_sync, stacked=False):
    model = Net(ep_size, rank, stacked)
    moesaic.setup_expert_parallel(model)
    index = ExpertIndex.build(model)
    if not stacked:  # a stacked parameter holds every local expert: nothing to freeze alone
        for ref in index.expert_refs(index.experts()[1]):  # freeze the second expert this rank holds
            ref.param.requires_grad_(False)
    engine, _, _, _ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": 1 if no_sync else ACCUM,
        "gradient_clipping": 0.5, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "moe": {"max_group_size": 64},
        "zero_optimization": {"stage": stage, "overlap_comm": overlap, "reduce_bucket_size": 100}})
    grads, launched = [], []
    for step in range(STEPS):
        if no_sync:
            with engine.no_sync():
                engine.backward(engine(*_batch(rank, step, 0)))
            grads.append(_grads(model))  # not reduced: each rank's own
            engine.backward(engine(*_batch(rank, step, 1)))
            grads.append(_grads(model))
            engine.step()
        else:
            for micro in range(ACCUM):
                engine.backward(engine(*_batch(rank, step, micro)))
                grads.append(_grads(model))
                engine.step()
        if overlap:
            launched.append(engine._overlap.last_launched_in_backward)
    return model, grads, launched


def _worker(rank, world, ep_size, stacked=False):
    tag = f"rank {rank} W={world} P={ep_size} stacked={stacked}"
    exact = world == 2
    for stage in (0, 1, 2):
        for no_sync in ((False, True) if stage < 2 and not stacked else (False,)):
            ref, ref_grads, _ = _train(rank, ep_size, stage, False, no_sync, stacked)
            model, grads, launched = _train(rank, ep_size, stage, True, no_sync, stacked)
            case = f"{tag} stage={stage} no_sync={no_sync}"
            if no_sync:  # the net does what it says: the first backward's gradients are this rank's own
                own = dict(zip([n for n, _ in model.named_parameters()], ref_grads[0]))
                assert (own["only_rank0.weight"] is None) == (rank != 0), case
                silent = [g for n, g in own.items() if ".experts.3." in n or "experts.deepspeed_experts.3." in n]
                if rank == 0 and ep_size == 1:
                    assert silent and all(g is None or not g.any() for g in silent), (case, "expert 3 got tokens")
            assert all(n > 0 for n in launched), (case, "no bucket started during backward", launched)
            for i, (gs, rs) in enumerate(zip(grads, ref_grads)):
                for (name, _), g, r in zip(model.named_parameters(), gs, rs):
                    assert (g is None) == (r is None), (case, i, name, g, r)
                    if g is not None:
                        if exact:
                            assert torch.equal(g, r), (case, i, name, (g - r).abs().max())
                        else:
                            torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-6)
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                if exact:
                    assert torch.equal(p, q), (case, name, (p - q).abs().max())
                else:
                    torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.parametrize("ep_size", [1, 2])
def test_two_ranks(ep_size):
    run_ranks(_worker, 2, ep_size, timeout_s=240)


@pytest.mark.parametrize("ep_size", [1, 2])
def test_four_ranks(ep_size):
    run_ranks(_worker, 4, ep_size, timeout_s=300)


def test_two_ranks_stacked_experts():
    """A stacked parameter holds every local expert: its slices sit in several buckets (and at stage 2
    with several owners), all made ready by the parameter's one hook."""
    run_ranks(_worker, 2, 1, True, timeout_s=240)
