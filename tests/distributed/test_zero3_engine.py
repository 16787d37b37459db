"""zero_optimization.stage 3 (FSDP2) in moesaic.initialize trains as stage 0 does.

At W=2 (ep_size 1, 2) and W=4 (ep_size 2): three AdamW steps with clipping, gradient accumulation
(FSDP2 reduces once per step), per-expert and per-layer ``lr_scale`` and (at ep_size 1) a frozen
expert: the global norm of every step, every group's telemetry (grad_norm, param_norm, update_ratio in
``engine.last_metrics["group"]`` and log_dir's metrics.csv), every parameter (``safe_get_full_fp32_param``), the reduced
gradients (``safe_get_full_grad``) and AdamW's moments (``safe_get_full_optimizer_state``) equal
stage 0's to fp32 round-off. bf16 trains to within bf16's precision of stage 0 in bf16. fp16 with loss
scaling skips a step whose gradient is non-finite on any rank, on every rank.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from support.moe_net import MoENet  # noqa: E402
from moesaic.telemetry import read_csv_metrics  # noqa: E402

D, TOKENS, STEPS, ACCUM = 8, 12, 3, 2


def _batch(rank, step, micro):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def _train(rank, ep_size, stage, bf16=False, log_dir=None):
    model = MoENet(ep_size)
    moe = {"lr_scale": {"ffn": 0.5, "ffn/1": 2.0}}
    if ep_size == 1:
        moe["freeze_experts"] = ["ffn/3"]
    engine, opt, _, _ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": ACCUM, "gradient_clipping": 0.05,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}, "bf16": {"enabled": bf16},
        "moe": moe, "zero_optimization": {"stage": stage}}, log_dir=log_dir)
    norms, grads = [], None
    for step in range(STEPS):
        for micro in range(ACCUM):
            x, y = _batch(rank, step, micro)
            if bf16:
                x, y = x.bfloat16(), y.bfloat16()
            engine.backward(engine(x, y))
            if step == STEPS - 1 and micro == ACCUM - 1:  # the reduced gradients, before the step
                grads = [moesaic.safe_get_full_grad(p).clone() if p.requires_grad else None  # the step may reuse it
                         for p in model.parameters()]
            engine.step()
        norms.append(engine.get_global_grad_norm())
    params = [moesaic.safe_get_full_fp32_param(p) if p.requires_grad else None for p in model.parameters()]
    moments = [moesaic.safe_get_full_optimizer_state(p, "exp_avg") if p.requires_grad else None
               for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    return names, norms, grads, params, moments, engine


def _worker(rank, world, ep_size, logs):
    ref = _train(rank, ep_size, 0, log_dir=os.path.join(logs, "z0"))
    got = _train(rank, ep_size, 3, log_dir=os.path.join(logs, "z3"))
    # telemetry per group (log_dir set): stage 0's figures, by group name, on rank 0 (every rank at stage 3)
    ref_groups, got_groups = ref[5].last_metrics.get("group", {}), got[5].last_metrics["group"]
    if rank == 0:
        assert sorted(got_groups) == sorted(ref_groups) and len(ref_groups) >= 3, (ref_groups, got_groups)
        for name, figures in ref_groups.items():
            for key, value in figures.items():
                assert abs(got_groups[name][key] - value) <= 1e-5 * abs(value) + 1e-7, (name, key, got_groups, value)
        # ... and the same rows in log_dir's metrics.csv
        z0, z3 = (read_csv_metrics(os.path.join(logs, s)) for s in ("z0", "z3"))
        assert sorted(k for k in z0 if k.startswith("group/")) == sorted(k for k in z3 if k.startswith("group/"))
    tag = f"rank {rank} W={world} P={ep_size}"
    assert got[0] == ref[0], (tag, got[0], ref[0])
    engine = got[5]
    assert engine.zero_optimization_stage() == 3
    groups = [g["name"] for g in engine.optimizer.param_groups]
    assert any(g.endswith("/expert_1") or "/ffn/expert_" in g for g in groups), groups
    for a, b in zip(got[1], ref[1]):
        assert abs(a - b) <= 1e-5 * b, (tag, got[1], ref[1])
    for what, gi in (("grad", 2), ("param", 3), ("exp_avg", 4)):
        for name, a, b in zip(got[0], got[gi], ref[gi]):
            if b is None:  # frozen: not optimised at either stage
                assert a is None, (tag, what, name)
                continue
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=lambda m: f"{tag} {what} {name}: {m}")
    # bf16: fp32 sharded masters, bf16 compute; within bf16's precision of stage 0 in bf16
    low_ref, low = _train(rank, ep_size, 0, bf16=True), _train(rank, ep_size, 3, bf16=True)
    for a, b in zip(low[1], low_ref[1]):
        assert abs(a - b) <= 0.05 * b, (tag, "bf16", low[1], low_ref[1])
    for name, a, b in zip(low[0], low[3], low_ref[3]):
        if b is None:
            continue
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2, msg=lambda m: f"{tag} bf16 param {name}: {m}")
    dist.barrier()


@pytest.mark.parametrize("world,ep_size", [(2, 1), (2, 2), (4, 2)])
def test_stage3_equals_stage0(world, ep_size, tmp_path):
    run_ranks(_worker, world, ep_size, str(tmp_path), timeout_s=400)


def _fp16_worker(rank, world):
    """fp16 compute with loss scaling: a non-finite gradient on one rank skips the step on every rank."""
    model = MoENet(2)
    engine, *_ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": TOKENS, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "fp16": {"enabled": True, "initial_scale_power": 4}, "zero_optimization": {"stage": 3}})
    x, y = _batch(rank, 0, 0)
    before = [moesaic.safe_get_full_fp32_param(p) for p in model.parameters()]
    loss = engine(x.half(), y.half())
    engine.backward(loss * (float("inf") if rank == 1 else 1.0))  # one rank overflows
    engine.step()
    assert engine.skipped_steps == 1 and not engine.was_step_applied(), rank
    for p, b in zip(model.parameters(), before):
        assert torch.equal(moesaic.safe_get_full_fp32_param(p), b)
    for step in range(2):
        x, y = _batch(rank, step + 1, 0)
        loss = engine(x.half(), y.half())
        engine.backward(loss)
        engine.step()
        assert engine.was_step_applied() and torch.isfinite(loss), (rank, step)
    after = [moesaic.safe_get_full_fp32_param(p) for p in model.parameters()]
    assert all(torch.isfinite(a).all() for a in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 masters, fp16 compute


def _reshard_worker(rank, world):
    """zero_optimization.reshard_after_forward: false keeps each unit's gathered parameters from forward to
    backward (FSDP2 leaves them unsharded on the module), true frees them; the numbers are the same."""
    _fp16_worker(rank, world)
    params = {}
    for keep in (False, True):
        model = MoENet(2)
        engine, *_ = moesaic.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": TOKENS, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "zero_optimization": {"stage": 3, "reshard_after_forward": not keep, "stage3_max_reuse_distance":
                                  None if keep else 0, "stage3_param_persistence_threshold": 0}})
        for step in range(2):
            loss = engine(*_batch(rank, step, 0))
            held = [not hasattr(p, "to_local") for p in model.ffn.deepspeed_moe.experts.parameters()]
            assert all(held) if keep else not any(held), (keep, held)
            engine.backward(loss)
            engine.step()
        params[keep] = [moesaic.safe_get_full_fp32_param(p) for p in model.parameters()]
    for a, b in zip(params[False], params[True]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_stage3_fp16_skips_a_non_finite_step_everywhere_and_reshard_after_forward():
    run_ranks(_reshard_worker, 2, timeout_s=300)
