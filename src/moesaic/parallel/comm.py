"""Communication primitives for expert parallelism: autograd all-to-all, with or without splits.

The forward is ``all_to_all_single`` with the given row splits; the backward is the same call
with the input and output splits swapped. Errors from the backend (a peer that died, a timeout)
are re-raised naming the operation and the group, so the user learns which collective failed.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


class CollectiveError(RuntimeError):
    """A collective failed: a peer left, timed out, or disagreed on sizes."""


def _all_to_all(x: Tensor, out_rows: int, in_splits: Optional[List[int]], out_splits: Optional[List[int]],
                group, what: str) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
    try:
        dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    except RuntimeError as err:  # gloo/NCCL errors: peer gone, timeout, size mismatch
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        raise CollectiveError(f"all-to-all for {what} failed on rank {dist.get_rank()} in group {ranks}: {err}. "
                              "A peer may have died or disagreed on tensor sizes; see the other ranks' logs") from err
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, in_splits, out_splits, group, what: str) -> Tensor:
        ctx.in_splits, ctx.out_splits, ctx.group, ctx.what = in_splits, out_splits, group, what
        ctx.in_rows = x.shape[0]
        out_rows = sum(out_splits) if out_splits is not None else x.shape[0]
        return _all_to_all(x, out_rows, in_splits, out_splits, group, what)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = _all_to_all(grad, ctx.in_rows, ctx.out_splits, ctx.in_splits, ctx.group, ctx.what + " (backward)")
        return g, None, None, None, None


def all_to_all(x: Tensor, group, in_splits: Optional[List[int]] = None, out_splits: Optional[List[int]] = None,
               what: str = "tokens") -> Tensor:
    """Differentiable all-to-all over dim 0.

    Args:
        x: `(rows, ...)` to send; ``in_splits[r]`` rows go to rank r of ``group`` (equal parts when
            None).
        group: the process group.
        in_splits / out_splits: row counts sent to / received from each rank (both or neither).
        what: a label for error messages.

    Returns:
        The received rows, concatenated in source-rank order.
    """
    if (in_splits is None) != (out_splits is None):
        raise ValueError("in_splits and out_splits must be given together")
    return _AllToAll.apply(x, in_splits, out_splits, group, what)


def exchange_counts(send_PC: Tensor, group, what: str) -> Tensor:
    """Non-differentiable fixed-size all-to-all of a small int64 table: row r goes to rank r."""
    return _all_to_all(send_PC, send_PC.shape[0], None, None, group, what)
