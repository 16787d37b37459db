"""A client optimizer, as DeepSpeed's ``initialize(optimizer=...)`` takes it, run as moesaic's grouped optimizer.

The engine builder follows it through :class:`moesaic.engine.GroupFollower` (``param_groups``, ``link``, ``sync``).

moesaic never calls the client optimizer's ``step()``: it reads the update and every parameter
group from it and steps its own :class:`~moesaic.optim.mixed_precision.GroupedMixedPrecisionOptimizer`
(fp32 master weights, one group at a time, ZeRO sharding). What is honoured:

* **the update**: ``torch.optim.AdamW`` -> AdamW; ``torch.optim.Adam`` -> Adam (L2 weight decay),
  or AdamW with ``decoupled_weight_decay=True``; ``torch.optim.SGD`` -> SGD; DeepSpeed's
  ``FusedAdam`` and ``DeepSpeedCPUAdam`` -> AdamW or Adam as their ``adam_w_mode``/``adamw_mode``
  say (recognised by class, without importing DeepSpeed);
* **every parameter group**: its parameters and ``lr``, ``betas``, ``eps``, ``weight_decay``
  (Adam, AdamW) or ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov`` (SGD), its
  ``name`` and any key of the user's own; a group becomes one or more of moesaic's groups (its
  experts split out per expert or per layer, its dense part capped by ``moe.max_group_size``),
  never mixed with another client group. Groups already split by
  ``split_params_into_different_moe_groups_for_optimizer`` (DeepSpeed's or moesaic's) are split
  again by moesaic's identity, keeping their hyperparameters;
* **later changes**: a hyperparameter that a client scheduler, or the user, changes on a client
  group reaches moesaic's groups made from it before the next step (:meth:`ClientOptimizer.sync`).

Refused with a message naming the class or the key: any other optimizer class (moesaic would
have to run it as-is, without fp32 master weights or sharding); ``amsgrad``, ``maximize`` or
``differentiable`` set to true, ``bias_correction`` false; an optimizer that already holds state.
Keys that only choose torch's kernel (``foreach``, ``fused``, ``capturable``) have no meaning for
moesaic's own implementation and are dropped.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..optim.build_groups import IDENTITY_KEYS
from ..optim.config import UPDATE_HYPERPARAMETERS

SUPPORTED = ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD", "deepspeed.ops.adam.FusedAdam",
             "deepspeed.ops.adam.DeepSpeedCPUAdam")
_KERNEL_KEYS = ("foreach", "fused", "capturable", "set_grad_none", "initial_lr", "decoupled_weight_decay",
                "adam_w_mode", "adamw_mode")
_REFUSED_FLAGS = {"amsgrad": (True, "moesaic's Adam has no AMSGrad variant"),
                  "maximize": (True, "moesaic minimises"),
                  "differentiable": (True, "moesaic's step is not differentiable"),
                  "bias_correction": (False, "moesaic's Adam always applies bias correction")}


def class_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _deepspeed_class(opt: Any, name: str) -> bool:
    t = type(opt)
    return t.__name__ == name and t.__module__.startswith("deepspeed.")


def client_update(opt: Any) -> Optional[str]:
    """The update moesaic runs for client optimizer ``opt`` ("AdamW", "Adam", "SGD"), or None when it has none."""
    t = type(opt)
    if t is torch.optim.AdamW:
        return "AdamW"
    if t is torch.optim.Adam:
        decoupled = {bool(g.get("decoupled_weight_decay", False)) for g in opt.param_groups}
        if len(decoupled) > 1:
            return None  # one update per optimizer
        return "AdamW" if decoupled.pop() else "Adam"
    if t is torch.optim.SGD:
        return "SGD"
    if _deepspeed_class(opt, "FusedAdam"):
        return "AdamW" if getattr(opt, "adam_w_mode", True) else "Adam"
    if _deepspeed_class(opt, "DeepSpeedCPUAdam"):
        return "AdamW" if getattr(opt, "adamw_mode", True) else "Adam"
    return None


def unsupported_message(opt: Any, stage: int) -> str:
    """Why client optimizer ``opt`` is refused, naming the ZeRO stage when sharding was asked."""
    what = (f"zero_optimization.stage={stage} cannot shard {class_name(opt)} (whatever "
            f"zero_allow_untested_optimizer says)" if stage >= 1 else f"moesaic cannot run {class_name(opt)}")
    return (f"optimizer: {what}: moesaic steps its own grouped Adam, AdamW and SGD (one parameter group at a "
            f"time, fp32 master weights, ZeRO sharding) and runs no other optimizer as-is; allowed client "
            f"optimizers: {', '.join(SUPPORTED)}; or leave optimizer=None and set the config's optimizer.type")


class ClientOptimizer:
    """The client optimizer's update and groups, and the link that keeps moesaic's groups following them.

    Args:
        opt: the client optimizer (an instance of one of :data:`SUPPORTED`).
        stage: the ZeRO stage asked, for the message when ``opt`` cannot be run.
    """

    def __init__(self, opt: Any, stage: int = 0) -> None:
        if not isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "param_groups"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable returning one, got "
                            f"{class_name(opt)}")
        kind = client_update(opt)
        if kind is None:
            raise ValueError(unsupported_message(opt, stage))
        if any(len(s) for s in getattr(opt, "state", {}).values()):
            raise ValueError(f"optimizer: the client {class_name(opt)} already holds state (it has stepped); moesaic "
                             "builds fresh state from its groups. Pass a fresh optimizer, and restore state with "
                             "engine.load_checkpoint")
        self.opt = opt
        self.kind = kind
        self.hyper = UPDATE_HYPERPARAMETERS[kind]
        for i, group in enumerate(opt.param_groups):
            for key, (bad, why) in _REFUSED_FLAGS.items():
                if key in group and bool(group[key]) is bad:
                    raise ValueError(f"optimizer.param_groups[{i}]['{key}']={group[key]!r} is not supported by "
                                     f"moesaic: {why}")
            missing = [k for k in self.hyper if k not in group]
            if missing:
                raise ValueError(f"optimizer.param_groups[{i}] of {class_name(opt)} has no {missing}; moesaic's "
                                 f"{kind} reads {list(self.hyper)}")
        self._seen: List[Dict[str, Any]] = [self._values(g) for g in opt.param_groups]
        self._sources: List[int] = []

    def _values(self, group: Dict[str, Any]) -> Dict[str, Any]:
        out = {}
        for k in self.hyper:
            v = group[k]
            if isinstance(v, Tensor):
                v = v.item() if v.numel() == 1 else tuple(float(x) for x in v.tolist())
            elif isinstance(v, (list, tuple)):
                v = tuple(float(x.item() if isinstance(x, Tensor) else x) for x in v)
            out[k] = v
        return out

    def base_groups(self) -> List[Dict[str, Any]]:
        """One group dict per client group with parameters: its hyperparameters, its own keys and a root name.

        MoE groups made by the split helpers are given back their base name (moesaic's helper names
        them ``"<base>/<layer>/expert_<n>"``; DeepSpeed's call them after the layer's group name),
        so moesaic's groups made from them read ``"<base>/<layer>/expert_<n>"``.
        """
        out = []
        for i, group in enumerate(self.opt.param_groups):
            params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
            if not params:
                continue
            name = group.get("name")
            name = f"group_{i}" if name is None else str(name)
            layer = group.get("expert_group_name")
            if group.get("moe") and isinstance(layer, str) and f"/{layer}" in name:
                name = name[:name.index(f"/{layer}")]
            extra = {k: v for k, v in group.items() if k not in IDENTITY_KEYS and k not in _KERNEL_KEYS
                     and k not in self.hyper and k not in _REFUSED_FLAGS}
            out.append({**extra, **self._values(group), "name": name, "params": params, "client_group": i})
        return out

    def param_groups(self, moe) -> List[Dict[str, Any]]:
        """The groups the engine builds from (:class:`moesaic.engine.GroupFollower`): :meth:`base_groups`, each
        split on its own by the engine's group builder under ``moe`` (an ``MoEOptimConfig``)."""
        return self.base_groups()

    def link(self, param_groups: Sequence[Dict[str, Any]]) -> None:
        """Remember which client group each of moesaic's groups came from (``client_group``, then dropped)."""
        self._sources = []
        for g in param_groups:
            self._sources.append(g.pop("client_group"))

    def sync(self, param_groups: Sequence[Dict[str, Any]]) -> None:
        """Copy to moesaic's groups each client hyperparameter changed since the last call (scheduler steps).

        A hyperparameter set on moesaic's groups directly stays until its client group changes it.
        """
        for i, group in enumerate(self.opt.param_groups):
            now = self._values(group)
            changed = {k: v for k, v in now.items() if not _equal(v, self._seen[i].get(k))}
            if not changed:
                continue
            self._seen[i] = now
            for gi, src in enumerate(self._sources):
                if src == i:
                    param_groups[gi].update(changed)
        # torch's LR schedulers warn when they step before their optimizer did; moesaic steps for it
        self.opt._opt_called = True


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b

