"""What happens at a gradient-accumulation boundary, with bounded full-precision memory.

After backward, on each of W data-parallel ranks whose loss is the mean over its own batch:

* a dense gradient is the local mean-loss gradient: sum over the world, divide by W;
* an expert gradient already holds the sum over its expert-parallel group (the all-to-all's
  backward brought every peer's contribution home): sum over its expert-data-parallel group,
  divide by W.

Both end up as the gradient of the mean loss over the global batch, whatever ``ep_size`` is.
:class:`StepPipeline` then runs, per the :class:`~moesaic.optim.sharding.ShardPlan`:

1. **reduce** (bucketed; :mod:`moesaic.parallel.collectives`): all-reduce at ZeRO stages 0-1,
   reduce onto each group's owner at stage 2 (the other replicas drop their copies at once;
   with ``reduce_scatter=False``, DeepSpeed's switch, an all-reduce and the same drop after the
   norm); at stage 1 non-owners drop theirs after the norm. The engine runs this stage at the
   end of the boundary's backward, so gradients read after ``engine.backward`` are the averaged
   ones, as in DeepSpeed;
2. **norm and finiteness** in one pass: every rank sums the squares of the groups it owns (each
   group is owned exactly once in the world), reading each gradient in place, and one all-reduce of two
   numbers gives the exact global norm and whether any gradient anywhere is non-finite;
3. **step** the groups this rank steps, one (fused) group at a time (the optimizer);
4. **broadcast** at stages 1-2: each owner sends its updated low-precision weights to the
   other replicas, bucketed.

No pass ever holds fp32 copies of more than one bucket (``bucket_elems``) of gradients (the
norm converts on the fly); the optimizer holds one group. The transient full-precision
memory of a step is therefore bounded by the group cap plus fixed buffers, not by the model.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..layer.identity import ParamRef
from ..parallel.collectives import DEFAULT_BUCKET_ELEMS, all_reduce_values, broadcast_tensors, reduce_gradients
from .mixed_precision import GroupedMixedPrecisionOptimizer

def _set_grad(ref: ParamRef):
    """A setter for ``ref``'s gradient; slices of a stacked parameter write into its gradient."""
    def set_(value: Optional[Tensor]) -> None:
        if ref.index is None:
            ref.param.grad = value
        elif value is not None:
            if ref.param.grad is None:
                ref.param.grad = torch.zeros_like(ref.param)
            ref.param.grad[ref.index].copy_(value)
    return set_


def sum_of_squares(grads: List[Tensor]) -> float:
    """Sum of squared entries of ``grads`` (inf/nan propagate), without converting any of them.

    ``torch._foreach_norm(..., dtype=float32)`` reads bf16/fp16 gradients and accumulates in
    fp32 on the fly (measured: no fp32 copy is allocated); the per-tensor norms are then
    squared and summed in float64.
    """
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return float(torch.stack(norms).double().pow(2).sum())


def _call_scale_hook(hook, total_norm: float) -> float:
    """Call ``unscale_and_clip_grads``; a replacement with DeepSpeed's fused-optimizer signature
    ``(grad_groups_flat, total_norm, apply_scale)`` gets None for the flat groups it has no use for here."""
    params = list(inspect.signature(hook).parameters)
    if params and params[0] in ("grads_groups_flat", "grad_groups_flat"):
        return float(hook(None, total_norm, apply_scale=False))
    return float(hook(total_norm, apply_scale=False))


@dataclass
class BoundaryResult:
    """The outcome of one boundary: the global norm (nan when skipped) and the clip coefficient."""

    norm: float
    coef: float
    skipped: bool


class StepPipeline:
    """Reduce, check, clip, step and broadcast at an accumulation boundary (see module docstring).

    Args:
        optimizer: the engine's optimizer; its ``shard`` plan says who owns what.
        bucket_elems: most elements per gradient reduction (DeepSpeed's ``reduce_bucket_size``).
        broadcast_bucket_elems: most elements per broadcast of updated weights (DeepSpeed's
            ``allgather_bucket_size``); None: ``bucket_elems``.
        reduce_scatter: stage 2 reduces each gradient onto its owner only; False all-reduces it
            (DeepSpeed's ``reduce_scatter``).
    """

    def __init__(self, optimizer: GroupedMixedPrecisionOptimizer, bucket_elems: int = DEFAULT_BUCKET_ELEMS,
                 broadcast_bucket_elems: Optional[int] = None, reduce_scatter: bool = True) -> None:
        if optimizer.shard is None:
            raise ValueError("the optimizer needs a shard plan (moesaic.optim.sharding.plan_shards), even at stage 0")
        for name, value in (("bucket_elems", bucket_elems), ("broadcast_bucket_elems", broadcast_bucket_elems)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.optimizer = optimizer
        self.plan = optimizer.shard
        self.bucket_elems = bucket_elems
        self.broadcast_bucket_elems = broadcast_bucket_elems if broadcast_bucket_elems is not None else bucket_elems
        self.reduce_scatter = bool(reduce_scatter)
        self.world_size = self.plan.world_size
        # per replica set, the groups on it in optimizer order (identical on every member)
        self._groups_by_set: Dict[Tuple, List[int]] = {}
        for gi, rs in enumerate(self.plan.replica):
            self._groups_by_set.setdefault(rs.key, []).append(gi)
        self._sets = {rs.key: rs for rs in self.plan.replica}

    # --- 1. reduce --------------------------------------------------------------------------------
    def reduce(self) -> int:
        """Average every gradient into the gradient of the global mean loss (stage-dependent)."""
        calls = 0
        if self.world_size == 1:
            return 0
        opt = self.optimizer
        for key, gis in self._groups_by_set.items():
            rs = self._sets[key]
            if self.plan.stage < 2 or not self.reduce_scatter:
                refs = [r for gi in gis for r in opt.refs(gi)]
                calls += reduce_gradients([(self._getter(r), _set_grad(r), r.data) for r in refs], rs.group,
                                          self.world_size, bucket_elems=self.bucket_elems)
                continue
            by_owner: Dict[int, List[ParamRef]] = {}
            for gi in gis:  # owners in first-appearance order: the same on every member
                by_owner.setdefault(self.plan.owner[gi], []).extend(opt.refs(gi))
            for owner, refs in by_owner.items():
                calls += reduce_gradients([(self._getter(r), _set_grad(r), r.data) for r in refs], rs.group,
                                          self.world_size, dst=owner if rs.group is not False else None,
                                          bucket_elems=self.bucket_elems)
        return calls

    @staticmethod
    def _getter(ref: ParamRef):
        return lambda: ref.grad

    # --- 2. norm and finiteness -----------------------------------------------------------------
    def norm(self, loss_scale: float = 1.0) -> Tuple[float, bool]:
        """The global gradient norm (unscaled) and whether every gradient everywhere is finite."""
        opt = self.optimizer
        grads = [r.grad for gi in range(len(opt.param_groups)) if opt.owns_group(gi)
                 for r in opt.refs(gi) if r.grad is not None]
        local = sum_of_squares(grads)
        flag = 0.0 if math.isfinite(local) else 1.0
        if self.world_size > 1:
            device = grads[0].device if grads else None
            total, flag = all_reduce_values([local if math.isfinite(local) else 0.0, flag], device=device)
        else:
            total = local if math.isfinite(local) else 0.0
        finite = flag == 0.0
        return (math.sqrt(total) / loss_scale if finite else float("nan")), finite

    def drop_unowned_gradients(self) -> None:
        """Free the gradients of groups this rank does not step (stage 1 non-owners)."""
        opt = self.optimizer
        for gi in range(len(opt.param_groups)):
            if not opt.steps_group(gi):
                for r in opt.refs(gi):
                    if r.index is None:
                        r.param.grad = None

    # --- 4. broadcast ---------------------------------------------------------------------------
    def broadcast(self) -> int:
        """Send every owner's updated weights to the other replicas (stages 1-2)."""
        if self.plan.stage == 0 or self.world_size == 1:
            return 0
        calls = 0
        opt = self.optimizer
        for key, gis in self._groups_by_set.items():
            rs = self._sets[key]
            by_owner: Dict[int, List[Tensor]] = {}
            for gi in gis:
                by_owner.setdefault(self.plan.owner[gi], []).extend(r.data for r in opt.refs(gi))
            for owner, tensors in by_owner.items():
                calls += broadcast_tensors(tensors, rs.group, owner, bucket_elems=self.broadcast_bucket_elems)
        return calls

    # --- the whole boundary -----------------------------------------------------------------------
    def run(self, *, loss_scale: float = 1.0, clip: float = 0.0, want_stats: bool = False,
            reduced: bool = False) -> BoundaryResult:
        """Reduce, check, clip, step, broadcast. A non-finite gradient anywhere skips the step everywhere.

        ``reduced``: the gradients were already reduced (:meth:`reduce`, at the end of backward).
        """
        if not reduced:
            self.reduce()
        norm, finite = self.norm(loss_scale)
        if not finite:
            return BoundaryResult(norm=float("nan"), coef=0.0, skipped=True)
        self.drop_unowned_gradients()
        # the optimizer's unscale_and_clip_grads (DeepSpeed's hook, which a user may replace) gives the
        # divisor: loss scale x clip ratio; it is folded into the update instead of a pass over the grads
        opt = self.optimizer
        opt.cur_scale, opt.clip_grad = loss_scale, clip
        combined = _call_scale_hook(opt.unscale_and_clip_grads, norm * loss_scale)
        coef = loss_scale / combined
        opt.step(grad_scale=1.0 / combined, want_stats=want_stats)
        self.broadcast()
        return BoundaryResult(norm=norm, coef=coef, skipped=False)

    def gather_stats(self) -> Dict[str, Dict[str, float]]:
        """Every group's last-step statistics, from their owners, on rank 0 (others get {})."""
        stats = self.optimizer.last_stats
        if self.world_size == 1:
            return dict(stats)
        parts = [None] * self.world_size if dist.get_rank() == 0 else None
        dist.gather_object(stats, parts, dst=0)
        if dist.get_rank() != 0:
            return {}
        return {k: v for part in parts for k, v in part.items()}
