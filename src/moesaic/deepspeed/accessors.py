"""A parameter's full gradient, fp32 weights and optimizer state, wherever ZeRO keeps them.

DeepSpeed's ``safe_get_full_grad``, ``safe_get_full_fp32_param`` and
``safe_get_full_optimizer_state`` under moesaic's sharding: a group's fp32 master weights and
optimizer state (stages 1-2) and its reduced gradient (stage 2) live on the group's owner only.
Each call returns the whole tensor on every rank of the parameter's replica group (the owner
broadcasts it), so every rank of that group must make the same calls in the same order, as with
DeepSpeed's. At stage 3 the parameters are FSDP2's fp32 ``DTensor`` shards: each call gathers
the tensor (``full_tensor``) over the parameter's mesh (the world, or its expert-data-parallel
ranks for an expert).

:func:`link` gives every optimised parameter DeepSpeed's accessor protocol
(``_hp_mapping``, ``get_full_hp_grad()``, ``get_full_hp_param(optim_state_key=None)``), so
``deepspeed.utils.safe_get_full_*`` work on a moesaic engine's parameters too; at stage 2 the
parameters also carry ``_hp_grad`` (a marker, never a tensor) so that DeepSpeed's
``safe_get_full_grad`` asks the owner on every rank instead of returning a local ``.grad`` on one
rank and making a collective call on the others.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


class _Sharded:
    """Marker set as ``param._hp_grad`` at stage 2: the reduced gradient lives on the owner rank."""

    def __repr__(self) -> str:
        return "<gradient held by its owner rank (moesaic ZeRO-2)>"


SHARDED_GRAD = _Sharded()


def _engine_of(param: Tensor):
    link = getattr(param, "_hp_mapping", None)
    engine = link() if isinstance(link, weakref.ReferenceType) else None
    if engine is None:
        raise ValueError(f"the parameter of shape {tuple(param.shape)} is not optimised by a live moesaic engine")
    return engine


def _gather(engine, param: Tensor, read) -> Optional[Tensor]:
    """The whole tensor for ``param``: each of its refs read on its group's owner and broadcast to the replicas."""
    opt, plan = engine.optimizer, engine.optimizer.shard
    refs = engine.index.refs_of(param)
    out = torch.empty(param.shape, dtype=torch.float32, device=param.device)
    found = False
    for ref in refs:
        where = opt._by_name.get(ref.name)
        if where is None:
            continue  # not optimised (frozen)
        found = True
        gi = where[0]
        target = out if ref.index is None else out[ref.index]
        if opt.steps_group(gi) or plan.owns(gi) or plan.stage == 0:
            value = read(ref)
            if value is None:
                target.zero_()
            else:
                target.copy_(value)
        group = plan.replica[gi].group
        if plan.stage > 0 and group is not False and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(target, plan.owner[gi], group=group)
    return out if found else None


def _full(t: Optional[Tensor]) -> Optional[Tensor]:
    """Stage 3: the whole tensor of a DTensor shard (collective over its mesh), as fp32."""
    if t is None:
        return None
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float()


def _zero3_state(engine, param: Tensor, key: str) -> Tensor:
    state = engine.optimizer.state.get(param, {})
    if key not in state:
        raise KeyError(f"no optimizer state {key!r} for this parameter; {engine.optimizer.kind} keeps "
                       f"{sorted(k for k in state if k != 'step')}")
    return _full(state[key])


def full_grad(param: Tensor) -> Optional[Tensor]:
    """The reduced fp32 gradient of ``param`` (None when it is not optimised); collective at stages 2-3."""
    engine = _engine_of(param)
    if engine.zero_optimization_stage() == 3:
        return _full(param.grad)
    if engine.zero_optimization_stage() < 2:
        return param.grad
    return _gather(engine, param, lambda ref: ref.grad)


def full_fp32_param(param: Tensor, optim_state_key: Optional[str] = None) -> Optional[Tensor]:
    """The fp32 master weights of ``param``, or its optimizer state ``optim_state_key``; collective at stages 1-3."""
    engine = _engine_of(param)
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:  # the parameters are the fp32 masters, sharded
        return _full(param.detach()) if optim_state_key is None else _zero3_state(engine, param, optim_state_key)

    def read(ref):
        if optim_state_key is None:
            return opt.master(ref)
        state = opt._state.get(ref.name, {})
        if optim_state_key not in state:
            raise KeyError(f"no optimizer state {optim_state_key!r} for {ref.name!r}; {opt.kind} keeps "
                           f"{sorted(k for k in state if k != 'step')}")
        return state[optim_state_key]

    return _gather(engine, param, read)


def safe_get_full_grad(param: Tensor) -> Optional[Tensor]:
    """DeepSpeed's ``safe_get_full_grad`` for a moesaic engine's parameter (see module docstring)."""
    return full_grad(param)


def safe_get_full_fp32_param(param: Tensor) -> Optional[Tensor]:
    """DeepSpeed's ``safe_get_full_fp32_param`` for a moesaic engine's parameter."""
    return full_fp32_param(param)


def safe_get_full_optimizer_state(param: Tensor, optim_state_key: str) -> Optional[Tensor]:
    """DeepSpeed's ``safe_get_full_optimizer_state`` for a moesaic engine's parameter (``"exp_avg"`` ...)."""
    return full_fp32_param(param, optim_state_key)


def link(engine) -> None:
    """Give every parameter ``engine`` optimises DeepSpeed's accessor protocol (see module docstring)."""
    ref = weakref.ref(engine)
    stage = engine.zero_optimization_stage()
    done = set()
    optimised = {id(p) for p in engine.optimizer.params()} if stage == 3 else None
    for r in engine.index:
        param = r.param
        if stage == 3:
            if id(param) not in optimised or id(param) in done:
                continue
        elif r.name not in engine.optimizer._by_name or id(param) in done:
            continue  # not optimised (frozen), or a stacked parameter already linked
        done.add(id(param))
        param._hp_mapping = ref
        param.get_full_hp_grad = functools.partial(full_grad, param)
        param.get_full_hp_param = functools.partial(full_fp32_param, param)
        if stage >= 2:
            param._hp_grad = SHARDED_GRAD
        elif getattr(param, "_hp_grad", None) is SHARDED_GRAD:
            del param._hp_grad
