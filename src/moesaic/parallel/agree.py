"""Ranks that must agree: compare a value (a config, a parameter layout) across all ranks once, at start.

Ranks launched with different configs (another ``optim.lr`` on one node, another ``train.steps``)
otherwise run until their weights silently diverge or until a collective hangs for the whole
process-group timeout. :func:`check_same_on_all_ranks` exchanges one 64-bit hash per rank; only when
the hashes differ does it gather the flattened values and name every key that differs, with each
rank's value, in one error raised on every rank alike.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

from .comm import CollectiveError


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    if isinstance(value, Mapping):
        out: Dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _digest(flat: Mapping[str, Any]) -> int:
    text = json.dumps(flat, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def _show(value: Any) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value, default=repr)


_ABSENT = object()


def describe_differences(per_rank: List[Mapping[str, Any]], limit: int = 10) -> List[str]:
    """One line per key whose value is not the same on every rank: ``key: rank 0 = 1, rank 1 = 2``."""
    keys = sorted(set().union(*per_rank))
    lines = []
    for key in keys:
        values = [flat.get(key, _ABSENT) for flat in per_rank]
        if all(_show(v) == _show(values[0]) for v in values):
            continue
        lines.append(f"{key}: " + ", ".join(f"rank {r} = {_show(v)}" for r, v in enumerate(values)))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def check_same_on_all_ranks(value: Mapping[str, Any], what: str, *, device: Optional[torch.device] = None,
                            group=None) -> None:
    """Raise on every rank when ``value`` is not the same on all ranks of ``group`` (a no-op on one process).

    Args:
        value: a (nested) mapping of JSON-able values, e.g. ``config.to_dict()``.
        what: how the message names it (``"the training config"``).
        device: where the hash tensor lives (the run's device: NCCL exchanges CUDA tensors only).
        group: the process group (default: the world).

    Raises:
        TypeError: ``value`` is not a mapping.
        ValueError: the ranks disagree; the message names each differing key and every rank's value.
        CollectiveError: a peer did not answer (died, or never reached this check).
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"value must be a mapping, got {type(value).__name__}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    flat = flatten(value)
    world = dist.get_world_size(group)
    mine = torch.tensor([_digest(flat)], dtype=torch.int64, device=device)
    hashes = [torch.empty_like(mine) for _ in range(world)]
    try:
        dist.all_gather(hashes, mine, group=group)
        if all(int(h) == int(hashes[0]) for h in hashes):
            return
        per_rank: List[Dict[str, Any]] = [{} for _ in range(world)]
        # rare path: the values themselves, to name what differs (JSON text: no pickled objects travel)
        texts: List[Any] = [None] * world
        dist.all_gather_object(texts, json.dumps(flat, default=repr), group=group)
        per_rank = [json.loads(t) for t in texts]
    except RuntimeError as err:
        raise CollectiveError(f"comparing {what} across ranks failed on rank {dist.get_rank()}: {err}; a peer may "
                              "have died or been started with another program") from err
    lines = describe_differences(per_rank)
    raise ValueError(f"{what} differs between ranks (every rank must run the same one):\n  " + "\n  ".join(lines))
