"""The all-to-all dispatcher: tokens to the experts of other expert-parallel ranks and back.

Rank r of an expert-parallel group of P ranks holds global experts ``r*L .. r*L+L-1``, so the
router's expert order is also destination-rank order. One forward:

1. exchange a small header with every peer: the fingerprint of the router config (plus width and
   dtype), the token count, the capacity, and how many routes go to each of the peer's experts.
   Disagreement fails here, on every rank, before any token moves;
2. send the tokens for *other* ranks' experts: capacity mode moves fixed ``[L, C, D]`` blocks
   per peer (DeepSpeed's layout, less the block a rank would send itself); dropless mode moves
   exactly the routed rows with split sizes. Routes to this rank's own experts never enter the
   collective;
3. assemble each local expert's piece from the received blocks and, for this rank's own routes,
   straight from the layer input (rows that hold a token only);
4. (experts compute; the caller runs them) split the outputs into the blocks that go home to peers
   and the rows that stay, and send the blocks back (the reverse all-to-all);
5. combine on the origin rank, as the local dispatcher does.

Memory: the layer input stays alive (the router saves it) and the received buffer holds every
other row of the pieces, so when the received buffer is smaller than the pieces (always in dropless
mode; in capacity mode when the padding is small) the experts' saved inputs are kept as that
buffer plus indices (:class:`~moesaic.layer.ops.SavedPieces`), not as a second copy: the rows
this rank routed to itself (about 1/P of them) are not stored twice.

Shape legend: S = tokens, E = experts, L = local experts, P = ranks, C = capacity, D = model dim.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_int
from ..parallel.comm import CollectiveError, all_to_all, exchange_counts
from ..parallel.groups import ExpertParallelGroups
from .dispatch import Dispatcher
from .ops import HandedPieces, SavedPieces, gather_pieces, gather_rows, weighted_combine
from .gate import config_fingerprint
from .routing import Routing


@dataclass(frozen=True)
class Blocks:
    """Where block (p, l), the routes source rank p sends to local expert l, lives.

    Attributes:
        me: this rank's index in the group.
        counts: ``counts[p][l]`` rows of block (p, l).
        recv_start: ``recv_start[p][l]`` first row of the block in the received buffer (-1 for p = me).
        piece_start: ``piece_start[p][l]`` first row of the block inside piece l.
        self_start: ``self_start[l]`` first row of block (me, l) among this rank's own routes.
        sizes: rows of each piece.
        recv_rows: rows of the received buffer (padding included in capacity mode).
    """

    me: int
    counts: Tuple[Tuple[int, ...], ...]
    recv_start: Tuple[Tuple[int, ...], ...]
    piece_start: Tuple[Tuple[int, ...], ...]
    self_start: Tuple[int, ...]
    sizes: Tuple[int, ...]
    recv_rows: int

    @property
    def padded(self) -> bool:
        """Whether the received buffer holds rows no route fills (capacity mode's empty slots)."""
        return self.recv_rows != sum(sum(row) for p, row in enumerate(self.counts) if p != self.me)

    @classmethod
    def build(cls, counts: List[List[int]], me: int, capacity: Optional[int]) -> "Blocks":
        """Layout for ``counts[p][l]`` (from the header); capacity None means dropless."""
        P, L = len(counts), len(counts[0])
        recv_start, piece_start = [[-1] * L for _ in range(P)], [[0] * L for _ in range(P)]
        offset = 0
        for p in range(P):
            for l in range(L):
                piece_start[p][l] = sum(counts[q][l] for q in range(p))
                if p == me:
                    continue
                if capacity is None:  # rows arrive packed, source by source, expert by expert
                    recv_start[p][l] = offset
                    offset += counts[p][l]
                else:  # each peer's [L, C] block, in peer order (this rank's own block is not sent)
                    recv_start[p][l] = ((p - (p > me)) * L + l) * capacity
        recv_rows = offset if capacity is None else (P - 1) * L * capacity
        self_start = tuple(sum(counts[me][:l]) for l in range(L))
        sizes = tuple(sum(counts[p][l] for p in range(P)) for l in range(L))
        return cls(me, tuple(map(tuple, counts)), tuple(map(tuple, recv_start)), tuple(map(tuple, piece_start)),
                   self_start, sizes, recv_rows)

    def segments(self, l: int):
        """``(p, rows, first row in piece l, first row in recv or among own routes)`` of piece l."""
        for p, row in enumerate(self.counts):
            c = row[l]
            if c:
                yield p, c, self.piece_start[p][l], (self.self_start[l] if p == self.me else self.recv_start[p][l])


def assemble_piece(blocks: Blocks, l: int, x_SD: Tensor, recv: Tensor, self_index: Tensor) -> Tensor:
    """Piece l (no autograd): its rows from every source rank, this rank's own from ``x_SD``."""
    out = x_SD.new_empty(blocks.sizes[l], x_SD.shape[1])
    for p, c, at, src in blocks.segments(l):
        if p == blocks.me:  # gathered in place: no temporary
            torch.index_select(x_SD, 0, self_index[src:src + c], out=out[at:at + c])
        else:
            out[at:at + c] = recv[src:src + c]
    return out


class _Assemble(torch.autograd.Function):
    """Pieces from (layer input, received buffer); backward splits each piece's gradient back."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, recv: Tensor, blocks: Blocks, self_index: Tensor) -> Tuple[Tensor, ...]:
        ctx.blocks, ctx.num_tokens = blocks, x_SD.shape[0]
        ctx.save_for_backward(self_index)
        return tuple(assemble_piece(blocks, l, x_SD, recv, self_index) for l in range(len(blocks.sizes)))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        (self_index,) = ctx.saved_tensors
        blocks = ctx.blocks
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return None, None, None, None
        grad_x = ref.new_zeros(ctx.num_tokens, ref.shape[1])
        # every row is written below, except capacity mode's empty slots, which go home as zeros
        missing = any(g is None for g in grads)
        grad_recv = (ref.new_zeros if blocks.padded or missing else ref.new_empty)(blocks.recv_rows, ref.shape[1])
        for l, g in enumerate(grads):
            if g is None:
                continue
            for p, c, at, src in blocks.segments(l):
                if p == blocks.me:
                    grad_x.index_add_(0, self_index[src:src + c], g[at:at + c])
                else:
                    grad_recv[src:src + c] = g[at:at + c]
        return grad_x, grad_recv, None, None


class _Return(torch.autograd.Function):
    """Outputs -> (blocks going home to peers, in the received layout; rows of this rank's own routes)."""

    @staticmethod
    def forward(ctx, blocks: Blocks, *ys: Tensor) -> Tuple[Tensor, Tensor]:
        ctx.blocks = blocks
        D = ys[0].shape[1]
        home = (ys[0].new_zeros if blocks.padded else ys[0].new_empty)(blocks.recv_rows, D)
        own = ys[0].new_empty(sum(blocks.counts[blocks.me]), D)
        for l, y in enumerate(ys):
            for p, c, at, dst in blocks.segments(l):
                (own if p == blocks.me else home)[dst:dst + c] = y[at:at + c]
        return home, own

    @staticmethod
    def backward(ctx, grad_home: Optional[Tensor], grad_own: Optional[Tensor]):
        blocks = ctx.blocks
        ref = grad_home if grad_home is not None else grad_own
        grads = []
        new = ref.new_empty if grad_home is not None and grad_own is not None else ref.new_zeros
        for l, size in enumerate(blocks.sizes):
            g = new(size, ref.shape[1])  # every row of piece l belongs to one block
            for p, c, at, src in blocks.segments(l):
                source = grad_own if p == blocks.me else grad_home
                if source is not None:
                    g[at:at + c] = source[src:src + c]
            grads.append(g)
        return (None, *grads)


class _Send(torch.autograd.Function):
    """``out[dest_rows] = x[token_idx]`` in a new `(num_rows, D)` buffer (``dest_rows`` None: packed)."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, token_idx: Tensor, dest_rows: Optional[Tensor], num_rows: int) -> Tensor:
        ctx.num_tokens = x_SD.shape[0]
        ctx.save_for_backward(token_idx, dest_rows)
        rows = gather_rows(x_SD, token_idx)
        if dest_rows is None:
            return rows
        out = x_SD.new_zeros(num_rows, x_SD.shape[1])  # empty slots: sent, never read
        return out.index_copy_(0, dest_rows, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        token_idx, dest_rows = ctx.saved_tensors
        g_rows = grad if dest_rows is None else gather_rows(grad.contiguous(), dest_rows)
        grad_x = grad.new_zeros(ctx.num_tokens, grad.shape[1]).index_add_(0, token_idx, g_rows)
        return grad_x, None, None, None


@dataclass(frozen=True)
class AllToAllMeta:
    """What :meth:`AllToAllDispatcher.combine` needs to bring the outputs home."""

    routing: Routing
    blocks: Blocks
    own: Tuple[int, int]  # this rank's own routes: rows [start, end) of the routing
    dest_rows: Optional[Tensor]  # capacity mode: row of each outgoing route in the send buffer
    in_splits: Tuple[int, ...]
    out_splits: Tuple[int, ...]
    x_SD: Tensor
    recv: Optional[Tensor]  # kept only when re-assembling saved pieces from it pays


class AllToAllDispatcher(Dispatcher):
    """Moves tokens over an expert-parallel group; capacity mode or dropless, as the routing says.

    Args:
        groups: this rank's groups for the layer's ``ep_size`` (> 1).
        num_experts: E (global); a multiple of ``groups.ep_size``.
    """

    def __init__(self, groups: ExpertParallelGroups, num_experts: int) -> None:
        if not isinstance(groups, ExpertParallelGroups):
            raise TypeError(f"groups must be ExpertParallelGroups, got {type(groups).__name__}")
        check_int(num_experts, "num_experts", 1)
        if num_experts % groups.ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({groups.ep_size})")
        self.groups = groups
        self.P = groups.ep_size
        self.E = num_experts
        self.num_local_experts = num_experts // groups.ep_size

    def _exchange_header(self, routing: Routing, x_SD: Tensor) -> List[List[int]]:
        """Send [fingerprint, S, C, routes to each of the peer's experts] to each peer; check agreement."""
        groups = self.groups
        signature = config_fingerprint(routing.config, x_SD.shape[1], x_SD.dtype)
        capacity = routing.capacity if routing.capacity is not None else -1
        header_P3 = torch.tensor([[signature, x_SD.shape[0], capacity]], dtype=torch.int64,
                                 device=x_SD.device).expand(self.P, 3)
        counts_PL = routing.tokens_per_expert_E.view(self.P, self.num_local_experts).to(torch.int64)
        recv = exchange_counts(torch.cat([header_P3, counts_PL], dim=1), groups.ep_group, "routing header")
        bad_sig = recv[:, 0] != signature
        if bool(bad_sig.any()):
            ranks = [groups.ep_ranks[i] for i in bad_sig.nonzero().flatten().tolist()]
            raise CollectiveError(f"MoE layer configuration differs between ranks: rank(s) {ranks} of expert-parallel "
                                  f"group {list(groups.ep_ranks)} disagree with this rank's ({routing.config}, "
                                  f"hidden_size={x_SD.shape[1]}, dtype={x_SD.dtype}); every rank must build the "
                                  "same layer")
        if routing.capacity is not None and bool((recv[:, 2] != capacity).any()):
            table = {groups.ep_ranks[i]: (int(recv[i, 1]), int(recv[i, 2])) for i in range(self.P)}
            raise CollectiveError(f"ranks disagree on the expert capacity in capacity mode: (tokens, capacity) per rank "
                                  f"= {table}. Capacity mode needs the same token count on every rank of an "
                                  "expert-parallel group; pad the batches or use drop_tokens=False")
        return recv[:, 3:].tolist()  # [P][L]: routes each peer sends to each of my local experts

    def dispatch(self, x_SD: Tensor, routing: Routing, together: bool = False) -> Tuple[List[Tensor], AllToAllMeta]:
        # 1. header: agreement, and the counts for my local experts
        if routing.tokens_per_expert_E.numel() != self.E:
            raise ValueError(f"routing is over {routing.tokens_per_expert_E.numel()} experts, the layer has {self.E}")
        # a recompute moves the rows its first forward moved: no second count exchange
        counts = ([list(row) for row in routing.peer_counts] if routing.peer_counts is not None
                  else self._exchange_header(routing, x_SD))
        P, L, me, C = self.P, self.num_local_experts, self.groups.ep_rank, routing.capacity
        blocks = Blocks.build(counts, me, C)
        to_rank = routing.tokens_per_expert_E.view(P, L).sum(1).tolist()
        start = sum(to_rank[:me])
        end = start + to_rank[me]

        # 2. routes to other ranks' experts leave; my own stay
        token_out = _without(routing.token_idx_N, start, end)
        if C is None:
            dest_rows = None
            in_splits = tuple(n if r != me else 0 for r, n in enumerate(to_rank))
            out_splits = tuple(sum(row) if p != me else 0 for p, row in enumerate(counts))
            send_rows = token_out.numel()
        else:
            expert_out = _without(routing.expert_idx_N, start, end)
            rank_out = torch.div(expert_out, L, rounding_mode="floor")
            peer_out = rank_out - (rank_out > me).to(rank_out.dtype)  # index among the peers
            dest_rows = (peer_out * L + expert_out % L) * C + _without(routing.slot_N, start, end)
            in_splits = out_splits = tuple(L * C if r != me else 0 for r in range(P))
            send_rows = (P - 1) * L * C
        send = _Send.apply(x_SD, token_out, dest_rows, send_rows)
        recv = all_to_all(send, self.groups.ep_group, list(in_splits), list(out_splits),
                          what="tokens (capacity mode)" if C is not None else "tokens (dropless)")

        # 3. each local expert's rows from every source, mine straight from the layer input
        self_index = routing.token_idx_N[start:end]
        pieces = _Assemble.apply(x_SD, recv, blocks, self_index)
        keep_recv = blocks.recv_rows < sum(blocks.sizes)  # cheaper to keep than the pieces
        meta = AllToAllMeta(routing, blocks, (start, end), dest_rows, in_splits, out_splits, x_SD.detach(),
                            recv.detach() if keep_recv else None)
        return HandedPieces(pieces), meta

    def saved_inputs(self, pieces: Sequence[Tensor], meta: AllToAllMeta, together: bool = False) -> ContextManager:
        if meta.recv is None:
            return contextlib.nullcontext()
        start, end = meta.own
        blocks = meta.blocks  # plain lists of ints: the rebuild reads no tensor but its sources (ops.SavedPieces)
        return SavedPieces(pieces, lambda l, x_SD, recv, self_index: assemble_piece(blocks, l, x_SD, recv, self_index),
                           sources=(meta.x_SD, meta.recv, meta.routing.token_idx_N[start:end]))

    def combine(self, outputs: Sequence[Tensor], meta: AllToAllMeta) -> Tensor:
        # 4. blocks home to their source ranks; rows of my own routes stay
        home, own = _Return.apply(meta.blocks, *outputs)
        capacity_mode = meta.dest_rows is not None
        back = all_to_all(home, self.groups.ep_group, list(meta.out_splits), list(meta.in_splits),
                          what="expert outputs (capacity mode)" if capacity_mode else "expert outputs (dropless)")
        if capacity_mode:
            (back,) = gather_pieces(back, meta.dest_rows, [meta.dest_rows.numel()])
        # 5. weighted sum on the origin rank; the route order is (routes sent away, my own routes)
        r, (start, end) = meta.routing, meta.own
        weight_N = _own_last(r.weight_N, start, end)
        token_N = _own_last(r.token_idx_N, start, end)
        return weighted_combine([back, own], weight_N, token_N, meta.x_SD.shape[0])

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(num_experts={self.E}, ep_size={self.P}, "
                f"ep_ranks={list(self.groups.ep_ranks)}, ep_rank={self.groups.ep_rank})")


def _without(t: Tensor, start: int, end: int) -> Tensor:
    """``t`` less its rows ``[start, end)``."""
    return torch.cat([t[:start], t[end:]])


def _own_last(t: Tensor, start: int, end: int) -> Tensor:
    """``t`` with its rows ``[start, end)`` moved to the end."""
    return torch.cat([t[:start], t[end:], t[start:end]])
