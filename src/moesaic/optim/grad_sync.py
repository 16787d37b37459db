"""Gradient synchronisation and the global gradient norm under expert parallelism.

After backward, on each of W data-parallel ranks whose loss is the mean over its own batch:

* a dense gradient is the local mean-loss gradient: sum over the world, divide by W;
* an expert gradient already holds the sum over its expert-parallel group (the all-to-all's
  backward brought every peer's contribution home): sum over its expert-data-parallel group,
  divide by W.

Both end up as the gradient of the mean loss over the global batch, whatever ``ep_size`` is.
Reductions are bucketed (one collective per bucket of up to ``bucket_elems`` elements, summed in
fp32 even for bf16/fp16 gradients) and ordered identically on every rank.

The global norm counts dense gradients once (they are identical everywhere after the sync) and
every expert exactly once: an expert of a layer with expert-parallel size P is replicated on W/P
ranks, so each rank contributes ``P / W`` of its local expert sum of squares to one world-wide
all-reduce.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layer.identity import ExpertIndex

DEFAULT_BUCKET_ELEMS = 8 * 1024 * 1024


@dataclass
class SyncPlan:
    """Which gradients reduce over which group; built once per model.

    Attributes:
        world_size: W.
        dense: dense parameters (reduced over the world).
        expert: ``{edp key: (edp group, ep_size, params)}`` for expert parameters.
    """

    world_size: int
    dense: List[nn.Parameter] = field(default_factory=list)
    expert: "OrderedDict[Tuple, Tuple[object, int, List[nn.Parameter]]]" = field(default_factory=OrderedDict)


def build_sync_plan(index: ExpertIndex) -> SyncPlan:
    """Sort a model's trainable tensors into dense and per-expert-data-parallel-group lists.

    Args:
        index: the model's :class:`ExpertIndex` (its layers must be on their process groups
            when the world has more than one rank).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    plan = SyncPlan(world_size=world)
    for name, layer in index.layers.items():
        if world > 1 and layer.groups is None:
            raise RuntimeError(f"MoE layer {name!r} has no process groups; call "
                               "moesaic.setup_expert_parallel(model) before building the engine")
    seen = set()
    for ref in index.refs(trainable_only=True):
        if id(ref.param) in seen:
            continue  # a stacked parameter is reduced once, whole
        seen.add(id(ref.param))
        if ref.expert is None:
            plan.dense.append(ref.param)
            continue
        layer = index.layers[ref.expert.layer]
        groups = layer.groups
        key = (layer.ep_size, groups.data_before_expert if groups is not None else False)
        entry = plan.expert.setdefault(key, (groups.edp_group if groups is not None else None, layer.ep_size, []))
        entry[2].append(ref.param)
    return plan


def _buckets(params: Sequence[Tensor], bucket_elems: int):
    bucket, size = [], 0
    for p in params:
        n = p.numel()
        if bucket and size + n > bucket_elems:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += n
    if bucket:
        yield bucket


def _reduce(params: Sequence[nn.Parameter], group, divide_by: int, bucket_elems: int) -> int:
    """Sum grads over ``group`` (None = no peers) and divide; returns the number of collectives."""
    calls = 0
    for bucket in _buckets(params, bucket_elems):
        grads = []
        for p in bucket:
            if p.grad is None:  # unused on this rank: contributes zeros, keeps layouts aligned
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        if group is not False:
            dist.all_reduce(flat, group=group)
            calls += 1
        if divide_by != 1:
            flat.div_(divide_by)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
    return calls


def sync_gradients(plan: SyncPlan, bucket_elems: int = DEFAULT_BUCKET_ELEMS) -> int:
    """Average every gradient into the gradient of the global mean loss; returns collectives issued."""
    W = plan.world_size
    if W == 1:
        return 0
    calls = _reduce(plan.dense, None, W, bucket_elems)
    for edp_group, _, params in plan.expert.values():
        # a singleton expert-data-parallel group (ep_size == W) needs no collective, only the 1/W
        calls += _reduce(params, edp_group if edp_group is not None else False, W, bucket_elems)
    return calls


def _sum_sq(grads: Sequence[Tensor]) -> Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    return torch.stack(norms).double().pow(2).sum()


def global_grad_norm(plan: SyncPlan) -> float:
    """L2 norm of all gradients, dense counted once and every expert exactly once."""
    dense_sq = _sum_sq([p.grad for p in plan.dense if p.grad is not None])
    expert_sq = torch.zeros((), dtype=torch.float64)
    for _, ep_size, params in plan.expert.values():
        local = _sum_sq([p.grad for p in params if p.grad is not None])
        expert_sq = expert_sq + local * ep_size / plan.world_size
    if plan.world_size > 1:
        dist.all_reduce(expert_sq)
    return float((dense_sq + expert_sq).sqrt())


def any_non_finite(plan: SyncPlan) -> bool:
    """True on every rank when any rank holds a non-finite gradient."""
    params = plan.dense + [p for _, _, ps in plan.expert.values() for p in ps]
    local = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params)
    if plan.world_size == 1:
        return local
    flag = torch.tensor(1.0 if local else 0.0)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def non_finite_group_names(groups: Sequence[Dict]) -> List[str]:
    """Names of the parameter groups holding a non-finite gradient on this rank."""
    names = []
    for i, g in enumerate(groups):
        if any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in g["params"]):
            names.append(str(g.get("name", f"group_{i}")))
    return names
