"""What ``engine.load_checkpoint`` restores from ``engine.json``, checked whole before anything is applied.

:func:`stage` runs inside :func:`moesaic.checkpoint.prepare`, before the ranks agree and before
the model, optimizer, scheduler or RNG changes: the counters (already range-checked by the
checkpoint package), the LR scheduler's state and the loss scaler's state are checked against
the live objects. A scheduler of moesaic's (or any with ``check_state_dict``) checks its own
state; any other scheduler (torch's, the user's) gets its saved state compared with the shape of
its live ``state_dict()``: the same keys, and values of the same kinds (numbers, strings,
booleans, lists of the same length, objects with the same keys). :func:`apply` then only assigns.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ..checkpoint import CheckpointError

_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class EngineResume:
    """The engine's part of a staged load: counters, and the states to load (None: leave as is)."""

    counters: Dict[str, int]
    scheduler: Optional[Dict[str, Any]]
    loss_scaler: Optional[Dict[str, Any]]


def stage(engine, staged, load_scheduler: bool) -> EngineResume:
    """Check ``staged.engine_state`` against ``engine``; CheckpointError naming engine.json and the key."""
    state: Dict[str, Any] = staged.engine_state
    path = staged.engine_file
    steps = state.get("global_steps", 0)
    counters = {"global_steps": steps,
                "global_samples": state.get("global_samples", steps * engine.train_batch_size()),
                "micro_steps": state.get("micro_steps", 0), "skipped_steps": state.get("skipped_steps", 0)}
    scheduler = None
    if load_scheduler and engine.lr_scheduler is not None and state.get("scheduler") is not None:
        scheduler = state["scheduler"]
        check_scheduler_state(engine.lr_scheduler, scheduler, path)
    scaler = None
    if engine.loss_scaler is not None and state.get("loss_scaler") is not None:
        scaler = state["loss_scaler"]
        try:
            engine.loss_scaler.check_state_dict(scaler)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: loss_scaler: {_text(err)}") from None
    return EngineResume(counters=counters, scheduler=scheduler, loss_scaler=scaler)


def check_scheduler_state(scheduler, saved: Any, path: Optional[Path]) -> None:
    """Saved scheduler state against the live scheduler (see the module docstring)."""
    check = getattr(scheduler, "check_state_dict", None)
    if callable(check):
        try:
            check(saved)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: scheduler: {_text(err)}") from None
        return
    if not callable(getattr(scheduler, "load_state_dict", None)):
        raise CheckpointError(f"{path}: holds scheduler state, but the engine's {type(scheduler).__name__} has no "
                              "load_state_dict(); load with load_lr_scheduler_states=False")
    try:
        live = json.loads(json.dumps(scheduler.state_dict()))
    except (TypeError, ValueError):
        return  # a state JSON cannot hold was never saved by this scheduler: nothing to compare with
    problem = _difference(saved, live, "scheduler")
    if problem is not None:
        raise CheckpointError(f"{path}: {problem} (compared with this {type(scheduler).__name__}'s own state)")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "str", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _difference(saved: Any, live: Any, key: str) -> Optional[str]:
    """Where ``saved`` is not of the shape of ``live`` (a message naming the key), or None."""
    if live is None:
        return None  # nothing known about it
    if _kind(saved) != _kind(live):
        return f"{key} must be a {_kind(live)}, got {_kind(saved)} {saved!r:.60}"
    if isinstance(saved, int) and not isinstance(saved, bool) and abs(saved) > _INT64_MAX:
        return f"{key} must fit in 64 bits, got {saved!r:.60}"
    if isinstance(saved, list):
        if len(saved) != len(live):
            return f"{key} must list {len(live)} values, got {len(saved)}"
        for i, (s, v) in enumerate(zip(saved, live)):
            problem = _difference(s, v, f"{key}[{i}]")
            if problem is not None:
                return problem
    if isinstance(saved, dict):
        missing, unknown = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        if missing or unknown:
            return f"{key} has the keys {sorted(saved)[:8]}, expected {sorted(live)[:8]}"
        for k in live:
            problem = _difference(saved[k], live[k], f"{key}.{k}")
            if problem is not None:
                return problem
    return None


def load_scheduler(scheduler, saved: Dict[str, Any], path: Optional[Path]) -> None:
    """Load a checked scheduler state; if the scheduler (user code) still raises, put its old state back."""
    before = copy.deepcopy(scheduler.state_dict())
    try:
        scheduler.load_state_dict(copy.deepcopy(saved))
    except Exception as err:  # noqa: BLE001 - a scheduler of the user's own may raise anything
        scheduler.load_state_dict(before)
        raise CheckpointError(f"{path}: scheduler: {type(scheduler).__name__}.load_state_dict refused the saved "
                              f"state ({type(err).__name__}: {err}); nothing was loaded") from err


def apply(engine, resume: EngineResume) -> None:
    """Assign the checked counters and loss-scaler state (cannot fail on the data)."""
    for name, value in resume.counters.items():
        setattr(engine, name, value)
    if resume.loss_scaler is not None:
        engine.loss_scaler.load_state_dict(resume.loss_scaler)


def _text(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)
