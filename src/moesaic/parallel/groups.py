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
:func:`setup_expert_parallel` (which walks the model in module order) guarantees that. Every group
gets the world group's timeout (``init_process_group(timeout=...)``, ``train.dist_timeout_s``):
``new_group`` would otherwise wait torch's default of 30 minutes for a peer that stopped answering.

Groups are cached in a :class:`GroupRegistry`. Code that manages several process groups (tests,
a job that re-initialises ``torch.distributed``) makes its own or calls ``reset()``;
:func:`get_expert_parallel_groups` and :func:`reset_expert_parallel_groups` act on the default one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch.distributed as dist

from .._checks import check_int
from .process_group import world_timeout


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
    check_int(ep_size, "ep_size", 1)
    if world_size % ep_size != 0:
        raise ValueError(f"the world size ({world_size}) must be divisible by ep_size ({ep_size}); "
                         f"run a multiple of {ep_size} processes or lower ep_size")


class GroupRegistry:
    """Creates each ``(ep_size, layout)``'s groups once and hands the same object out afterwards."""

    def __init__(self) -> None:
        self._groups: Dict[Tuple[int, bool], ExpertParallelGroups] = {}

    def get(self, ep_size: int, use_data_before_expert_parallel_: bool = False) -> ExpertParallelGroups:
        """This rank's EP/EDP groups for ``ep_size``, creating every group of that size on first use.

        Args:
            ep_size: ranks per expert-parallel group.
            use_data_before_expert_parallel_: DeepSpeed's alternative layout (see module docstring).
        """
        if not isinstance(use_data_before_expert_parallel_, bool):
            raise TypeError(f"use_data_before_expert_parallel_ must be a bool, got "
                            f"{type(use_data_before_expert_parallel_).__name__}: {use_data_before_expert_parallel_!r}")
        key = (ep_size, use_data_before_expert_parallel_)
        if key not in self._groups:
            self._groups[key] = _create_groups(ep_size, use_data_before_expert_parallel_)
        return self._groups[key]

    def reset(self) -> None:
        """Forget every cached group (after ``destroy_process_group``, or between tests)."""
        self._groups.clear()

    def __len__(self) -> int:
        return len(self._groups)


def _create_groups(ep_size: int, data_before_expert: bool) -> ExpertParallelGroups:
    if not dist.is_available() or not dist.is_initialized():
        check_int(ep_size, "ep_size", 1)
        if ep_size == 1:
            return ExpertParallelGroups(1, None, (0,), None, (0,), 0, data_before_expert)
        raise RuntimeError(f"ep_size={ep_size} needs torch.distributed: call moesaic.init_distributed() "
                           "(or torch.distributed.init_process_group) first, e.g. under torchrun")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_lists, edp_lists = layout(world, ep_size, data_before_expert)
    mine_ep = mine_edp = None
    # the world group's timeout: new_group's default is torch's (30 min for gloo), not init_process_group's
    timeout = world_timeout()
    # every rank creates every group, in the same order (new_group is collective)
    for ranks in ep_lists:
        group = dist.new_group(list(ranks), timeout=timeout) if len(ranks) > 1 else None
        if rank in ranks:
            mine_ep = (group, ranks)
    for ranks in edp_lists:
        group = dist.new_group(list(ranks), timeout=timeout) if len(ranks) > 1 else None
        if rank in ranks:
            mine_edp = (group, ranks)
    assert mine_ep is not None and mine_edp is not None
    return ExpertParallelGroups(ep_size, mine_ep[0], mine_ep[1], mine_edp[0], mine_edp[1], mine_ep[1].index(rank),
                                data_before_expert)


_DEFAULT_REGISTRY = GroupRegistry()


def default_registry() -> GroupRegistry:
    """The process-wide registry that ``MixtureOfExperts.set_expert_parallel_groups`` uses unless given another."""
    return _DEFAULT_REGISTRY


def get_expert_parallel_groups(ep_size: int, use_data_before_expert_parallel_: bool = False) -> ExpertParallelGroups:
    """This rank's EP/EDP groups for ``ep_size`` from the default registry (see :meth:`GroupRegistry.get`)."""
    return _DEFAULT_REGISTRY.get(ep_size, use_data_before_expert_parallel_)


def reset_expert_parallel_groups() -> None:
    """Forget the default registry's groups (after ``destroy_process_group``, or between tests)."""
    _DEFAULT_REGISTRY.reset()
