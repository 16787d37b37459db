"""Exact recompute: an MoE layer run again by activation checkpointing computes what it first computed.

Activation checkpointing (``torch.utils.checkpoint``, reentrant or not, ``transformers``'
``gradient_checkpointing_enable``, DeepSpeed's ``checkpointing.checkpoint``) throws a region's
activations away in forward and runs the region again in backward. A router is not a pure
function of its input: noise (Jitter, RSample, 2nd-expert sampling, random token selection)
draws from the RNG, near-ties flip under non-deterministic kernels, and a forward has side
effects (the aux-loss-free ``expert_load``, the layer's statistics). So this module records, for
every MoE call made inside a checkpointed region, the routing *decision* (expert ids, kept routes,
slots, capacity, counts, the expert-parallel header) and the RNG state around the call, on the
checkpoint's own bookkeeping object; the recompute of that region takes the records back in the
same order:

* the decision is reused, never re-drawn (:func:`moesaic.layer.gate.route_with_decision`
  recomputes only the differentiable parts: scores, combine weights, losses);
* the RNG state at the call is restored, so Jitter noise (which changes the router logits and
  so the weights), Mixtral's input jitter and an expert's dropout draw the same numbers, and the
  state after the call is restored too, so the rest of the region draws what it drew;
* side effects happen once: ``expert_load``, the layer's last-forward statistics;
* under expert parallelism the recompute reuses the routes-per-peer header: no second count
  exchange.

**Where the record lives.** A non-reentrant checkpoint's region is a ``_CheckpointFrame``; in
forward, the innermost one is reached through the saved-tensor hook it pushed (outer ones that
were started with ``torch.utils.checkpoint.checkpoint`` through the Python stack), and its
recompute runs inside its ``unpack_hook`` (on the stack). A reentrant checkpoint
(``CheckpointFunction``, torch's or DeepSpeed's) runs its region inside its ``forward(ctx, ...)``
and again inside ``backward(ctx, ...)``: the ``ctx`` is found on the stack. Records are stored as
an attribute of that frame or ``ctx``, so they live exactly as long as the checkpoint can
recompute. A recompute walks its records with a cursor per backward pass, so a second backward
(``retain_graph=True``) and early-stopped recomputes start over, and a nested checkpoint run by
an outer recompute records into its own new region. A region with no record for a call (the
region's forward ran where no checkpoint could be seen, e.g. inside a user's own saved-tensor
hooks) re-routes with its side effects skipped and warns once.

Nothing here runs outside a checkpointed region: a plain forward computes what it did, and pays
three flag reads (:func:`_outside_any_checkpoint`) instead of the stack walk.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils import checkpoint as _ckpt

_TAPE_ATTR = "_moesaic_routes"


def _nested_code(fn, name: str) -> Optional[types.CodeType]:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return next((c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == name), None)


_HOOK_INIT = getattr(getattr(_ckpt, "_checkpoint_hook", None), "__init__", None)
_PACK_CODE = _nested_code(_HOOK_INIT, "pack_hook")          # non-reentrant forward: the frame's pack hook
_UNPACK_CODE = _nested_code(_HOOK_INIT, "unpack_hook")      # non-reentrant recompute runs inside it
_CKPT_FILE = getattr(_ckpt, "__file__", None)


@dataclass
class Decision:
    """One MoE call's routing decision: what a recompute reuses (all index tensors, no gradient)."""

    expert_ids_SK: Optional[Tensor]
    token_idx_N: Tensor
    expert_idx_N: Tensor
    slot_N: Tensor
    tokens_per_expert_E: Tensor
    exp_counts_E: Tensor
    capacity: Optional[int]
    num_routes: int
    num_valid_tokens: int

    @classmethod
    def of(cls, routing) -> "Decision":
        return cls(routing.expert_ids_SK, routing.token_idx_N, routing.expert_idx_N, routing.slot_N,
                   routing.tokens_per_expert_E, routing.exp_counts_E, routing.capacity, routing.num_routes,
                   routing.num_valid_tokens)


@dataclass
class Record:
    """What one MoE call in a checkpointed region leaves for its recompute."""

    layer: Any  # weakref to the MoE layer
    rng_before: Optional[Tuple] = None
    rng_after: Optional[Tuple] = None
    decision: Optional[Decision] = None
    peer_counts: Optional[List[List[int]]] = None  # the expert-parallel header's routes per peer expert


@dataclass
class _Tape:
    records: List[Record] = field(default_factory=list)
    cursor_key: Any = None
    cursor: int = 0


@dataclass
class Call:
    """The recompute state of the running MoE call (one per call, the outermost MoE module's)."""

    layer: Any
    record: Optional[Record] = None   # the record being replayed (recompute) or None
    recomputing: bool = False         # inside a recompute: no side effects
    sinks: List[Record] = field(default_factory=list)  # records being written (forward under a checkpoint)


_ACTIVE: contextvars.ContextVar[Optional[Call]] = contextvars.ContextVar("moesaic_moe_call", default=None)
_warned = [False]


def _is_ckpt_ctx(frame) -> Any:
    """The ``ctx`` of a reentrant ``CheckpointFunction`` (torch's, DeepSpeed's, Megatron's) forward/backward frame."""
    code = frame.f_code
    if code.co_name not in ("forward", "backward") or "ctx" not in code.co_varnames:
        return None
    ctx = frame.f_locals.get("ctx")
    return ctx if type(ctx).__name__ == "CheckpointFunctionBackward" else None


def _scan() -> Tuple[Optional[Tuple[Any, Any]], List[Any]]:
    """``(source, sinks)``: the innermost checkpoint region being recomputed (its key object and
    the id of this recompute pass) and the regions whose forward is running, innermost first."""
    sinks: List[Any] = []
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and _PACK_CODE is not None and getattr(hooks[0], "__code__", None) is _PACK_CODE:
        cell = dict(zip(_PACK_CODE.co_freevars, hooks[0].__closure__ or ())).get("frame")
        if cell is not None:
            sinks.append(cell.cell_contents)
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code is _UNPACK_CODE:
            ckpt_frame = frame.f_locals.get("frame")
            if ckpt_frame is not None:
                return (ckpt_frame, (id(frame), frame.f_locals.get("gid"))), sinks
        elif code.co_name == "checkpoint" and code.co_filename == _CKPT_FILE and "gen" in code.co_varnames:
            gen = frame.f_locals.get("gen")
            gen_frame = getattr(gen, "gi_frame", None)
            new_frame = gen_frame.f_locals.get("new_frame") if gen_frame is not None else None
            if new_frame is not None and not any(s is new_frame for s in sinks):
                sinks.append(new_frame)
        else:
            ctx = _is_ckpt_ctx(frame)
            if ctx is not None:
                if code.co_name == "backward":
                    return (ctx, (id(frame), torch._C._current_graph_task_id())), sinks
                if not any(s is ctx for s in sinks):
                    sinks.append(ctx)
        frame = frame.f_back
    return None, sinks


def _outside_any_checkpoint() -> bool:
    """A cheap sufficient test (three flag reads) that no checkpointed region runs, so :func:`_scan`,
    which walks the Python stack (~40 us at a transformers model's depth, per MoE call), is skipped
    in plain training: a non-reentrant region's forward and recompute run under its saved-tensor
    hooks; a reentrant region's forward runs without autograd (``CheckpointFunction.forward``) and its
    recompute inside a backward (a graph task)."""
    return (torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def _tape(owner) -> _Tape:
    tape = getattr(owner, _TAPE_ATTR, None)
    if tape is None:
        tape = _Tape()
        setattr(owner, _TAPE_ATTR, tape)
    return tape


def _rng_state(device: torch.device) -> Tuple:
    cpu = torch.get_rng_state()
    if device.type == "cuda":
        return cpu, device, torch.cuda.get_rng_state(device)
    return cpu, None, None


def _set_rng_state(state: Tuple) -> None:
    cpu, device, dev_state = state
    torch.set_rng_state(cpu)
    if device is not None:
        torch.cuda.set_rng_state(dev_state, device)


def _eager_under_compile(fn):
    """``torch.compiler.disable``, applied on the first call made after ``torch._dynamo`` was imported.

    The bookkeeping below inspects the Python stack and the saved-tensor hooks, so under
    ``torch.compile`` it runs eagerly (a graph break). Decorating at import time would import
    ``torch._dynamo`` with moesaic: seconds of start-up in every ``moesaic`` command and every rank. A
    process that has not imported Dynamo cannot be compiling, so until then the plain function runs.
    """
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not disabled:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


@_eager_under_compile
def begin(layer, device: torch.device) -> Tuple[Optional[Call], Any]:
    """Open the call of ``layer`` (a ``MixtureOfExperts``) unless one is open; returns ``(call, token)``.

    ``call`` is None outside any checkpointed region (the plain path, nothing recorded). A token
    that is not None must be passed to :func:`end`.
    """
    active = _ACTIVE.get()
    if active is not None and active.layer is layer:
        return active, None
    if not torch.is_grad_enabled() and not layer.training:
        return None, None  # evaluation without autograd: deterministic, nothing to recompute
    if _outside_any_checkpoint():
        return None, None
    source, sink_owners = _scan()
    if source is None and not sink_owners:
        return None, None
    call = Call(layer=layer)
    if source is not None:
        call.recomputing = True
        owner, pass_key = source
        tape = getattr(owner, _TAPE_ATTR, None)
        record = None
        if tape is not None:
            if tape.cursor_key != pass_key:
                tape.cursor_key, tape.cursor = pass_key, 0
            if tape.cursor < len(tape.records):
                record = tape.records[tape.cursor]
                if record.layer() is not layer:
                    raise RuntimeError(
                        f"moesaic recompute: the checkpointed region's MoE calls came in another order in its "
                        f"recompute (expected layer {getattr(record.layer(), 'expert_group_name', None)!r}, got "
                        f"{layer.expert_group_name!r}); a checkpointed function must call its MoE layers in the same "
                        "order every time it runs")
                tape.cursor += 1
        if record is None and not _warned[0]:
            _warned[0] = True
            warnings.warn(f"moesaic recompute: MoE layer {layer.expert_group_name!r} is recomputed but its first forward "
                          "left no routing record (it ran where no checkpoint could be seen, e.g. inside other "
                          "saved-tensor hooks); its routing is computed again, side effects skipped", stacklevel=3)
        call.record = record
        if record is not None and record.rng_before is not None:
            _set_rng_state(record.rng_before)
    if sink_owners:
        rng = call.record.rng_before if call.record is not None else _rng_state(device)
        new = Record(layer=weakref.ref(layer), rng_before=rng)
        if call.record is not None:
            new.decision, new.peer_counts = call.record.decision, call.record.peer_counts
        for owner in sink_owners:
            _tape(owner).records.append(new)
        call.sinks.append(new)
    return call, _ACTIVE.set(call)


@_eager_under_compile
def end(call: Optional[Call], token, device: torch.device) -> None:
    """Close a call opened by :func:`begin` (restores the RNG state the first forward left)."""
    if token is None:
        return
    _ACTIVE.reset(token)
    if call.record is not None and call.record.rng_after is not None:
        _set_rng_state(call.record.rng_after)
        after = call.record.rng_after
    else:
        after = _rng_state(device) if call.sinks else None
    for record in call.sinks:
        record.rng_after = after


@_eager_under_compile
def active(layer) -> Optional[Call]:
    """The open call of ``layer``, or None."""
    call = _ACTIVE.get()
    return call if call is not None and call.layer is layer else None


def _detached(t: Tensor) -> Tensor:
    return t.detach() if t.requires_grad else t  # (no reference cycle through an output's grad_fn)


def _as_saved(t: Tensor) -> Tensor:
    return t


def saved_plainly(fn):
    """Run ``fn`` with the tensors it saves for backward kept as they are, not handed to outer saved-tensor hooks.

    For the layer's side losses (``l_aux``, z-loss, sequence loss), which a caller may leave out of
    its loss (a ``transformers`` model computes its own balance loss from the router logits).
    Handed to a non-reentrant checkpoint, a saved tensor of a node that never runs in backward
    keeps the checkpoint's bookkeeping (and with it the region's inputs, e.g. a whole block's input)
    alive until the graph is freed, and ``layer.l_aux`` keeps that graph until the next forward: with
    every block checkpointed, each block's input lived to the end of backward and into the next
    step. The losses save only small tensors (`(E,)` counts; the `(S, E)` logits for a z-loss), so
    keeping them plainly costs little. The values and gradients are unchanged (the same operations);
    the first forward and its recompute both save them plainly, so a checkpoint sees the same
    tensors in both.
    """
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            return fn(*args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(_detached, _as_saved):
            return fn(*args, **kwargs)

    return call


def recorded_routes(routing) -> Tensor:
    """What ``moesaic.record_routing`` keeps of a forward's routing: the token-choice expert ids `(S, k)`,
    or, for expert-choice routing, each expert's picked tokens `(E, C)` (best first)."""
    if routing.expert_ids_SK is not None:
        return routing.expert_ids_SK.detach().clone()
    E = routing.tokens_per_expert_E.numel()
    return routing.token_idx_N.detach().reshape(E, -1).clone()


def _expert_choice_decision(layer, picks_EC: Tensor, num_tokens: int, device: torch.device) -> Decision:
    """Expert e takes the tokens ``picks_EC[e]`` (in that slot order): an expert-choice routing's decision."""
    E, C = picks_EC.shape
    if C > num_tokens or (picks_EC.numel() and int(picks_EC.max()) >= num_tokens):
        raise ValueError(f"replay_routing: MoE layer {layer.expert_group_name!r} got {num_tokens} tokens but its "
                         f"expert-choice routes (shape {tuple(picks_EC.shape)}) pick token ids up to "
                         f"{int(picks_EC.max()) if picks_EC.numel() else None}: the routes were recorded for another "
                         "batch")
    token_idx_N = picks_EC.to(device).reshape(-1)
    expert_idx_N = torch.arange(E, device=device).repeat_interleave(C)
    slot_N = torch.arange(C, device=device).repeat(E)
    per_expert = torch.full((E,), C, dtype=torch.int64, device=device)
    return Decision(None, token_idx_N, expert_idx_N, slot_N, per_expert, per_expert.clone(), C, E * C, num_tokens)


def replay_decision(layer, ids: Tensor, num_tokens: int, device: torch.device):
    """The :class:`~moesaic.layer.recompute.Decision` that replays ``ids`` (``layer``: an MoE layer): token-choice
    routes `(S, k)` send token t to ``ids[t]`` (dropless); expert-choice routes `(E, C)` give expert e the
    tokens ``ids[e]``."""
    from .routing import count_routes, place_routes  # routing.py imports nothing of this module

    if layer.gate.config.routing_type == "expert_choice":
        return _expert_choice_decision(layer, ids, num_tokens, device)
    if ids.shape[0] != num_tokens:
        raise ValueError(f"replay_routing: MoE layer {layer.expert_group_name!r} got {num_tokens} tokens but its routes "
                         f"have shape {tuple(ids.shape)}: the routes were recorded for another batch")
    ids = ids.to(device)
    E = layer.gate.config.num_experts
    exp_counts = count_routes(ids, E)
    placed = place_routes(ids, exp_counts, None, None)
    return Decision(ids, placed.token_idx_N, placed.expert_idx_N, placed.slot_N, placed.tokens_per_expert_E,
                    exp_counts, None, placed.num_routes, placed.num_routes // ids.shape[1])
