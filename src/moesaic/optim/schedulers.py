"""DeepSpeed's warmup learning-rate schedules, step-for-step identical lrs.

``WarmupLR``, ``WarmupDecayLR`` and ``WarmupCosineLR`` take DeepSpeed's constructor arguments and
compute the same floats in the same order as ``deepspeed.runtime.lr_schedules``, including its
quirks, which are kept on purpose so that a run resumed under either library follows the same curve:

* the constructor does no step: with ``last_batch_iteration=-1`` it only writes the "not started"
  lr into the optimizer (``warmup_min_lr`` for the two warmup schedules, **0.0** for the cosine
  one); the first ``step()`` moves to iteration 0, where the log warmup is still at its minimum;
* ``warmup_num_steps`` below 2 is raised to 2 (the log warmup divides by ``log(warmup_num_steps)``);
* ``load_state_dict`` restores the iteration only; the optimizer's lr changes at the next ``step()``.

Deliberate differences: an unknown ``warmup_type`` raises ``ValueError`` (DeepSpeed logs a
warning and falls back to ``log``); the optimizer may be any object with a ``param_groups`` list
of dicts (or a wrapper whose ``.optimizer`` has one); ``get_last_lr()`` before any lr was set
raises ``RuntimeError`` instead of failing an ``assert``; nothing is logged on every construction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Sequence, Union

import torch

from .._checks import check_choice, check_int, check_keys
from .config import WARMUP_TYPES, SchedulerConfig

WARMUP_LOG_RATE = "log"


def _param_groups(optimizer: Any) -> List[Dict[str, Any]]:
    """Find the ``param_groups`` list of an optimizer or of the optimizer a wrapper holds."""
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        groups = getattr(candidate, "param_groups", None)
        if isinstance(groups, list) and all(isinstance(g, dict) and "lr" in g for g in groups):
            return groups
    raise TypeError(f"optimizer must have a param_groups list of dicts holding 'lr' (or wrap one as "
                    f".optimizer), got {type(optimizer).__name__}")


def _per_group(groups: List[Dict[str, Any]], value: Union[float, Sequence[float]], name: str) -> List[Any]:
    """Broadcast one value to every param group, or check a per-group list's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"expected {len(groups)} values for {name} (one per param group), got {len(value)}")
        return list(value)
    return [value] * len(groups)


def _write_lrs(groups: List[Dict[str, Any]], lrs: Sequence[Any]) -> List[Any]:
    """Store ``lrs`` in the param groups, in place for tensor lrs (captured by compiled steps)."""
    for group, lr in zip(groups, lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr.squeeze() if torch.is_tensor(lr) else lr)
        else:
            group["lr"] = lr
    return [group["lr"] for group in groups]


def _check_common(warmup_num_steps: Any, warmup_type: Any, last_batch_iteration: Any) -> None:
    check_int(warmup_num_steps, "warmup_num_steps", lo=1)
    check_choice(warmup_type, "warmup_type", WARMUP_TYPES)
    check_int(last_batch_iteration, "last_batch_iteration")


class WarmupLongerThanScheduleWarning(UserWarning):
    """``total_num_steps < warmup_num_steps``: the lr is still warming up when the schedule ends.

    Its own class so that a caller who reports it in its own terms (``moesaic train`` names its
    config keys) can filter exactly this warning.
    """


def _check_total(total_num_steps: Any, warmup_num_steps: int) -> None:
    check_int(total_num_steps, "total_num_steps", lo=1)
    if total_num_steps < warmup_num_steps:
        warnings.warn(f"total_num_steps {total_num_steps} is less than warmup_num_steps {warmup_num_steps}: the "
                      "learning rate is still warming up when the schedule ends; lower warmup_num_steps or raise "
                      "total_num_steps", WarmupLongerThanScheduleWarning, stacklevel=3)


class _Scheduler:
    """Shared stepping, lr bookkeeping and state of the three schedules."""

    def _init_warmup(self, optimizer: Any, warmup_num_steps: int, warmup_type: str, last_batch_iteration: int):
        _check_common(warmup_num_steps, warmup_type, last_batch_iteration)
        self.optimizer = optimizer
        self._groups = _param_groups(optimizer)
        self.warmup_num_steps = max(2, warmup_num_steps)  # DeepSpeed's floor: log(1) would divide by 0
        self.warmup_type = warmup_type
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.last_batch_iteration = last_batch_iteration

    def _warmup_fraction(self) -> float:
        """Warmup progress in [0, 1) at ``last_batch_iteration`` (< warmup_num_steps)."""
        if self.warmup_type == WARMUP_LOG_RATE:
            return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps

    def get_lr(self) -> List[Any]:  # pragma: no cover - overridden
        """Return the lr of each param group at ``last_batch_iteration``."""
        raise NotImplementedError

    def step(self, last_batch_iteration: Union[int, None] = None) -> None:
        """Advance to the next iteration (or jump to ``last_batch_iteration``) and set the lrs.

        Args:
            last_batch_iteration: the iteration to move to; None means the next one.
        """
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _write_lrs(self._groups, self.get_lr())

    def get_last_lr(self) -> List[Any]:
        """Return the lrs last written into the optimizer.

        Returns:
            One lr per param group.
        """
        if getattr(self, "_last_lr", None) is None:
            raise RuntimeError("no lr has been set yet: call step() first")
        return self._last_lr

    def state_dict(self) -> Dict[str, Any]:
        """Return the resumable state (DeepSpeed's format).

        Returns:
            ``{"last_batch_iteration": int}``.
        """
        return {"last_batch_iteration": self.last_batch_iteration}

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise what :meth:`load_state_dict` would raise, changing nothing.

        Args:
            state_dict: must be ``{"last_batch_iteration": int >= -1}``.
        """
        check_keys(state_dict, "scheduler", ["last_batch_iteration"])
        if "last_batch_iteration" not in state_dict:
            raise ValueError(f"scheduler state lacks last_batch_iteration (got the keys {sorted(state_dict)})")
        check_int(state_dict["last_batch_iteration"], "scheduler.last_batch_iteration", lo=-1, hi=(1 << 63) - 1)

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore the iteration; the optimizer's lrs are updated at the next ``step()``.

        Args:
            state_dict: a dict from :meth:`state_dict`.
        """
        self.check_state_dict(state_dict)
        self.last_batch_iteration = state_dict["last_batch_iteration"]


class WarmupLR(_Scheduler):
    """Raise each group's lr from ``warmup_min_lr`` to ``warmup_max_lr`` over warmup, then hold it."""

    def __init__(self, optimizer: Any, warmup_min_lr: Union[float, Sequence[float]] = 0.0,
                 warmup_max_lr: Union[None, float, Sequence[float]] = None, warmup_num_steps: int = 1000,
                 warmup_type: str = WARMUP_LOG_RATE, last_batch_iteration: int = -1):
        """Build the schedule and, when starting fresh, write ``warmup_min_lr`` into the optimizer.

        Args:
            optimizer: object with ``param_groups`` (list of dicts holding ``lr``).
            warmup_min_lr: start lr, one value or one per group.
            warmup_max_lr: peak lr, one value or one per group; None takes each group's current lr.
            warmup_num_steps: warmup length in steps (values below 2 act as 2).
            warmup_type: ``"log"`` or ``"linear"`` warmup curve.
            last_batch_iteration: the last finished iteration; -1 starts fresh.
        """
        self._init_warmup(optimizer, warmup_num_steps, warmup_type, last_batch_iteration)
        if warmup_max_lr is None:
            warmup_max_lr = [group["lr"] for group in self._groups]
        self.min_lrs = _per_group(self._groups, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(self._groups, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [big - small for big, small in zip(self.max_lrs, self.min_lrs)]
        if last_batch_iteration == -1:
            self._last_lr = _write_lrs(self._groups, self.get_lr())

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_fraction()
        return 1.0

    def get_lr(self) -> List[Any]:
        """Return the lr of each param group at ``last_batch_iteration``.

        Returns:
            ``min_lr + (max_lr - min_lr) * gamma`` per group; ``warmup_min_lr`` before the start.
        """
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._get_gamma()
        return [min_lr + (delta_lr * gamma) for min_lr, delta_lr in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """Warm up like :class:`WarmupLR`, then decay linearly to 0 at ``total_num_steps``."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_lr: Union[float, Sequence[float]] = 0.0,
                 warmup_max_lr: Union[float, Sequence[float]] = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = WARMUP_LOG_RATE, last_batch_iteration: int = -1):
        """Build the schedule; arguments as :class:`WarmupLR` plus ``total_num_steps``.

        Args:
            optimizer: object with ``param_groups`` (list of dicts holding ``lr``).
            total_num_steps: the step at which the lr reaches 0.
            warmup_min_lr: start lr, one value or one per group.
            warmup_max_lr: peak lr, one value or one per group (default 0.001, as DeepSpeed).
            warmup_num_steps: warmup length in steps (values below 2 act as 2).
            warmup_type: ``"log"`` or ``"linear"`` warmup curve.
            last_batch_iteration: the last finished iteration; -1 starts fresh.
        """
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        _check_total(total_num_steps, self.warmup_num_steps)

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_fraction()
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration) /
                   float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Scheduler):
    """Scale each group's own lr by a ratio: warm up to 1.0, then cosine-decay to ``cos_min_ratio``."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = WARMUP_LOG_RATE,
                 last_batch_iteration: int = -1):
        """Build the schedule; the groups' current lrs are the peak, and a fresh start writes lr 0.

        Args:
            optimizer: object with ``param_groups`` (list of dicts holding ``lr``).
            total_num_steps: the step at which the ratio reaches ``cos_min_ratio``.
            warmup_min_ratio: ratio at the first warmup step.
            warmup_num_steps: warmup length in steps (values below 2 act as 2).
            cos_min_ratio: final ratio after the cosine decay.
            warmup_type: ``"log"`` or ``"linear"`` warmup curve.
            last_batch_iteration: the last finished iteration; -1 starts fresh.
        """
        self._init_warmup(optimizer, warmup_num_steps, warmup_type, last_batch_iteration)
        _check_total(total_num_steps, self.warmup_num_steps)
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = warmup_min_ratio
        self.cos_min_ratio = cos_min_ratio
        # Peak lrs are read once, here: the optimizer's lr is overwritten by every step.
        self.org_lrs = [g["lr"].clone() if torch.is_tensor(g["lr"]) else g["lr"] for g in self._groups]
        if last_batch_iteration == -1:
            self._last_lr = _write_lrs(self._groups, self.get_lr())

    def get_lr_ratio(self) -> float:
        """Return the multiplier applied to every group's peak lr at ``last_batch_iteration``.

        Returns:
            The warmup or cosine ratio; 0.0 before the start.
        """
        if self.last_batch_iteration < 0:
            return 0.0
        if self.last_batch_iteration < self.warmup_num_steps:
            ratio = self._warmup_fraction()
            return self.warmup_min_ratio + ratio * (1. - self.warmup_min_ratio)
        real_last_step = self.last_batch_iteration - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        # Clamped so the ratio stays at the floor after total_num_steps instead of rising again.
        progress = min(1.0, real_last_step / real_total_steps)
        ratio = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1. - self.cos_min_ratio) * ratio)

    def get_lr(self) -> List[Any]:
        """Return the lr of each param group at ``last_batch_iteration``.

        Returns:
            ``peak_lr * get_lr_ratio()`` per group; 0.0 before the start.
        """
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.org_lrs]
        lr_ratio = self.get_lr_ratio()
        return [org_lr * lr_ratio for org_lr in self.org_lrs]


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}


def build_scheduler(optimizer: Any, config: Union[SchedulerConfig, Mapping]) -> _Scheduler:
    """Build the schedule a ``scheduler`` config section names.

    Args:
        optimizer: object with ``param_groups`` (list of dicts holding ``lr``).
        config: a :class:`SchedulerConfig`, or a ``{"type": ..., "params": {...}}`` mapping.

    Returns:
        The scheduler; with ``last_batch_iteration == -1`` it has already written its start lrs.
    """
    if isinstance(config, Mapping):
        config = SchedulerConfig.from_dict(config)
    if not isinstance(config, SchedulerConfig):
        raise TypeError(f"config must be a SchedulerConfig or a mapping, got {type(config).__name__}")
    return SCHEDULERS[config.type](optimizer, **config.params)
