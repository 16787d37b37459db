"""Step each optimizer group during the backward pass, as soon as its gradients are complete.

The usual step needs every gradient at once (for the global norm and the overflow check), so a
bf16 model's whole set of bf16 gradients is alive when ``engine.step()`` starts. Stepping a group
the moment its last gradient has been accumulated (a ``post_accumulate_grad`` hook) and freeing
that group's gradients at once means the gradients of the whole model never coexist: the peak
drops by up to the model's size in gradient dtype (torchtune calls this "optimizer in backward").

What it gives up, and therefore refuses (checked at ``initialize``): global-norm clipping (the
norm is only known after the last group has already stepped), fp16 loss scaling (an overflow
could only be found after some groups stepped), more than one data-parallel process, and ZeRO
stages above 0. With bf16 or fp32 a group whose gradient is non-finite is skipped (alone) with a
warning naming it. The global gradient norm is still reported: each group adds its sum of
squares before it steps.

Only the micro-batch at an accumulation boundary steps in backward; earlier micro-batches
accumulate as usual. Groups that received no gradient in that backward (unused parameters)
are stepped by :meth:`InBackwardStepper.finish`, from ``engine.step()``.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch

from .mixed_precision import GroupedMixedPrecisionOptimizer
from .pipeline import BoundaryResult, sum_of_squares


class InBackwardStepper:
    """Hooks that step each group of ``optimizer`` when its gradients are complete.

    Args:
        optimizer: the engine's optimizer (every group stepped on this rank).
    """

    def __init__(self, optimizer: GroupedMixedPrecisionOptimizer) -> None:
        self.optimizer = optimizer
        groups_of: Dict[int, List[int]] = {}
        self._size: List[int] = []
        for gi in range(len(optimizer.param_groups)):
            if not optimizer.steps_group(gi):
                raise ValueError("optimizer_in_backward steps every group on this rank; it cannot run with ZeRO "
                                 "stages 1-2")
            params = {id(r.param): r.param for r in optimizer.refs(gi)}
            self._size.append(len(params))
            for key in params:
                groups_of.setdefault(key, []).append(gi)
        self._groups_of = groups_of
        self._pending: List[int] = []
        self._armed = False
        self._sum_sq = 0.0
        self._skipped: List[str] = []
        self._want_stats = False
        self._handles = []
        seen = set()
        for gi in range(len(optimizer.param_groups)):
            for r in optimizer.refs(gi):
                if id(r.param) not in seen:
                    seen.add(id(r.param))
                    self._handles.append(r.param.register_post_accumulate_grad_hook(self._on_grad))

    def arm(self, want_stats: bool = False) -> None:
        """The next backward is an accumulation boundary: step groups as they complete."""
        self._pending = list(self._size)
        self._armed = True
        self._sum_sq = 0.0
        self._skipped = []
        self._want_stats = want_stats
        self.optimizer.last_stats = {}

    @property
    def armed(self) -> bool:
        return self._armed

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        for gi in self._groups_of.get(id(param), ()):
            self._pending[gi] -= 1
            if self._pending[gi] == 0:
                self._step(gi)

    def _step(self, gi: int) -> None:
        grads = [r.grad for r in self.optimizer.refs(gi) if r.grad is not None]
        sq = sum_of_squares(grads)
        if not math.isfinite(sq):
            self._skipped.append(self.optimizer.param_groups[gi]["name"])
            for r in self.optimizer.refs(gi):
                if r.index is None:
                    r.param.grad = None
            return
        self._sum_sq += sq
        self.optimizer.step(want_stats=self._want_stats, groups=[gi])

    def finish(self) -> BoundaryResult:
        """Step the groups no hook completed (no gradient this backward), disarm, report the norm."""
        for gi, pending in enumerate(self._pending):
            if pending > 0 and any(r.grad is not None for r in self.optimizer.refs(gi)):
                self._step(gi)
        self._armed = False
        if self._skipped:
            warnings.warn(f"optimizer_in_backward: non-finite gradients in groups {self._skipped}; those groups "
                          "were not stepped (the others were)", RuntimeWarning, stacklevel=3)
        return BoundaryResult(norm=math.sqrt(self._sum_sq), coef=1.0, skipped=False)

    def remove(self) -> None:
        """Unregister the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def check_in_backward_config(*, clip: float, fp16: bool, world_size: int, stage: int) -> Optional[str]:
    """Why ``optimizer_in_backward`` cannot run with these settings (None when it can)."""
    if clip > 0:
        return (f"optimizer_in_backward=true cannot clip by the global norm (gradient_clipping={clip}): groups step "
                "before the norm is known; set gradient_clipping to 0 or optimizer_in_backward to false")
    if fp16:
        return ("optimizer_in_backward=true cannot run with fp16.enabled (a loss-scale overflow is only known after "
                "groups stepped); use bf16 or set optimizer_in_backward to false")
    if world_size > 1:
        return (f"optimizer_in_backward=true runs on one process only (world size {world_size}); set it to false "
                "for data parallelism")
    if stage > 0:
        return f"optimizer_in_backward=true needs zero_optimization.stage 0, got {stage}"
    return None
