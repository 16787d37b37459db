"""fp16 loss scalers with DeepSpeed's update rule, state_dict support and a typed underflow error.

:class:`DynamicLossScaler` follows ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler``
step for step (same ``cur_scale``, ``cur_iter``, ``last_overflow_iter`` and ``cur_hysteresis``
after every ``update_scale``), quirks included:

* an overflow only lowers the scale once the hysteresis budget is down to 1; earlier overflows
  spend one unit each; the budget is refilled only when the scale grows (or after every good step
  with ``consecutive_hysteresis``), so after one drop each later overflow drops again;
* the scale grows on the step where ``cur_iter - last_overflow_iter - 1`` is a positive multiple
  of ``scale_window``, i.e. on the (window + 1)-th good step in a row, and it has no upper bound;
* an overflow while ``cur_scale == min_scale`` raises (when ``raise_error_at_min_scale``) and
  leaves the state untouched; otherwise the scale is clamped at ``min_scale``.

Differences: the error is :class:`LossScaleUnderflowError` rather than a bare ``Exception``;
``scale_factor`` is an argument (DeepSpeed fixes it at 2.0); nothing is logged or all-reduced
(no process group is needed), the caller passes an ``overflow`` already agreed on across ranks.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch

from .._checks import check_bool, check_int, check_number
from .config import FP16Config

_STATE_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class LossScaleUnderflowError(RuntimeError):
    """Gradients overflowed while the dynamic loss scale was already at its minimum."""


_positive = partial(check_number, lo=0.0, lo_open=True)
_count = partial(check_int, lo=1)


_INT64_MAX = (1 << 63) - 1
_STATE_CHECKS = {"cur_scale": _positive, "cur_iter": partial(check_int, lo=0, hi=_INT64_MAX),
                 "last_overflow_iter": partial(check_int, lo=-1, hi=_INT64_MAX),
                 "cur_hysteresis": partial(check_int, lo=1, hi=_INT64_MAX)}


def _check_state(state_dict: Any, keys) -> None:
    """A scaler's saved state: a mapping holding ``keys``, each of its type and range (KeyError when one is missing)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"loss scaler state_dict must be a mapping, got {type(state_dict).__name__}")
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise KeyError(f"loss scaler state_dict lacks {missing}; expected keys {list(keys)}")
    for key in keys:
        _STATE_CHECKS[key](state_dict[key], key)


class _LossScalerBase:
    """Shared API: the scale, scaling a loss and finding non-finite gradients."""

    dynamic = False
    cur_scale: float

    @property
    def loss_scale(self) -> float:
        """The current loss scale."""
        return self.cur_scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Multiply ``loss`` by the current scale (call ``backward`` on the result).

        Args:
            loss: the unscaled loss.

        Returns:
            ``loss * loss_scale``.
        """
        return loss * self.loss_scale

    @staticmethod
    def has_overflow(params: Iterable[torch.Tensor]) -> bool:
        """Tell whether any gradient of ``params`` holds an inf or a NaN (this rank only).

        Args:
            params: parameters whose ``.grad`` to check; None grads are skipped.

        Returns:
            True when some gradient is not finite.
        """
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        # One host sync in total instead of one per tensor; flags gathered on the first grad's device.
        device = grads[0].device
        return not bool(torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all())


class StaticLossScaler(_LossScalerBase):
    """A fixed loss scale (DeepSpeed's ``LossScaler``): ``update_scale`` never changes it."""

    def __init__(self, scale: float = 1.0):
        """Hold ``scale``.

        Args:
            scale: the loss scale, a finite number > 0.
        """
        self.cur_scale = _positive(scale, "scale")

    def update_scale(self, overflow: bool) -> None:
        """Accept the step's overflow flag; the scale stays as it is.

        Args:
            overflow: whether this step's gradients overflowed (the step is skipped by the caller).
        """

    def state_dict(self) -> Dict[str, Any]:
        """Return the state.

        Returns:
            ``{"cur_scale": float}``.
        """
        return {"cur_scale": self.cur_scale}

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise what :meth:`load_state_dict` would raise, changing nothing (a finite ``cur_scale`` > 0)."""
        _check_state(state_dict, ("cur_scale",))

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the scale from :meth:`state_dict` output.

        Args:
            state_dict: a dict holding ``cur_scale``.
        """
        self.check_state_dict(state_dict)
        self.cur_scale = float(state_dict["cur_scale"])


class DynamicLossScaler(_LossScalerBase):
    """Halve the scale on overflow (after hysteresis), double it after a window of good steps."""

    dynamic = True

    def __init__(self, init_scale: float = 2 ** 16, scale_factor: float = 2.0, scale_window: int = 1000,
                 min_scale: float = 1, delayed_shift: int = 1, consecutive_hysteresis: bool = False,
                 raise_error_at_min_scale: bool = True):
        """Set up the scaler at ``init_scale``.

        Args:
            init_scale: the first loss scale (DeepSpeed: ``2 ** fp16.initial_scale_power``).
            scale_factor: divides the scale on overflow and multiplies it after a good window (> 1).
            scale_window: good steps in a row (plus one) before the scale grows.
            min_scale: the floor of the scale.
            delayed_shift: hysteresis, overflows tolerated before the first drop (>= 1).
            consecutive_hysteresis: refill the hysteresis after every good step, not only on growth.
            raise_error_at_min_scale: raise :class:`LossScaleUnderflowError` on overflow at ``min_scale``.
        """
        self.cur_scale = _positive(init_scale, "init_scale")
        self.scale_factor = check_number(scale_factor, "scale_factor", 1.0, lo_open=True)
        self.scale_window = _count(scale_window, "scale_window")
        self.min_scale = _positive(min_scale, "min_scale")
        self.delayed_shift = _count(delayed_shift, "delayed_shift")
        check_bool(consecutive_hysteresis, "consecutive_hysteresis")
        check_bool(raise_error_at_min_scale, "raise_error_at_min_scale")
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.cur_hysteresis = delayed_shift

    def update_scale(self, overflow: bool) -> None:
        """Record one step's overflow flag and adjust the scale.

        Args:
            overflow: whether this step's gradients overflowed, agreed on by every rank.

        Raises:
            LossScaleUnderflowError: overflow at ``min_scale`` with ``raise_error_at_min_scale``.
        """
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise LossScaleUnderflowError(
                        f"gradients overflowed at iteration {self.cur_iter} while the loss scale was already at "
                        f"its minimum ({self.min_scale}); training has likely diverged (non-finite loss or "
                        f"gradients), or fp16.min_loss_scale is too high")
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> Dict[str, Any]:
        """Return the changing state (the settings come from the config on resume).

        Returns:
            ``cur_scale``, ``cur_iter``, ``last_overflow_iter`` and ``cur_hysteresis``.
        """
        return {key: getattr(self, key) for key in _STATE_KEYS}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state from :meth:`state_dict` output.

        Args:
            state_dict: a dict holding every key :meth:`state_dict` writes.
        """
        self.check_state_dict(state_dict)
        self.cur_scale = float(state_dict["cur_scale"])
        self.cur_iter = state_dict["cur_iter"]
        self.last_overflow_iter = state_dict["last_overflow_iter"]
        self.cur_hysteresis = state_dict["cur_hysteresis"]

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise what :meth:`load_state_dict` would raise, changing nothing (every key, ints and a scale > 0)."""
        _check_state(state_dict, _STATE_KEYS)


def build_loss_scaler(config: FP16Config) -> Optional[Union[StaticLossScaler, DynamicLossScaler]]:
    """Build the loss scaler an ``fp16`` config section asks for.

    Args:
        config: the :class:`FP16Config`.

    Returns:
        None when fp16 is off, a :class:`StaticLossScaler` when ``loss_scale > 0``, else a
        :class:`DynamicLossScaler` set up as DeepSpeed's engine does.
    """
    if not isinstance(config, FP16Config):
        raise TypeError(f"config must be an FP16Config, got {type(config).__name__}")
    if not config.enabled:
        return None
    if config.loss_scale > 0:
        return StaticLossScaler(config.loss_scale)
    return DynamicLossScaler(init_scale=2 ** config.initial_scale_power, scale_window=config.loss_scale_window,
                             min_scale=config.min_loss_scale, delayed_shift=config.hysteresis,
                             consecutive_hysteresis=config.consecutive_hysteresis)
