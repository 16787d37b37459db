"""Token dispatch across expert-parallel ranks: capacity mode and dropless mode.

Rank r of an expert-parallel group of P ranks holds global experts ``r*L .. r*L+L-1``, so the
router's expert order is also destination-rank order. One forward:

1. exchange a small header with every peer: a signature of the layer configuration, the
   capacity, and how many routes this rank sends to each of the peer's experts;
2. send the tokens: capacity mode moves fixed-size ``[E, C, D]`` buffers (DeepSpeed's layout);
   dropless mode moves exactly the routed rows with split sizes (no padding to the largest count);
3. reorder the received rows from (source rank, expert) to (expert, source rank) and run each
   local expert on its contiguous piece, computing only rows that hold a token;
4. put the outputs back in (source rank, expert) order and send them home (the reverse
   all-to-all);
5. combine on the origin rank exactly as in the single-process layer.

Configuration or capacity disagreement between ranks is caught at step 1, on every rank, before
any token moves, instead of producing garbage or a hang.

Shape legend: S = tokens, E = experts, L = local experts, P = ranks, C = capacity, N = routes,
M = rows received, D = model dim.
"""

from __future__ import annotations

import zlib
from typing import List, Sequence

import torch
from torch import Tensor

from ..parallel.comm import CollectiveError, all_to_all, exchange_counts
from ..parallel.groups import ExpertParallelGroups
from .dispatch import _Permute, combine
from .gating import Routing


class _ScatterRows(torch.autograd.Function):
    """out[index[piece i rows]] = piece i, zeros elsewhere; backward gathers the pieces' grads."""

    @staticmethod
    def forward(ctx, index_M: Tensor, num_rows: int, sizes: List[int], *pieces: Tensor) -> Tensor:
        ref = pieces[0]
        out = ref.new_zeros(num_rows, ref.shape[1])
        for idx, piece in zip(index_M.split(sizes), pieces):
            if idx.numel():
                out.index_copy_(0, idx, piece)
        ctx.save_for_backward(index_M)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index_M,) = ctx.saved_tensors
        grads = [grad.index_select(0, idx) for idx in index_M.split(ctx.sizes)]
        return (None, None, None, *grads)


def _blocks_to_expert_major(starts_PL: Tensor, counts_PL: Tensor):
    """Row index that visits block (p, l) rows for l = 0.., then p = 0..; and rows per l."""
    starts = starts_PL.t().reshape(-1)
    counts = counts_PL.t().reshape(-1)
    total = int(counts.sum())
    offsets = torch.cumsum(counts, 0) - counts
    index = torch.repeat_interleave(starts - offsets, counts, output_size=total) + torch.arange(total)
    return index, counts_PL.sum(0).tolist()


class ExpertParallelDispatcher:
    """Runs one MoE layer's experts across an expert-parallel group.

    Args:
        groups: this rank's groups for the layer's ``ep_size``.
        num_experts: E (global).
        hidden_size: D.
        drop_tokens: capacity mode when True, dropless when False.
        signature: a string that every rank of the group must agree on (the layer configuration).
    """

    def __init__(self, groups: ExpertParallelGroups, num_experts: int, hidden_size: int, drop_tokens: bool,
                 signature: str) -> None:
        if num_experts % groups.ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({groups.ep_size})")
        self.groups = groups
        self.P = groups.ep_size
        self.E = num_experts
        self.L = num_experts // groups.ep_size
        self.D = hidden_size
        self.drop_tokens = drop_tokens
        self.signature_text = signature
        self.sent_rows = 0  # rows this rank sent in the last forward (both directions), for benchmarks
        self.sent_bytes = 0

    def _exchange_header(self, routing: Routing, num_tokens: int, dtype: torch.dtype) -> Tensor:
        """Send [signature, S, C, routes for each of the peer's experts] to each peer; check agreement."""
        text = f"{self.signature_text} dtype={dtype}"
        signature = zlib.crc32(text.encode()) & 0x7FFFFFFF
        capacity = routing.capacity if routing.capacity is not None else -1
        counts_PL = routing.tokens_per_expert_E.view(self.P, self.L)
        header_P3 = torch.tensor([[signature, num_tokens, capacity]], dtype=torch.int64).expand(self.P, 3)
        recv = exchange_counts(torch.cat([header_P3, counts_PL.to(torch.int64)], dim=1), self.groups.ep_group,
                               "routing header")
        bad_sig = recv[:, 0] != signature
        if bool(bad_sig.any()):
            ranks = [self.groups.ep_ranks[i] for i in bad_sig.nonzero().flatten().tolist()]
            raise CollectiveError(f"MoE layer configuration differs between ranks: rank(s) {ranks} of expert-parallel "
                                  f"group {list(self.groups.ep_ranks)} disagree with this rank's "
                                  f"({text}); every rank must build the same layer")
        if self.drop_tokens and bool((recv[:, 2] != capacity).any()):
            table = {self.groups.ep_ranks[i]: (int(recv[i, 1]), int(recv[i, 2])) for i in range(self.P)}
            raise CollectiveError(f"ranks disagree on the expert capacity in capacity mode: (tokens, capacity) per rank "
                                  f"= {table}. Capacity mode needs the same token count on every rank of an "
                                  "expert-parallel group; pad the batches or use drop_tokens=False")
        return recv[:, 3:]  # (P, L): routes each peer sends to each of my local experts

    def __call__(self, x_SD: Tensor, routing: Routing, experts) -> Tensor:
        S = x_SD.shape[0]
        # 1. header: config and capacity agreement, counts for my local experts
        recv_counts_PL = self._exchange_header(routing, S, x_SD.dtype)
        group = self.groups.ep_group
        if self.drop_tokens:
            # 2. capacity mode: [E*C, D] buffer, row e*C + slot; empty slots read a zero pad row
            C = routing.capacity
            slots_N = routing.expert_idx_N * C + routing.slot_N
            source = torch.full((self.E * C,), S, dtype=torch.long)
            source[slots_N] = routing.token_idx_N
            x_pad = torch.cat([x_SD, x_SD.new_zeros(1, self.D)])
            (send,) = _Permute.apply(x_pad, source, [self.E * C])
            recv = all_to_all(send, group, what="tokens (capacity mode)")
            starts_PL = torch.arange(self.P * self.L).view(self.P, self.L) * C
            in_splits = out_splits = None
            self.sent_rows = 2 * self.E * C
        else:
            # 2. dropless: exactly the routed rows, split by destination rank
            (send,) = _Permute.apply(x_SD, routing.token_idx_N, [routing.token_idx_N.numel()])
            in_splits = routing.tokens_per_expert_E.view(self.P, self.L).sum(1).tolist()
            out_splits = recv_counts_PL.sum(1).tolist()
            recv = all_to_all(send, group, in_splits, out_splits, what="tokens (dropless)")
            flat = recv_counts_PL.reshape(-1)
            starts_PL = (torch.cumsum(flat, 0) - flat).view(self.P, self.L)
            self.sent_rows = sum(in_splits) + sum(out_splits)
        self.sent_bytes = self.sent_rows * self.D * x_SD.element_size()

        # 3. (source, expert) -> (expert, source); run each local expert on its real rows only
        index_M, sizes_L = _blocks_to_expert_major(starts_PL, recv_counts_PL)
        pieces = _Permute.apply(recv, index_M, sizes_L)
        ys: Sequence[Tensor] = experts(pieces)

        # 4. back to (source, expert) order and home
        out = _ScatterRows.apply(index_M, recv.shape[0], sizes_L, *ys)
        if self.drop_tokens:
            back = all_to_all(out, group, what="expert outputs (capacity mode)")
            (y_N,) = _Permute.apply(back, slots_N, [slots_N.numel()])
        else:
            y_N = all_to_all(out, group, out_splits, in_splits, what="expert outputs (dropless)")
        # 5. weighted combine on the origin rank, as in the single-process layer
        return combine([y_N], routing, S)
