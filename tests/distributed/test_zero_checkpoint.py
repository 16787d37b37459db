"""Checkpoints are keyed by identity, never by rank or shard: any ZeRO layout reloads under any other.

A checkpoint written at (W=1, stage 0) continues at (W=4, ep_size=2, stage 2); one written there
continues at (W=2, ep_size=1, stage 0) and at W=1; every continuation equals the uninterrupted
one-process run to fp32 round-off. Each rank writes only the optimizer state it owns.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from support.moe_net import MoENet  # noqa: E402
from moesaic import checkpoint  # noqa: E402

D, E, GLOBAL_BATCH = 8, 4, 24


def Net(ep_size):
    """The shared regression net (tests/support/moe_net.py) as this test uses it."""
    return MoENet(ep_size, use_rts=False)


def make_engine(world, ep_size, stage):
    model = Net(ep_size)
    if world > 1:
        moesaic.setup_expert_parallel(model)
    engine, *_ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_clipping": 0.5,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}},
        # 100 elements: the dense tensors form 3 groups (spread over the ranks), each expert 3 parts (kept together)
        "moe": {"max_group_size": 100}, "zero_optimization": {"stage": stage}})
    return engine


def train(engine, steps, rank=0, world=1):
    for _ in range(steps):
        step = engine.global_steps
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(GLOBAL_BATCH, D, generator=g), torch.randn(GLOBAL_BATCH, D, generator=g)
        part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        engine.backward(engine(x[part], y[part]))
        engine.step()


def _continue(rank, world, ep_size, stage, src, src_tag, steps, dst, dst_tag, then_steps, final_tag):
    engine = make_engine(world, ep_size, stage)
    engine.load_checkpoint(src, tag=src_tag)
    train(engine, steps, rank, world)
    engine.save_checkpoint(dst, tag=dst_tag)
    if then_steps:
        train(engine, then_steps, rank, world)
        engine.save_checkpoint(dst, tag=final_tag)


def _weights(folder, tag):
    """Every tensor of a checkpoint, read into a one-process model."""
    engine = make_engine(1, 1, 0)
    engine.load_checkpoint(folder, tag=tag)
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _assert_close(a, b, what):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def test_any_layout_reloads_under_any_other(tmp_path):
    # the uninterrupted reference: one process, stage 0, four steps
    ref = make_engine(1, 1, 0)
    train(ref, 2)
    ref.save_checkpoint(tmp_path / "w1", tag="s2")
    train(ref, 2)
    expected = {n: p.detach().clone() for n, p in ref.module.named_parameters()}

    # W=1 stage 0 -> W=4 ep_size=2 stage 2: one step, save there, one more step
    run_ranks(_continue, 4, 2, 2, str(tmp_path / "w1"), "s2", 1, str(tmp_path / "w4"), "s3", 1, "s4",
              timeout_s=300)
    _assert_close(_weights(tmp_path / "w4", "s4"), expected, "W=4 ep=2 stage 2 after a W=1 checkpoint:")
    # each rank wrote only the optimizer state it owns (a save fails when an entry has no writer or
    # two); together, every tensor's state, the dense part spread over several files
    folder = checkpoint.verify(tmp_path / "w4", tag="s3")
    state_files = checkpoint.read_manifest(folder)["optimizer"]["state"]
    assert set(state_files) == set(ref.optimizer.state_names())
    assert len({f for n, f in state_files.items() if "/" not in n}) > 1, state_files

    # W=4 ep_size=2 stage 2 -> W=2 ep_size=1 stage 0, and -> W=1
    run_ranks(_continue, 2, 1, 0, str(tmp_path / "w4"), "s3", 1, str(tmp_path / "w2"), "s4", 0, None,
              timeout_s=240)
    _assert_close(_weights(tmp_path / "w2", "s4"), expected, "W=2 stage 0 after a W=4 stage 2 checkpoint:")
    one = make_engine(1, 1, 0)
    one.load_checkpoint(tmp_path / "w4", tag="s3")
    train(one, 1)
    _assert_close({n: p.detach() for n, p in one.module.named_parameters()}, expected,
                  "W=1 after a W=4 stage 2 checkpoint:")
