"""LR schedules and loss scalers against hand-computed values (no DeepSpeed needed)."""

import math

import pytest
import torch

from moesaic.optim.config import FP16Config, SchedulerConfig
from moesaic.optim.loss_scaler import (DynamicLossScaler, LossScaleUnderflowError, StaticLossScaler,
                                       build_loss_scaler)
from moesaic.optim.schedulers import (WarmupCosineLR, WarmupDecayLR, WarmupLongerThanScheduleWarning, WarmupLR,
                                       build_scheduler)


class DummyOptimizer:
    """Only what a scheduler needs: param_groups holding 'lr'."""

    def __init__(self, *lrs):
        self.param_groups = [{"lr": lr, "params": []} for lr in lrs]


def lrs_at(scheduler, optimizer, steps):
    """Step ``scheduler`` up to each iteration in ``steps`` and collect group 0's lr there."""
    out = {}
    for it in range(max(steps) + 1):
        scheduler.step()
        assert scheduler.last_batch_iteration == it
        if it in steps:
            out[it] = optimizer.param_groups[0]["lr"]
            assert scheduler.get_last_lr()[0] == out[it]
    return out


def test_warmup_lr_linear():
    opt = DummyOptimizer(0.5)
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10, warmup_type="linear")
    assert opt.param_groups[0]["lr"] == 0.0  # constructor writes the min lr, does not step
    # lr(it) = 0 + 0.1 * it / 10 during warmup, then 0.1
    got = lrs_at(sched, opt, {0, 1, 5, 9, 10, 20})
    assert got == pytest.approx({0: 0.0, 1: 0.01, 5: 0.05, 9: 0.09, 10: 0.1, 20: 0.1})


def test_warmup_lr_log_and_default_max_lr():
    opt = DummyOptimizer(0.1)
    sched = WarmupLR(opt, warmup_num_steps=10)  # max lr defaults to the group's lr, log warmup
    # lr(it) = 0.1 * log(it + 1) / log(10): it=0 -> 0; it=4 -> 0.1 * 1.609438 / 2.302585 = 0.0698970;
    # it=9 -> 0.1 * log(10) / log(10) = 0.1; afterwards held at 0.1
    got = lrs_at(sched, opt, {0, 4, 9, 15})
    assert got == pytest.approx({0: 0.0, 4: 0.0698970, 9: 0.1, 15: 0.1}, rel=1e-6)


def test_warmup_num_steps_floor_of_two():
    opt = DummyOptimizer(1.0)
    sched = WarmupLR(opt, warmup_max_lr=1.0, warmup_num_steps=1, warmup_type="linear")
    # warmup_num_steps 1 acts as 2: it=0 -> 0/2, it=1 -> 1/2, it=2 -> 1.0
    assert lrs_at(sched, opt, {0, 1, 2}) == {0: 0.0, 1: 0.5, 2: 1.0}


def test_warmup_decay_lr():
    opt = DummyOptimizer(0.5)
    sched = WarmupDecayLR(opt, total_num_steps=20, warmup_max_lr=0.1, warmup_num_steps=10, warmup_type="linear")
    # after warmup: lr = 0.1 * max(0, (20 - it) / (20 - 10)): it=10 -> 0.1, 15 -> 0.05, 20 -> 0, 25 -> 0
    got = lrs_at(sched, opt, {5, 10, 15, 20, 25})
    assert got == pytest.approx({5: 0.05, 10: 0.1, 15: 0.05, 20: 0.0, 25: 0.0})


def test_warmup_cosine_lr():
    opt = DummyOptimizer(0.1)
    sched = WarmupCosineLR(opt, total_num_steps=20, warmup_min_ratio=0.2, warmup_num_steps=10, cos_min_ratio=0.1,
                           warmup_type="linear")
    assert opt.param_groups[0]["lr"] == 0.0  # a fresh cosine schedule writes lr 0 until the first step
    # warmup: ratio = 0.2 + (it / 10) * 0.8: it=0 -> 0.2, it=5 -> 0.6
    # decay: progress = (it - 10 + 1) / (20 - 10); ratio = 0.1 + 0.9 * (1 + cos(pi * progress)) / 2
    #   it=10 -> progress 0.1 -> 0.1 + 0.9 * 0.9755283 = 0.9779754; it=14 -> 0.5 -> 0.55;
    #   it=19 -> 1.0 -> 0.1; it=30 -> clamped at 1.0 -> 0.1
    got = lrs_at(sched, opt, {0, 5, 10, 14, 19, 30})
    expect = {0: 0.02, 5: 0.06, 10: 0.09779754, 14: 0.055, 19: 0.01, 30: 0.01}
    assert got == pytest.approx(expect, rel=1e-6)
    assert sched.get_lr_ratio() == pytest.approx(0.1)


def test_per_group_lists_and_tensor_lr():
    opt = DummyOptimizer(0.1, 0.2)
    sched = WarmupLR(opt, warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 0.5], warmup_num_steps=4,
                     warmup_type="linear")
    sched.step(2)  # jump to it=2: gamma = 2/4 -> [0 + 1.0 * 0.5, 0.1 + 0.4 * 0.5]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.3])
    with pytest.raises(ValueError, match="expected 2 values for warmup_max_lr"):
        WarmupLR(opt, warmup_max_lr=[1.0])
    tensor_opt = DummyOptimizer(torch.tensor(0.1))
    lr_tensor = tensor_opt.param_groups[0]["lr"]
    sched = WarmupCosineLR(tensor_opt, total_num_steps=10, warmup_num_steps=2, warmup_type="linear")
    sched.step()
    sched.step()  # it=1: ratio = 1/2
    assert tensor_opt.param_groups[0]["lr"] is lr_tensor  # updated in place
    assert lr_tensor.item() == pytest.approx(0.05)


def test_scheduler_state_dict_round_trip():
    opt_a, opt_b = DummyOptimizer(0.1), DummyOptimizer(0.1)
    kwargs = dict(total_num_steps=30, warmup_num_steps=5)
    sched_a = WarmupDecayLR(opt_a, **kwargs)
    for _ in range(12):
        sched_a.step()
    sched_b = WarmupDecayLR(opt_b, **kwargs)
    sched_b.load_state_dict(sched_a.state_dict())
    assert sched_b.state_dict() == {"last_batch_iteration": 11}
    for _ in range(5):
        sched_a.step()
        sched_b.step()
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


def test_scheduler_errors_and_build():
    opt = DummyOptimizer(0.1)
    with pytest.raises(ValueError, match="warmup_type"):
        WarmupLR(opt, warmup_type="exp")
    with pytest.raises(ValueError, match="warmup_num_steps"):
        WarmupLR(opt, warmup_num_steps=0)
    with pytest.raises(TypeError, match="param_groups"):
        WarmupLR(object())
    resumed = WarmupLR(opt, last_batch_iteration=3)
    with pytest.raises(RuntimeError, match="step"):
        resumed.get_last_lr()
    with pytest.warns(WarmupLongerThanScheduleWarning, match="total_num_steps 5 is less than warmup_num_steps 10: "
                                                           "the learning rate is still warming up when the schedule "
                                                           "ends; lower warmup_num_steps or raise total_num_steps"):
        WarmupCosineLR(opt, total_num_steps=5, warmup_num_steps=10)
    assert issubclass(WarmupLongerThanScheduleWarning, UserWarning)  # DeepSpeed users' filters still apply
    sched = build_scheduler(opt, SchedulerConfig("WarmupDecayLR", {"total_num_steps": 100, "warmup_num_steps": 10}))
    assert isinstance(sched, WarmupDecayLR) and sched.max_lrs == [0.001]
    sched = build_scheduler(opt, {"type": "WarmupCosineLR", "params": {"total_num_steps": 5000}})
    assert isinstance(sched, WarmupCosineLR) and sched.warmup_num_steps == 1000


def run_scaler(scaler, overflows):
    out = []
    for overflow in overflows:
        scaler.update_scale(overflow)
        out.append(scaler.cur_scale)
    return out


def test_dynamic_scaler_hysteresis_then_halving_then_growth():
    scaler = DynamicLossScaler(init_scale=16, scale_window=3, min_scale=1, delayed_shift=2)
    # it0 overflow: hysteresis 2 -> 1, scale kept; it1, it2 overflow: halve 16 -> 8 -> 4 (hysteresis stays 1)
    # it3..: stable = it - last_overflow(2) - 1 = 0, 1, 2, 3 -> grows at it6 (stable 3 % 3 == 0, refills
    # hysteresis to 2) and again at it9 (stable 6)
    flags = [True, True, True] + [False] * 7
    assert run_scaler(scaler, flags) == [16, 8, 4, 4, 4, 4, 8, 8, 8, 16]
    assert (scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis) == (10, 2, 2)
    assert scaler.loss_scale == 16


def test_dynamic_scaler_window_from_start():
    # last_overflow_iter starts at -1: stable = it, so the scale grows at it3 and it6 (window 3)
    scaler = DynamicLossScaler(init_scale=16, scale_window=3)
    assert run_scaler(scaler, [False] * 7) == [16, 16, 16, 32, 32, 32, 64]


def test_dynamic_scaler_min_scale():
    scaler = DynamicLossScaler(init_scale=3, min_scale=1)
    assert run_scaler(scaler, [True, True]) == [1.5, 1]  # 3 / 2, then max(0.75, 1)
    with pytest.raises(LossScaleUnderflowError, match="minimum"):
        scaler.update_scale(True)
    assert (scaler.cur_scale, scaler.cur_iter) == (1, 2)  # the failed update changed nothing
    lenient = DynamicLossScaler(init_scale=2, min_scale=1, raise_error_at_min_scale=False)
    assert run_scaler(lenient, [True, True, True]) == [1, 1, 1]
    assert issubclass(LossScaleUnderflowError, RuntimeError)


def test_consecutive_hysteresis():
    flags = [True, False, True, False, True]
    # consecutive: every good step refills the budget of 2, so alternating overflows never halve
    assert run_scaler(DynamicLossScaler(init_scale=8, delayed_shift=2, consecutive_hysteresis=True), flags) == [8] * 5
    # default: the budget is refilled only on growth: it0 spends it, it2 and it4 halve
    assert run_scaler(DynamicLossScaler(init_scale=8, delayed_shift=2), flags) == [8, 8, 4, 4, 2]


def test_scale_factor_argument():
    assert run_scaler(DynamicLossScaler(init_scale=81, scale_factor=3.0, scale_window=1), [True, False, False]) == \
        [27, 27, 81]  # it2: stable = 2 - 0 - 1 = 1, 1 % 1 == 0 -> grow


def test_scaler_state_dict_round_trip():
    flags = [True, False, False, True, True, False, False, False, False]
    a = DynamicLossScaler(init_scale=64, scale_window=2, delayed_shift=2)
    run_scaler(a, flags)
    b = DynamicLossScaler(init_scale=64, scale_window=2, delayed_shift=2)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and set(a.state_dict()) == {"cur_scale", "cur_iter",
                                                                           "last_overflow_iter", "cur_hysteresis"}
    assert run_scaler(a, flags) == run_scaler(b, flags)
    with pytest.raises(KeyError, match="cur_hysteresis"):
        b.load_state_dict({"cur_scale": 1.0, "cur_iter": 0, "last_overflow_iter": -1})


def test_static_scaler():
    scaler = StaticLossScaler(128.0)
    assert run_scaler(scaler, [True, False, True]) == [128.0] * 3 and not scaler.dynamic
    assert scaler.scale_loss(torch.tensor(2.0)).item() == 256.0
    restored = StaticLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.loss_scale == 128.0
    with pytest.raises(ValueError, match="scale"):
        StaticLossScaler(0)


def test_has_overflow():
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(3)
    assert not StaticLossScaler.has_overflow([p, q])  # q has no grad: skipped
    q.grad = torch.tensor([1.0, math.inf])
    assert DynamicLossScaler.has_overflow([p, q])


def test_build_loss_scaler():
    assert build_loss_scaler(FP16Config(enabled=False)) is None
    static = build_loss_scaler(FP16Config(enabled=True, loss_scale=512))
    assert isinstance(static, StaticLossScaler) and static.loss_scale == 512
    dyn = build_loss_scaler(FP16Config(enabled=True, initial_scale_power=12, loss_scale_window=50, hysteresis=3,
                                       min_loss_scale=2, consecutive_hysteresis=True))
    assert isinstance(dyn, DynamicLossScaler)
    assert (dyn.cur_scale, dyn.scale_window, dyn.delayed_shift, dyn.cur_hysteresis, dyn.min_scale) == \
        (4096, 50, 3, 3, 2)
    assert dyn.consecutive_hysteresis and dyn.raise_error_at_min_scale and dyn.scale_factor == 2.0
