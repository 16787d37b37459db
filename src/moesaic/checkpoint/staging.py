"""A load in two phases: everything read and checked into a :class:`StagedLoad`, then applied.

A refused load must leave the model, the optimizer, the scheduler and the RNGs exactly as they
were. So loading first *stages*: every file is read and verified (size, CRC-32, structure), every
tensor is checked against the model and the optimizer, and every JSON value is checked by type and
range (the engine's counters here, the optimizer's group settings by the optimizer, RNG states by
:func:`.rankstate.stage_rng`, the scheduler and the loss scaler by the engine). Only a complete
:class:`StagedLoad`, agreed by every rank, is applied, and applying only copies values already
checked: it cannot fail on the data.

Every check raises :class:`CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layer.identity import ExpertIndex, ExpertKey
from .errors import CheckpointError
from .rankstate import RngState, apply_rng
from .sharded import apply_model, is_sharded

#: engine.json's counters: ints in [0, 2**63 - 1] when present (absent ones take the engine's defaults).
ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
_INT64_MAX = (1 << 63) - 1
_MAX_STEP = 1 << 53  # an optimizer step count is used in float math (bias correction): exact up to here


def _got(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_engine_state(state: Any, path: Path) -> Dict[str, Any]:
    """engine.json's known keys by type and range: the counters, ``scheduler`` and ``loss_scaler`` (object or
    null), ``config`` (object); other keys are left to their readers."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {_got(state)}")
    for key in ENGINE_COUNTERS:
        if key in state:
            v = state[key]
            if type(v) is not int or not 0 <= v <= _INT64_MAX:
                raise CheckpointError(f"{path}: {key} must be an int in [0, 2**63 - 1], got {_got(v)}")
    for key in ("scheduler", "loss_scaler"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: {key} must be a JSON object or null, got {_got(state[key])}")
    if "config" in state and not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: config must be a JSON object, got {_got(state['config'])}")
    return state


def check_optimizer_meta(meta: Any, path: Path, optimizer=None) -> Dict[str, Any]:
    """optimizer.json: ``{"optimizer": str, "param_groups": [{"name": str, settings...}]}``, names unique, the
    type the optimizer's.

    The settings' types and ranges are checked by ``optimizer.check_param_groups`` when the
    optimizer has it (moesaic's does), naming the group and the key.
    """
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(f"{path}: expected {{'optimizer': str, 'param_groups': [...]}}, got {_got(meta)}")
    if not isinstance(meta.get("optimizer"), str):
        raise CheckpointError(f"{path}: optimizer must be the optimizer type's name (a str), got "
                              f"{_got(meta.get('optimizer'))}")
    seen = set()
    for i, g in enumerate(meta["param_groups"]):
        if not isinstance(g, dict):
            raise CheckpointError(f"{path}: param_groups[{i}] must be an object, got {_got(g)}")
        name = g.get("name")
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: param_groups[{i}].name must be a str, got {_got(name)}")
        if name in seen:
            raise CheckpointError(f"{path}: param_groups[{i}].name {name!r} names two groups")
        seen.add(name)
    kind = getattr(optimizer, "kind", None)
    if kind is not None and meta["optimizer"] != kind:
        raise CheckpointError(f"{path}: the optimizer state is for {meta['optimizer']!r} but this optimizer is "
                              f"{kind!r}; resume with the optimizer type that wrote it")
    check = getattr(optimizer, "check_param_groups", None)
    if callable(check):
        try:
            check(meta["param_groups"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: {err}") from None
    return meta


def check_optimizer_entry(name: str, entry: Dict[str, Tensor], path: Path, fields: Optional[Tuple[str, ...]],
                          shape: Optional[Tuple[int, ...]]) -> None:
    """One tensor's optimizer state from a tensor file: known fields, a valid ``step``, float tensors of its shape.

    Args:
        name: the tensor's name (as the optimizer calls it).
        entry: ``{field: tensor}`` read from ``path``.
        path: the file, for messages.
        fields: the fields allowed besides ``step`` and ``master`` (the optimizer's moments); None: any.
        shape: the tensor's shape in the model, or None when unknown here.
    """
    unknown = [] if fields is None else sorted(set(entry) - {"step", "master", *fields})
    if unknown:
        raise CheckpointError(f"{path}: {name}::{unknown[0]} is not optimizer state this optimizer keeps (it keeps "
                              f"step, master and {list(fields)})")
    step = entry.get("step")
    if step is not None:
        ok = (step.numel() == 1 and step.dim() <= 1 and step.dtype != torch.bool and not step.dtype.is_complex)
        value = step.reshape(()).item() if ok else None
        if not ok or not (isinstance(value, int) or math.isfinite(value)) or value != int(value) \
                or not 0 <= int(value) <= _MAX_STEP:
            got = f"{step.dtype} of shape {tuple(step.shape)}" + (f" holding {value!r}" if ok else "")
            raise CheckpointError(f"{path}: {name}::step must be one integer count in [0, 2**53], got {got}")
    for key, t in entry.items():
        if key == "step":
            continue
        if not t.dtype.is_floating_point:
            raise CheckpointError(f"{path}: {name}::{key} is {t.dtype}; optimizer state is floating point")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name}::{key} has shape {tuple(t.shape)} but the tensor has "
                                  f"{tuple(shape)}")


@dataclass
class StagedLoad:
    """A checkpoint read and checked on every rank, not applied yet (see the module docstring).

    Attributes:
        folder: the checkpoint folder.
        client_state: this rank's ``client_state`` (rank 0's under another world size).
        engine_state: engine.json's content (``{}`` without one), its known keys checked.
        engine_file: engine.json's path, for the messages of further checks (None without one).
        extra: what the ``check`` given to :func:`~moesaic.checkpoint.store.prepare` returned.
    """

    folder: Path
    client_state: Dict[str, Any]
    engine_state: Dict[str, Any]
    engine_file: Optional[Path]
    model: nn.Module
    index: ExpertIndex
    dense: Dict[str, Tensor]
    experts: Dict[ExpertKey, Dict[str, Tensor]]
    optimizer: Any = None
    optimizer_state: Optional[Dict[str, Any]] = None
    rng: Optional[RngState] = None  # None under another world size: the RNGs are left alone
    extra: Any = None
    applied: bool = field(default=False, init=False)

    def apply(self) -> None:
        """Copy everything in: the model, the experts, the optimizer, the RNGs (once)."""
        if self.applied:
            raise RuntimeError(f"{self.folder}: this staged load was applied already")
        self.applied = True
        model = self.model
        # the model first: a master weight absent from the optimizer state starts from the loaded weights
        if is_sharded(model):  # stage 3: each rank copies its own rows (checked when staging)
            apply_model(model, self.index, self.dense, self.experts)
        else:
            model.load_state_dict({**self.dense, **{k: v for k, v in model.state_dict().items()
                                                    if k not in self.dense}}, strict=True)
            for key, tensors in self.experts.items():
                self.index.load_expert_state_dict(key, tensors)
        if self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        if self.rng is not None:
            apply_rng(self.rng)
