"""Rows and batches of documents: best-fit packing, a fixed row order, and the step's micro-batches.

Epoch ``e`` visits the documents in an order drawn from ``(seed, e)`` and packs them best-fit
(each document goes into the open row with the least room that still fits it; a new row when none
does) into rows of at most ``block_size`` tokens; the rows are then shuffled with the same seed.
Without packing a row is one document. The rows of all epochs form one stream, and optimizer step
``s`` takes rows ``[s * R, (s + 1) * R)`` of it, R = rows per step over every process. The stream is
a pure function of the document lengths, the seed and ``block_size``, so a resumed run at step
``s`` sees the rows it would have seen (nothing but the step needs saving).

A micro-batch (:func:`collate`) is a `(rows, T)` tensor, T the longest row in it. Documents sit back
to back with positions restarting at 0; the rest of a row is padding (a document of its own to the
attention mask, never a target, kept from the experts by ``token_mask``). ``shift_labels[t]`` is the
token that position ``t`` predicts: the next token of the same document where it is a target, else
-100, so no document learns from its neighbour.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Sequence

import numpy as np
import torch

from .._checks import check_int

IGNORE = -100


def best_fit(order: Sequence[int], lengths: np.ndarray, block_size: int) -> List[List[int]]:
    """Pack documents (visited in ``order``) best-fit into rows of at most ``block_size`` tokens.

    Returns the rows as lists of document numbers, in the order they were opened.
    """
    rows: List[List[int]] = []
    by_room: Dict[int, List[int]] = {}  # room left -> open rows with that much room
    rooms: List[int] = []  # sorted distinct rooms that have a row
    for doc in order:
        n = int(lengths[doc])
        if n > block_size or n <= 0:
            raise ValueError(f"document {doc} has {n} tokens; packing needs 1..block_size={block_size}")
        at = bisect.bisect_left(rooms, n)
        if at < len(rooms):  # the tightest row it fits in
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            row, room = len(rows), block_size
            rows.append([])
        rows[row].append(doc)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(row)
    return rows


class RowStream:
    """The rows of every epoch, in order (see module docstring).

    Args:
        lengths: tokens of each document.
        block_size: tokens per row.
        seed: with the epoch, fixes the document and row order.
        packing: pack several documents per row (best-fit); False: one document per row.
    """

    def __init__(self, lengths: np.ndarray, block_size: int, seed: int, packing: bool = True) -> None:
        check_int(block_size, "block_size", 1)
        if len(lengths) == 0:
            raise ValueError("no documents to make rows of")
        self.lengths, self.block_size, self.seed, self.packing = np.asarray(lengths), block_size, seed, packing
        self._epochs: Dict[int, List[List[int]]] = {}
        self._starts = [0]  # first stream index of each epoch computed so far

    def epoch(self, e: int) -> List[List[int]]:
        if e not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1000003 + e)
            order = torch.randperm(len(self.lengths), generator=g).tolist()
            rows = best_fit(order, self.lengths, self.block_size) if self.packing else [[d] for d in order]
            perm = torch.randperm(len(rows), generator=g).tolist()
            for old in [k for k in self._epochs if k != e][:-1]:  # memory bounded: this and one other epoch
                del self._epochs[old]
            self._epochs[e] = [rows[i] for i in perm]
        return self._epochs[e]

    def rows(self, start: int, count: int) -> List[List[int]]:
        """Rows ``[start, start + count)`` of the stream."""
        out: List[List[int]] = []
        while self._starts[-1] < start + count:
            self._starts.append(self._starts[-1] + len(self.epoch(len(self._starts) - 1)))
        for i in range(start, start + count):
            e = bisect.bisect_right(self._starts, i) - 1
            out.append(self.epoch(e)[i - self._starts[e]])
        return out

    def rows_per_epoch(self) -> int:
        return len(self.epoch(0))


def collate(store, rows: List[List[int]], packed: bool = True) -> Dict[str, torch.Tensor]:
    """The micro-batch of ``rows`` (lists of document numbers of ``store``; see module docstring).

    Returns ``input_ids``, ``position_ids``, ``shift_labels`` (int64) and ``token_mask`` (bool), all
    `(len(rows), T)`, ``targets`` (the number of labels, a Python int) and ``packed``.
    """
    T = max(int(sum(store.lengths[d] for d in row)) for row in rows)
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, row in enumerate(rows):
        at = 0
        for d in row:
            tokens, targets = store.document(d)
            n = len(tokens)
            t = torch.from_numpy(tokens.astype(np.int64))
            ids[b, at:at + n] = t
            pos[b, at:at + n] = torch.arange(n)
            nxt = torch.where(torch.from_numpy(targets[1:].astype(bool)), t[1:], torch.full_like(t[1:], IGNORE))
            labels[b, at:at + n - 1] = nxt
            mask[b, at:at + n] = True
            at += n
        pos[b, at:] = torch.arange(T - at)  # the padding: a document of its own
    return {"input_ids": ids, "position_ids": pos, "shift_labels": labels, "token_mask": mask,
            "targets": int((labels != IGNORE).sum()), "packed": packed}
