"""Checkpoints of a model sharded by FSDP2 (ZeRO stage 3): every rank writes only its own rows, by identity.

At ``zero_optimization.stage: 3`` every parameter is a ``DTensor`` sharded on dim 0 (FSDP2's
``Shard(0)``): a dense tensor over the world, an expert tensor over its layer's expert-data-parallel
ranks. Gathering them onto one rank to write format 2 would hold the whole model there, which is
what stage 3 exists to avoid. So a sharded save writes **format 3**: format 2 in which a tensor may
be stored in *row pieces*, each rank writing the rows it holds:

* the manifest lists each unit's files instead of one file: ``"dense": {"files": [...]}``,
  ``"experts": {layer: {"<n>": [files]}}``, ``"optimizer": {"state": {name: [files]}}``;
* a tensor file's manifest entry may say, for a tensor it holds in part, which rows of how many
  (``"rows": {key: [start, stop, total]}``); a tensor without such an entry is stored whole;
* names stay identities (a dense tensor's model name, an expert's tensors by their names inside
  the expert, optimizer state as ``"<name>::<field>"``); file names never contain ranks
  (``dense-<h>.safetensors``, ``experts/<layer>/<n>.part-<h>.safetensors``, ``<h>`` a hash of the
  keys and rows a file holds).

A stacked expert tensor is sharded along its expert dimension, so each of its experts lies whole on
one rank, which writes it whole (``experts/<layer>/<n>.safetensors``, as format 2). The AdamW step
count of a tensor is written once, by the rank holding its first row.

Loading assembles what the loading model needs from the pieces (:func:`assemble`), after checking
that a tensor's pieces tile its rows exactly once: a stage 0-2 model gets whole tensors; a sharded
model only the rows of its own shards (it never builds another rank's rows). Any layout loads any
other: format 2 into a sharded model, format 3 into an unsharded one.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layer.identity import ExpertIndex, ExpertKey, ParamRef
from ..parallel.dtensor import Rows, is_dtensor, local_rows, local_tensor
from .errors import CheckpointError

def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ``DTensor`` shards (FSDP2, ``moesaic.shard_model``)."""
    return any(is_dtensor(p) for p in model.parameters())


def _hash(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()[:12]


def inner_name(ref: ParamRef) -> str:
    """An expert tensor's name inside its expert (``<layer>/<n>/<inner>`` is the ref's name)."""
    return ref.name[len(str(ref.expert)) + 1:]


class Unit:
    """One file's worth of tensors a rank writes: ``{key: tensor}`` and the rows of the pieces among them."""

    def __init__(self) -> None:
        self.tensors: Dict[str, Tensor] = {}
        self.rows: Dict[str, List[int]] = {}

    def add(self, key: str, t: Tensor, rows: Optional[Rows] = None) -> None:
        self.tensors[key] = t
        if rows is not None:
            self.rows[key] = list(rows)

    def hash(self) -> str:
        return _hash(f"{k}@{self.rows.get(k)}" for k in self.tensors)


def _piece(t: Tensor) -> Tuple[Optional[Tensor], Optional[Rows]]:
    """(this rank's rows, their range) of a DTensor, or (t, None) for a plain tensor; (None, _) when empty."""
    rows = local_rows(t)
    if rows is None:
        return t, None
    return (local_tensor(t).detach(), rows) if rows[1] > rows[0] else (None, rows)


def model_units(model: nn.Module, index: ExpertIndex, rank: int,
                first_replica: Callable[[str], bool]) -> Tuple[Unit, Dict[ExpertKey, Unit], Dict[str, str]]:
    """What this rank writes of the model: its dense rows, its experts' rows, and tied names (``{alias: name}``).

    Plain (unsharded) dense tensors such as buffers are written whole by rank 0; plain expert
    tensors by the layer's first replica (``first_replica(layer)``).
    """
    live = model.state_dict(keep_vars=True)
    dense_names = index.dense_state_dict(model)
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    dense = Unit()
    for name in dense_names:
        t = live[name]
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        piece, rows = _piece(t)
        if piece is not None and (rows is not None or rank == 0):
            dense.add(name, piece.detach(), rows)
    experts: Dict[ExpertKey, Unit] = {}
    for key in index.experts():
        unit = Unit()
        for ref in index.expert_refs(key):
            p = ref.param
            if ref.index is None:
                piece, rows = _piece(p)
                if piece is not None and (rows is not None or first_replica(key.layer)):
                    unit.add(inner_name(ref), piece.detach(), rows)
                continue
            rows = local_rows(p)
            if rows is None:
                if first_replica(key.layer):
                    unit.add(inner_name(ref), p.detach()[ref.index])
            elif rows[0] <= ref.index < rows[1]:  # a stacked expert lies whole on one rank
                unit.add(inner_name(ref), local_tensor(p).detach()[ref.index - rows[0]])
        if unit.tensors:
            experts[key] = unit
    return dense, experts, aliases


def optimizer_units(optimizer, index: ExpertIndex) -> Tuple[Dict[Optional[ExpertKey], Unit], List[str]]:
    """This rank's optimizer state rows (``"<name>::<field>"``) by expert (None: dense), and the names it holds.

    A tensor not stepped yet has zero moments and step 0 (as moesaic's stage 0-2 optimizer keeps).
    """
    units: Dict[Optional[ExpertKey], Unit] = {}
    held: List[str] = []
    fields = optimizer.state_fields
    for p in optimizer.params():
        state = optimizer.state.get(p, {})
        rows = local_rows(p)
        step = int(state["step"]) if "step" in state else 0
        for ref in index.held_refs([p]):
            held.append(ref.name)
            unit = units.setdefault(ref.expert, Unit())
            values = {f: state[f] for f in fields if state.get(f) is not None}
            values.update({f: torch.zeros_like(p) for f in optimizer.required_fields if f not in values})
            if ref.index is not None:  # a stacked expert's slice: whole, on this rank
                off = rows[0] if rows is not None else 0
                for f, v in values.items():
                    unit.add(f"{ref.name}::{f}", local_tensor(v).detach()[ref.index - off])
                unit.add(f"{ref.name}::step", torch.tensor(step, dtype=torch.int64))
                continue
            if rows is not None and rows[1] == rows[0]:
                continue  # no rows here
            for f, v in values.items():
                unit.add(f"{ref.name}::{f}", local_tensor(v).detach(), rows)
            if rows is None or rows[0] == 0:
                unit.add(f"{ref.name}::step", torch.tensor(step, dtype=torch.int64))
    return units, held


# --- loading ------------------------------------------------------------------------------------

def assemble(reader, parts: List[str], rows: Dict[str, Dict[str, Rows]], folder,
             want: Callable[[str], Optional[Tuple[int, int]]],
             prefix: Optional[str] = None) -> Tuple[Dict[str, Tensor], Dict[str, Tuple[int, ...]]]:
    """The tensors of a unit's files, pieces joined: ``({key: tensor}, {key: its whole shape})``.

    ``want(key)`` gives the rows the loading model needs (``(start, stop)``, its shard) or None
    (the whole tensor). A tensor's pieces must tile its rows exactly once, with one dtype and one
    shape past dim 0; a key stored whole must be stored once. ``prefix``: only keys starting with it.
    """
    whole: Dict[str, Tuple[Tensor, str]] = {}
    pieces: Dict[str, List[Tuple[Rows, Tensor, str]]] = {}
    for rel in parts:
        file_rows = rows.get(rel, {})
        for key, t in reader[rel].items():
            if prefix is not None and not key.startswith(prefix):
                continue
            r = file_rows.get(key)
            if key in whole or (r is None and key in pieces):
                raise CheckpointError(f"{folder / rel}: {key!r} is stored in more than one file of its unit")
            if r is None:
                whole[key] = (t, rel)
            else:
                pieces.setdefault(key, []).append((tuple(r), t, rel))
    out: Dict[str, Tensor] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for key, (t, _) in whole.items():
        shapes[key] = tuple(t.shape)
        w = want(key)
        out[key] = t if w is None else t[w[0]:w[1]]
    for key, ps in pieces.items():
        ps.sort(key=lambda p: p[0][0])
        total, rest, dtype = ps[0][0][2], tuple(ps[0][1].shape[1:]), ps[0][1].dtype
        pos = 0
        for (a, b, n), t, rel in ps:
            if n != total or a != pos or t.dtype != dtype or tuple(t.shape[1:]) != rest:
                raise CheckpointError(f"{folder / rel}: rows {a}:{b} of {n} of {key!r} ({t.dtype}, {tuple(t.shape)}) "
                                      f"do not continue the pieces before them (rows 0:{pos} of {total}, {dtype}); a "
                                      "tensor's pieces must tile its rows exactly once")
            pos = b
        if pos != total:
            raise CheckpointError(f"{folder / ps[-1][2]}: the pieces of {key!r} cover rows 0:{pos} of {total}")
        shapes[key] = (total,) + rest
        w = want(key)
        lo, hi = (0, total) if w is None else w
        sl = [t[max(a, lo) - a:min(b, hi) - a] for (a, b, _), t, _ in ps if min(b, hi) > max(a, lo)]
        out[key] = sl[0] if len(sl) == 1 else torch.cat(sl) if sl else ps[0][1].new_empty((0,) + rest)
    return out, shapes


def dense_targets(model: nn.Module, index: ExpertIndex) -> Dict[str, Tensor]:
    """The loading model's dense tensors by name (live, ``DTensor`` shards where sharded)."""
    live = model.state_dict(keep_vars=True)
    return {name: live[name] for name in index.dense_state_dict(model)}


def expert_targets(index: ExpertIndex, key: ExpertKey) -> Dict[str, ParamRef]:
    """Expert ``key``'s tensors in a sharded model, by their names inside the expert."""
    return {inner_name(r): r for r in index.expert_refs(key)}


def want_rows(t: Tensor) -> Optional[Tuple[int, int]]:
    rows = local_rows(t)
    return None if rows is None else rows[:2]


@torch.no_grad()
def apply_model(model: nn.Module, index: ExpertIndex, dense: Dict[str, Tensor],
                experts: Dict[ExpertKey, Dict[str, Tensor]]) -> None:
    """Copy checked values into a sharded model: each rank its own rows (shapes were checked when staging)."""
    targets = dense_targets(model, index)
    for name, value in dense.items():
        local_tensor(targets[name]).copy_(value)
    for key, tensors in experts.items():
        refs = expert_targets(index, key)
        for name, value in tensors.items():
            ref = refs[name]
            if ref.index is None:
                local_tensor(ref.param).copy_(value)
                continue
            rows = local_rows(ref.param)
            if rows is None:
                ref.param.detach()[ref.index].copy_(value)
            elif rows[0] <= ref.index < rows[1]:
                local_tensor(ref.param)[ref.index - rows[0]].copy_(value)


def check_local_shapes(path, got: Dict[str, Tensor], targets: Dict[str, Tensor]) -> None:
    """The rows read for a sharded model's tensors have the shape of its local shards (after the whole-shape check)."""
    for k, v in got.items():
        t = targets.get(k)
        if t is not None and tuple(v.shape) != tuple(local_tensor(t).shape):
            raise CheckpointError(f"{path}: {k!r}: read rows of shape {tuple(v.shape)} for a local shard of "
                                  f"{tuple(local_tensor(t).shape)}")
