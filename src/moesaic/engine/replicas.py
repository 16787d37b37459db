"""Replicas that start equal: the engine's agreement check and parameter broadcast at ``initialize``.

Data parallelism keeps replicas equal only if they start equal: gradients are averaged, so two
ranks that begin with different weights (each seeded with ``seed + rank``, say) take identical
steps from different points and stay apart for the whole run. A checkpoint stores one copy of each
tensor, so such a run cannot even be resumed exactly. As DeepSpeed's engine does, ``initialize``
therefore gives every rank rank 0's dense parameters (over the world) and each expert's parameters
from the first rank of its expert-data-parallel group (over that group).

Before that, the ranks compare the engine config and the model's parameter layout (names, shapes,
dtypes of the dense tensors; every MoE layer's expert count and ``ep_size``): a rank with another
learning rate or another model is an error naming the keys that differ, not a silent divergence
or a collective that waits for the whole timeout.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.distributed as dist

from ..layer.identity import ExpertIndex
from ..parallel.agree import check_same_on_all_ranks
from ..parallel.collectives import broadcast_tensors


def parameter_layout(index: ExpertIndex) -> Dict[str, Any]:
    """What every rank's model must share: dense tensors and MoE layer shapes (experts are per rank)."""
    dense = {ref.name: [list(ref.shape), str(ref.data.dtype)] for ref in index.dense()}
    layers = {name: {"num_experts": info.num_experts, "ep_size": info.ep_size} for name, info in index.layers.items()}
    return {"dense": dense, "moe_layers": layers}


def sync_replicas(index: ExpertIndex, config: Dict[str, Any], device: torch.device) -> int:
    """Check that the ranks agree, then broadcast the parameters from their source ranks.

    Args:
        index: the model's identity index (after ``setup_expert_parallel``).
        config: the engine config as a dict (``EngineConfig.to_dict()``).
        device: the model's device (NCCL exchanges CUDA tensors only).

    Returns:
        The number of broadcast collectives issued (0 on one process).

    Raises:
        ValueError: the engine config or the parameter layout differs between ranks.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    check_same_on_all_ranks(config, "the engine config", device=device)
    check_same_on_all_ranks(parameter_layout(index), "the model's parameter layout", device=device)
    calls = broadcast_tensors([ref.data for ref in index.dense()], dist.group.WORLD, 0)
    by_group: Dict[tuple, List[torch.Tensor]] = {}
    groups = {}
    for key in index.experts():
        layer = index.layer_of(key)
        if layer.groups is None or len(layer.groups.edp_ranks) == 1:
            continue  # one copy of this expert: nothing to agree on
        by_group.setdefault(layer.groups.edp_ranks, []).extend(ref.data for ref in index.expert_refs(key))
        groups[layer.groups.edp_ranks] = layer.groups.edp_group
    # every rank walks its groups in the same (sorted) order: layouts are the same on every rank
    for ranks in sorted(by_group):
        calls += broadcast_tensors(by_group[ranks], groups[ranks], ranks[0])
    return calls
