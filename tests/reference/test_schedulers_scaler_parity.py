"""Step-by-step parity of the lr schedules and the dynamic loss scaler with DeepSpeed 0.19.8.

Runs where ``deepspeed`` is importable. Both sides get the same settings and inputs; lrs and
loss scales must be *identical* (same float operations in the same order), not merely close.
"""

import logging
import os
import random

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed not installed")
from deepspeed.runtime import lr_schedules as ds_sched  # noqa: E402
from deepspeed.runtime.fp16 import loss_scaler as ds_scaler  # noqa: E402

from moesaic.optim import loss_scaler as ours_scaler  # noqa: E402
from moesaic.optim import schedulers as ours_sched  # noqa: E402
from moesaic.optim.config import SchedulerConfig  # noqa: E402

pytestmark = [pytest.mark.reference,
              pytest.mark.filterwarnings("ignore:total_num_steps .* is less than warmup_num_steps")]
logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # DeepSpeed warns on every scheduler construction

STEPS = 60


def sgd(*lrs):
    """A torch SGD with one tiny tensor per param group, starting at ``lrs``."""
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs])


def lrs(opt):
    return [group["lr"] for group in opt.param_groups]


SCHEDULE_CASES = [
    ("WarmupLR", {"warmup_num_steps": 20}, (0.1,)),
    ("WarmupLR", {"warmup_min_lr": 1e-5, "warmup_max_lr": 3e-3, "warmup_num_steps": 17, "warmup_type": "linear"},
     (0.1,)),
    ("WarmupLR", {"warmup_min_lr": [0.0, 1e-4], "warmup_max_lr": [1e-2, 2e-3], "warmup_num_steps": 1}, (0.1, 0.2)),
    ("WarmupDecayLR", {"total_num_steps": 50, "warmup_num_steps": 10}, (0.1,)),
    ("WarmupDecayLR", {"total_num_steps": 45, "warmup_min_lr": 1e-4, "warmup_max_lr": 7e-3, "warmup_num_steps": 13,
                       "warmup_type": "linear"}, (0.1, 0.3)),
    ("WarmupDecayLR", {"total_num_steps": 5, "warmup_num_steps": 8}, (0.1,)),  # total < warmup
    ("WarmupCosineLR", {"total_num_steps": 50, "warmup_num_steps": 10}, (3e-4,)),
    ("WarmupCosineLR", {"total_num_steps": 40, "warmup_min_ratio": 0.1, "warmup_num_steps": 7,
                        "cos_min_ratio": 0.05, "warmup_type": "linear"}, (1e-3, 5e-4)),
    ("WarmupCosineLR", {"total_num_steps": 3, "warmup_num_steps": 6, "cos_min_ratio": 0.0}, (0.1,)),
]


@pytest.mark.parametrize("name, params, start_lrs", SCHEDULE_CASES)
def test_schedule_parity(name, params, start_lrs):
    ds_opt, our_opt = sgd(*start_lrs), sgd(*start_lrs)
    ds = getattr(ds_sched, name)(ds_opt, **params)
    ours = getattr(ours_sched, name)(our_opt, **params)
    assert lrs(our_opt) == lrs(ds_opt), "lrs written by the constructor differ"
    assert ours.get_last_lr() == ds.get_last_lr()
    for step in range(STEPS):
        ds.step()
        ours.step()
        assert lrs(our_opt) == lrs(ds_opt), f"step {step}"
        assert ours.get_last_lr() == ds.get_last_lr() and ours.get_lr() == ds.get_lr()
        assert ours.state_dict() == ds.state_dict()


@pytest.mark.parametrize("name, params, start_lrs", SCHEDULE_CASES[::3])
def test_schedule_parity_jumps_and_resume(name, params, start_lrs):
    """Explicit ``step(n)`` jumps and a resume from ``state_dict`` follow the same values."""
    ds_opt, our_opt = sgd(*start_lrs), sgd(*start_lrs)
    ds = getattr(ds_sched, name)(ds_opt, **params)
    ours = build_pair_from_config(our_opt, name, params)
    for it in (5, 0, 33, 12, 59):
        ds.step(it)
        ours.step(it)
        assert lrs(our_opt) == lrs(ds_opt), f"jump to {it}"
    ds2 = getattr(ds_sched, name)(sgd(*start_lrs), **params)
    ours2 = getattr(ours_sched, name)(sgd(*start_lrs), **params)
    ds2.load_state_dict(ds.state_dict())
    ours2.load_state_dict(ours.state_dict())
    for _ in range(5):
        ds2.step()
        ours2.step()
        assert ours2.get_last_lr() == ds2.get_last_lr()


def build_pair_from_config(optimizer, name, params):
    """Go through the config path too: defaults filled by SchedulerConfig must be DeepSpeed's."""
    return ours_sched.build_scheduler(optimizer, SchedulerConfig(name, params))


@pytest.fixture
def ds_rank0(monkeypatch):
    """DeepSpeed's scaler asks deepspeed.comm for the rank to decide on logging; no process group here."""
    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda *args, **kwargs: 0)


def scaler_pair(init_scale, scale_window, min_scale, delayed_shift, consecutive_hysteresis):
    ds = ds_scaler.DynamicLossScaler(init_scale=init_scale, scale_window=scale_window, min_scale=min_scale,
                                     delayed_shift=delayed_shift, consecutive_hysteresis=consecutive_hysteresis)
    ours = ours_scaler.DynamicLossScaler(init_scale=init_scale, scale_window=scale_window, min_scale=min_scale,
                                         delayed_shift=delayed_shift, consecutive_hysteresis=consecutive_hysteresis)
    return ds, ours


def assert_same_state(ds, ours, where):
    assert (ours.cur_scale, ours.cur_iter, ours.last_overflow_iter, ours.cur_hysteresis) == \
        (ds.cur_scale, ds.cur_iter, ds.last_overflow_iter, ds.cur_hysteresis), where
    assert ours.loss_scale == ds.loss_scale


def drive(ds, ours, flags):
    """Feed the same overflow flags to both; on DeepSpeed's min-scale error ours must raise too."""
    for i, flag in enumerate(flags):
        try:
            ds.update_scale(flag)
        except Exception as err:  # DeepSpeed raises a bare Exception at the minimum scale
            assert "minimum" in str(err)
            with pytest.raises(ours_scaler.LossScaleUnderflowError):
                ours.update_scale(flag)
            assert_same_state(ds, ours, f"after min-scale error at flag {i}")
            return i
        ours.update_scale(flag)
        assert_same_state(ds, ours, f"flag {i}")
    return None


SCALER_CASES = [
    # init_scale, scale_window, min_scale, delayed_shift, consecutive_hysteresis
    (2 ** 16, 10, 1, 1, False),
    (2 ** 16, 10, 1, 2, False),
    (2 ** 16, 7, 1, 4, True),
    (2 ** 12, 3, 0.25, 3, False),
    (2 ** 32, 1000, 1, 2, False),
]


@pytest.mark.parametrize("case", SCALER_CASES)
@pytest.mark.parametrize("p_overflow", [0.05, 0.3])
def test_dynamic_scaler_parity_random(ds_rank0, case, p_overflow):
    rng = random.Random(1234)
    flags = [rng.random() < p_overflow for _ in range(300)]
    ds, ours = scaler_pair(*case)
    drive(ds, ours, flags)


@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("delayed_shift", [1, 2, 3])
def test_dynamic_scaler_parity_hysteresis_patterns(ds_rank0, consecutive, delayed_shift):
    patterns = [
        [True] * 5 + [False] * 12,  # overflow burst, then a full window of growth
        [True, False] * 8,  # alternating: refill-on-good-step matters here
        [True, True, False, True, False, False, True] * 3,
        [False] * 9 + [True] * 3 + [False] * 9,
    ]
    for pattern in patterns:
        ds, ours = scaler_pair(2 ** 16, 4, 1, delayed_shift, consecutive)  # far above the floor
        assert drive(ds, ours, pattern) is None


@pytest.mark.parametrize("init_scale, min_scale", [(8, 1), (3, 1), (16, 0.5)])
def test_dynamic_scaler_parity_min_scale_error(ds_rank0, init_scale, min_scale):
    ds, ours = scaler_pair(init_scale, 5, min_scale, 2, False)
    stopped = drive(ds, ours, [True] * 20)
    assert stopped is not None, "both should have hit the minimum-scale error"
