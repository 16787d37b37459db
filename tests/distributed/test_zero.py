"""ZeRO stages 1 and 2 give the parameters stage 0 gives, with a fraction of the optimizer state.

At W=2 and W=4 with ep_size 1, 2 and 4: several AdamW steps, clipping on and off, gradient
accumulation; every rank's parameters after the run equal stage 0's to fp32 round-off. Each rank
holds masters and moments only for the groups it owns, and every group is owned exactly once.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from support.moe_net import MoENet  # noqa: E402

D, E, TOKENS, STEPS = 8, 4, 12, 3


def Net(ep_size):
    """The shared regression net (tests/support/moe_net.py) as this test uses it."""
    return MoENet(ep_size, aux_coef=0.01)


def _batch(rank, step, micro):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def _train(rank, ep_size, stage, clip, accum, log_dir=None):
    model = Net(ep_size)
    moesaic.setup_expert_parallel(model)
    expert = sum(p.numel() for p in model.ffn.experts[0].parameters())
    engine, opt, _, _ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": accum, "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "moe": {"max_group_size": expert}, "zero_optimization": {"stage": stage}}, log_dir=log_dir)
    norms = []
    for step in range(STEPS):
        for micro in range(accum):
            engine.backward(engine(*_batch(rank, step, micro)))
            engine.step()
        norms.append(engine.get_global_grad_norm())
    engine.close()
    return model, opt, norms, engine


def _worker(rank, world, ep_size, clip, accum, log_dir=None):
    ref, ref_opt, ref_norms, _ = _train(rank, ep_size, 0, clip, accum)
    for stage in (1, 2):
        model, opt, norms, engine = _train(rank, ep_size, stage, clip, accum, log_dir)
        if log_dir is not None:
            # telemetry: every group of every rank exactly once, gathered from its owner onto rank 0
            names = [None] * world
            dist.all_gather_object(names, [g["name"] for g in opt.param_groups])
            if rank == 0:
                reported = set(engine.last_metrics.get("group", {}))
                assert reported == {n for part in names for n in part}, (stage, reported)
        tag = f"rank {rank} W={world} P={ep_size} stage={stage} clip={clip} accum={accum}"
        for a, b in zip(norms, ref_norms):
            assert abs(a - b) <= 1e-5 * b, (tag, norms, ref_norms)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=lambda m: f"{tag} {n}: {m}")
        # each rank holds state only for the groups it owns; together they cover every group once
        owners = opt.ownership()
        mine = {g["name"] for gi, g in enumerate(opt.param_groups) if owners[g["name"]] == rank}
        held = {opt.param_groups[gi]["name"] for gi in range(len(opt.param_groups)) if opt.steps_group(gi)}
        assert held == mine, (tag, held, mine)
        counts = torch.tensor([len(opt.state_names()), len(ref_opt.state_names())])
        per_rank = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(per_rank, counts)
        total = sum(int(c[0]) for c in per_rank)
        dense = sum(1 for r in ref_opt.state_names() if "/" not in r)  # expert tensors are "<layer>/<n>/<name>"
        local_experts = len(ref_opt.state_names()) - dense
        # dense state once in the world; every expert's state once (P ranks hold the E experts)
        assert total == dense + local_experts * ep_size, (tag, total, dense, local_experts)


@pytest.mark.parametrize("ep_size", [1, 2])
def test_two_ranks(ep_size, tmp_path):
    run_ranks(_worker, 2, ep_size, 0.0, 1, str(tmp_path), timeout_s=240)
    run_ranks(_worker, 2, ep_size, 0.05, 2, timeout_s=240)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_four_ranks(ep_size):
    run_ranks(_worker, 4, ep_size, 0.05, 2, timeout_s=300)
