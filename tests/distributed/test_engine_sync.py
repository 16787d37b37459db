"""The engine's gradient sync and clipping across ranks equal one process on the global batch."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from support.moe_net import MoENet  # noqa: E402

D, E, TOKENS = 8, 4, 12


def Net(ep_size):
    """The shared regression net (tests/support/moe_net.py) as this test uses it."""
    return MoENet(ep_size)


def _batch(rank):
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def _worker(rank, world, ep_size, clip):
    # reference: every expert, one process, the global batch (all ranks' batches concatenated)
    ref = Net(ep_size=1)
    xs, ys = zip(*[_batch(r) for r in range(world)])
    ref(torch.cat(xs), torch.cat(ys)).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()

    model = Net(ep_size=ep_size)
    moesaic.setup_expert_parallel(model)
    L = E // ep_size
    first = model.ffn.parallel_groups.ep_rank * L
    with torch.no_grad():  # the same weights as the reference, experts by global number
        for i in range(L):
            for p, q in zip(model.ffn.experts[i].parameters(), ref.ffn.experts[first + i].parameters()):
                p.copy_(q)
    engine, *_ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": TOKENS, "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
        "gradient_clipping": clip})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _batch(rank)
    engine.backward(engine(x, y))
    engine.step()
    tag = f"rank {rank} W={world} P={ep_size}"
    assert abs(engine.get_global_grad_norm() - ref_norm) <= 1e-5 * ref_norm, (tag, engine.get_global_grad_norm(),
                                                                               ref_norm)
    coef = min(1.0, clip / (ref_norm + 1e-6)) if clip else 1.0
    for n, p in model.named_parameters():
        ref_name = n
        experts = "ffn.deepspeed_moe.experts.deepspeed_experts."
        if n.startswith(experts):
            i, rest = n[len(experts):].split(".", 1)
            ref_name = f"{experts}{first + int(i)}.{rest}"
        step = before[n] - p.detach()  # SGD with lr=1: the applied (clipped) gradient
        torch.testing.assert_close(step, coef * ref_grads[ref_name], atol=2e-6, rtol=2e-5,
                                   msg=lambda m: f"{tag} {n}: {m}")


def _bucket_worker(rank, world):
    model = Net(ep_size=1)  # experts replicated: their grads reduce over the (2-rank) edp group
    moesaic.setup_expert_parallel(model)
    engine, *_ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": TOKENS, "optimizer": {"type": "SGD", "params": {"lr": 1.0}}})
    pipeline = engine._pipeline
    n_params = len(list(model.parameters()))
    x, y = _batch(rank)
    model(x, y).backward()
    pipeline.bucket_elems = 10**6
    # one collective for all dense grads, one for the expert grads of the edp group
    calls = pipeline.reduce()
    assert calls == 2 < n_params, (calls, n_params)
    # a tiny bucket splits into more collectives, still fewer than parameters
    model.zero_grad()
    model(x, y).backward()
    pipeline.bucket_elems = 200
    assert 2 < pipeline.reduce() < n_params
    dist.barrier()


def test_two_ranks_ep2_and_ep1_equal_the_global_batch():
    run_ranks(_worker, 2, 2, 0.0)
    run_ranks(_worker, 2, 1, 0.0)


def test_four_ranks_ep2_and_ep4_with_clipping_equal_the_global_batch():
    run_ranks(_worker, 4, 2, 0.05, timeout_s=180)
    run_ranks(_worker, 4, 4, 0.0, timeout_s=180)


def test_sync_is_bucketed():
    run_ranks(_bucket_worker, 2)


def _overflow_worker(rank, world, precision):
    model = Net(ep_size=2)
    moesaic.setup_expert_parallel(model)
    cfg = {"train_micro_batch_size_per_gpu": TOKENS, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1}
    engine, *_ = moesaic.initialize(model=model, config=cfg)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(rank)
    loss = engine(x.to(dtype), y.to(dtype)).float()
    if rank == 1:
        loss = loss * float("inf")  # only rank 1 overflows
    import warnings
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        engine.backward(loss)
        engine.step()
    assert engine.skipped_steps == 1, f"rank {rank} must skip too"
    if precision == "fp16":
        assert engine.loss_scale == 2 ** 7
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), f"rank {rank} changed a parameter on a skipped step"


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank():
    run_ranks(_overflow_worker, 2, "fp16")
    run_ranks(_overflow_worker, 2, "fp32")
