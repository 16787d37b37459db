"""Who owns each optimizer group: ZeRO-1/2 ownership with moesaic's own groups as the unit.

Every optimizer group lives on a *replica set*, the ranks that hold identical copies of its
tensors: the whole data-parallel world for dense groups, the expert-data-parallel group of the
layer's ``ep_size`` for expert groups. Exactly one rank of the replica set owns the group:

* with ``zero_optimization.stage`` 1 and 2 only the owner keeps the group's fp32 master weights
  and optimizer state, steps it, and sends the updated weights to the other replicas (stage 2
  also reduces the group's gradients onto the owner only);
* at every stage the owner is the one rank that counts the group in the global gradient norm,
  reports its telemetry and writes its optimizer state into checkpoints, so every group is
  counted exactly once whatever the layout.

Assignment is deterministic and identical on every rank of a replica set (it depends only on
group names and sizes): units are taken largest first (ties by name) and each goes to the
member with the least load so far (ties to the lowest member). A unit is a dense group, or all
the groups of one expert (an expert split by ``max_group_size`` keeps all its parts on one
rank, so one rank writes that expert's optimizer file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from ..layer.identity import ExpertIndex, ParamRef

ZERO_STAGES = (0, 1, 2)


@dataclass(frozen=True)
class ReplicaSet:
    """Ranks holding identical copies of some tensors.

    Attributes:
        key: ``("dense",)`` or ``("experts", ep_size, data_before_expert)``.
        group: their process group (None: the default group; ``False``: a single rank).
        ranks: their global ranks, in group order.
    """

    key: Tuple
    group: object = field(compare=False, repr=False)
    ranks: Tuple[int, ...]


@dataclass
class ShardPlan:
    """The owner of every optimizer group (see module docstring).

    Attributes:
        stage: 0, 1 or 2.
        rank / world_size: this process and W.
        owner: global rank owning group ``i``.
        replica: the replica set of group ``i``.
        names: group names, for :meth:`ownership`.
    """

    stage: int
    rank: int
    world_size: int
    owner: List[int]
    replica: List[ReplicaSet]
    names: List[str]

    def owns(self, gi: int) -> bool:
        """Whether this rank owns group ``gi``."""
        return self.owner[gi] == self.rank

    def steps(self, gi: int) -> bool:
        """Whether this rank steps group ``gi`` (every group at stage 0, its own ones above)."""
        return self.stage == 0 or self.owns(gi)

    def ownership(self) -> Dict[str, int]:
        """``{group name: owning global rank}`` for the groups this rank knows."""
        return dict(zip(self.names, self.owner))

    def replica_sets(self) -> List[ReplicaSet]:
        """The distinct replica sets, in first-use order (identical on every member)."""
        out: Dict[Tuple, ReplicaSet] = {}
        for r in self.replica:
            out.setdefault(r.key, r)
        return list(out.values())


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def replica_set_of(refs: Sequence[ParamRef], index: ExpertIndex, world_size: int) -> ReplicaSet:
    """The replica set of a group's tensors (they must all be dense, or all of one layer)."""
    experts = {r.expert.layer for r in refs if r.expert is not None}
    if not experts:
        return ReplicaSet(("dense",), None if world_size > 1 else False, tuple(range(world_size)))
    if len(experts) > 1 or any(r.expert is None for r in refs):
        raise ValueError(f"an optimizer group mixes tensors of different replica sets ({sorted(experts)} and dense); "
                         "build groups with split_params_into_different_moe_groups_for_optimizer")
    layer = index.layers[experts.pop()]
    groups = layer.groups
    if groups is None:  # one process, no process groups yet
        if world_size > 1:
            raise RuntimeError(f"MoE layer {layer.name!r} has no process groups; call "
                               "moesaic.setup_expert_parallel(model) before building the engine")
        return ReplicaSet(("experts", layer.ep_size, False), False, (0,))
    group = groups.edp_group if len(groups.edp_ranks) > 1 else False
    return ReplicaSet(("experts", layer.ep_size, groups.data_before_expert), group, tuple(groups.edp_ranks))


def plan_shards(names: Sequence[str], refs: Sequence[Sequence[ParamRef]], index: ExpertIndex,
                stage: int = 0) -> ShardPlan:
    """Assign an owner to every group (see module docstring).

    Args:
        names: group names (unique).
        refs: each group's tensors.
        index: the model's index (gives each expert's layer and process groups).
        stage: the ZeRO stage, 0-2.

    Returns:
        The plan.
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage must be one of {list(ZERO_STAGES)}, got {stage!r}")
    if len(names) != len(refs):
        raise ValueError(f"names ({len(names)}) and refs ({len(refs)}) must describe the same groups")
    rank, world = _world()
    replica = [replica_set_of(r, index, world) for r in refs]
    # units: a dense group, or every group holding parts of the same experts
    units: Dict[Tuple, List[int]] = {}
    for gi, group_refs in enumerate(refs):
        experts = tuple(sorted({str(r.expert) for r in group_refs if r.expert is not None}))
        key = (replica[gi].key, experts) if experts else (replica[gi].key, ("group", names[gi]))
        units.setdefault(key, []).append(gi)
    owner: List[Optional[int]] = [None] * len(names)
    load: Dict[Tuple, List[int]] = {}
    sizes = {key: sum(r.numel() for gi in members for r in refs[gi]) for key, members in units.items()}
    for key in sorted(units, key=lambda k: (-sizes[k], repr(k[1]))):
        members = units[key]
        ranks = replica[members[0]].ranks
        loads = load.setdefault(replica[members[0]].key, [0] * len(ranks))
        pos = min(range(len(ranks)), key=lambda i: (loads[i], i))
        loads[pos] += sizes[key]
        for gi in members:
            owner[gi] = ranks[pos]
    return ShardPlan(stage=stage, rank=rank, world_size=world, owner=[int(o) for o in owner], replica=replica,
                     names=list(names))
