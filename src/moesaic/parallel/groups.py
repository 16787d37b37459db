"""Expert-parallel (EP) and expert-data-parallel (EDP) process groups, built once per ``ep_size``.

For a world of W ranks and an expert-parallel size P (W % P == 0) there are W/P expert-parallel
groups of P ranks (the ranks that split one copy of the experts among them, exchanging tokens by
all-to-all) and P expert-data-parallel groups of W/P ranks (the ranks holding the same experts,
whose expert gradients are reduced together). Dense gradients reduce over the whole world.

Layouts, as DeepSpeed's ``_create_expert_and_data_parallel``:

* default (expert-parallel ranks contiguous), W=8, P=2: EP [0,1] [2,3] [4,5] [6,7];
  EDP [0,2,4,6] [1,3,5,7];
* ``use_data_before_expert_parallel_=True``: EP [0,4] [1,5] [2,6] [3,7]; EDP [0,1,2,3] [4,5,6,7].

Groups are keyed by ``(ep_size, layout)``, never by a layer's ``expert_group_name``: two layers
with different names and the same ``ep_size`` share one set of groups. ``torch.distributed.new_group``
is collective, so every rank must ask for the same sizes in the same order; asking through
:func:`setup_expert_parallel` (which walks the model in module order) guarantees that.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The groups this rank belongs to for one ``ep_size``.

    Attributes:
        ep_size: P.
        ep_group / ep_ranks: the expert-parallel group (all-to-all) and its global ranks.
        edp_group / edp_ranks: the expert-data-parallel group (expert grads) and its global ranks.
        ep_rank: this rank's index inside ``ep_ranks`` (it holds experts ``ep_rank * L ..``).
    """

    ep_size: int
    ep_group: Optional[dist.ProcessGroup]
    ep_ranks: Tuple[int, ...]
    edp_group: Optional[dist.ProcessGroup]
    edp_ranks: Tuple[int, ...]
    ep_rank: int
    data_before_expert: bool


_GROUPS: Dict[Tuple[int, bool], ExpertParallelGroups] = {}


def layout(world_size: int, ep_size: int, data_before_expert: bool = False):
    """The EP and EDP rank lists for a world (pure arithmetic; no process group needed).

    Returns:
        ``(ep_groups, edp_groups)``: lists of rank tuples covering ``range(world_size)``.
    """
    _check_sizes(world_size, ep_size)
    stride = world_size // ep_size
    if data_before_expert:
        ep = [tuple(range(i, world_size, stride)) for i in range(stride)]
        edp = [tuple(range(i * stride, (i + 1) * stride)) for i in range(ep_size)]
    else:
        ep = [tuple(range(i * ep_size, (i + 1) * ep_size)) for i in range(stride)]
        edp = [tuple(range(i, world_size, ep_size)) for i in range(ep_size)]
    return ep, edp


def _check_sizes(world_size: int, ep_size: int) -> None:
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be an int >= 1, got {ep_size!r}")
    if world_size % ep_size != 0:
        raise ValueError(f"the world size ({world_size}) must be divisible by ep_size ({ep_size}); "
                         f"run a multiple of {ep_size} processes or lower ep_size")


def get_expert_parallel_groups(ep_size: int, use_data_before_expert_parallel_: bool = False) -> ExpertParallelGroups:
    """This rank's EP/EDP groups for ``ep_size``, creating every group of that size on first use.

    Args:
        ep_size: ranks per expert-parallel group.
        use_data_before_expert_parallel_: DeepSpeed's alternative layout (see module docstring).

    Returns:
        The cached :class:`ExpertParallelGroups`.
    """
    key = (ep_size, bool(use_data_before_expert_parallel_))
    if key in _GROUPS:
        return _GROUPS[key]
    if not dist.is_available() or not dist.is_initialized():
        if ep_size == 1:
            groups = ExpertParallelGroups(1, None, (0,), None, (0,), 0, key[1])
            _GROUPS[key] = groups
            return groups
        raise RuntimeError(f"ep_size={ep_size} needs torch.distributed: call moesaic.init_distributed() "
                           "(or torch.distributed.init_process_group) first, e.g. under torchrun")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_lists, edp_lists = layout(world, ep_size, key[1])
    mine_ep = mine_edp = None
    # every rank creates every group, in the same order (new_group is collective)
    for ranks in ep_lists:
        group = dist.new_group(list(ranks)) if len(ranks) > 1 else None
        if rank in ranks:
            mine_ep = (group, ranks)
    for ranks in edp_lists:
        group = dist.new_group(list(ranks)) if len(ranks) > 1 else None
        if rank in ranks:
            mine_edp = (group, ranks)
    assert mine_ep is not None and mine_edp is not None
    groups = ExpertParallelGroups(ep_size, mine_ep[0], mine_ep[1], mine_edp[0], mine_edp[1],
                                  mine_ep[1].index(rank), key[1])
    _GROUPS[key] = groups
    return groups


def reset_expert_parallel_groups() -> None:
    """Forget cached groups (after ``destroy_process_group``, or between tests)."""
    _GROUPS.clear()


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0) -> Tuple[int, int]:
    """Join the process group torchrun set up (env:// rendezvous); a no-op if already joined.

    The backend is NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every collective,
    so a dead peer makes the others fail with an error instead of hanging forever.

    Returns:
        ``(rank, world_size)``.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed needs the torchrun environment; missing {missing}. "
                           "Launch with `torchrun --nproc-per-node N script.py`")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
