"""A mixed-precision optimizer that steps parameter groups one at a time.

The reason MoE parameter groups are capped in size (DeepSpeed issue 5064): only the group being
stepped needs its gradients in full precision. Model parameters live in bf16/fp16 (or fp32);
each group keeps an fp32 master copy and its optimizer state. ``step()`` walks the groups in
order and, for each: upcasts that group's gradients to fp32, applies the grad scale (loss-scale
unscaling and the clip coefficient), updates the master weights and state, writes them back into
the model's low-precision parameters, and releases both the fp32 gradients and the model's
gradients before moving on. The full-precision working set at any moment is one group.

Many small groups (per-expert groups of small experts) would each pay a loop iteration and a
handful of kernel launches; consecutive groups with identical hyperparameters are therefore
stepped together by one ``foreach`` call, up to ``fuse_elems`` elements, keeping their identity,
names and per-group statistics.

``offload="cpu"`` keeps master weights and optimizer state in CPU memory and brings one group's
gradients there at a time (on a CPU-only machine this is the same copy path, run on the CPU).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .config import OPTIMIZER_TYPES, optimizer_defaults
from .functional import adam_step, sgd_step

OPTIMIZERS = OPTIMIZER_TYPES
_HYPER = {"AdamW": ("lr", "betas", "eps", "weight_decay"), "Adam": ("lr", "betas", "eps", "weight_decay"),
          "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
FUSE_ELEMS_LIMIT = 1 << 19  # 512K elements (2 MiB in fp32): amortises launches over tiny groups, stays in cache


def default_fuse_elems(max_group_size: Optional[int]) -> int:
    """How many elements the engine fuses into one foreach call: the cap, at most 512K elements.

    Measured (benchmarks/bench_param_groups.py): fusing beyond a few MiB makes a CPU step slower,
    not faster, because the fp32 working set leaves the cache and fresh pages must be faulted in.
    """
    return FUSE_ELEMS_LIMIT if max_group_size is None else min(int(max_group_size), FUSE_ELEMS_LIMIT)


_DEFAULTS = {kind: optimizer_defaults(kind) for kind in OPTIMIZERS}  # the one place: optim/config.py


class GroupedMixedPrecisionOptimizer:
    """Group-by-group optimizer with fp32 master weights.

    Args:
        param_groups: dicts with ``params`` (model parameters) and optional hyperparameters,
            ``name`` and ``lr_scale`` (multiplies ``lr``; schedulers set ``lr`` only).
        optimizer: "AdamW", "Adam" or "SGD".
        defaults: hyperparameters for groups that do not set them.
        offload: "none" or "cpu" (master weights and state in CPU memory).
        fuse_elems: the most elements stepped by one fused call over consecutive groups; None
            steps every group on its own.
    """

    def __init__(self, param_groups: Sequence[Dict], optimizer: str = "AdamW", defaults: Optional[Dict] = None,
                 offload: str = "none", fuse_elems: Optional[int] = None) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        if offload not in ("none", "cpu"):
            raise ValueError(f"offload must be 'none' or 'cpu', got {offload!r}")
        if fuse_elems is not None and (isinstance(fuse_elems, bool) or not isinstance(fuse_elems, int)
                                       or fuse_elems < 1):
            raise ValueError(f"fuse_elems must be a positive int or None, got {fuse_elems!r}")
        if not isinstance(param_groups, (list, tuple)) or not param_groups:
            raise TypeError("param_groups must be a non-empty list of dicts with a 'params' entry")
        self.kind = optimizer
        self.defaults = {**_DEFAULTS[optimizer], **(defaults or {})}
        unknown = set(self.defaults) - set(_DEFAULTS[optimizer])
        if unknown:
            raise ValueError(f"unknown {optimizer} hyperparameters {sorted(unknown)}; "
                             f"allowed: {sorted(_DEFAULTS[optimizer])}")
        self.offload = offload
        self.fuse_elems = fuse_elems
        self.param_groups: List[Dict] = []
        seen = {}
        for gi, group in enumerate(param_groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"param_groups[{gi}] must be a dict with a 'params' entry, got {type(group).__name__}")
            params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
            for p in params:
                if not isinstance(p, Tensor):
                    raise TypeError(f"param_groups[{gi}]['params'] holds a {type(p).__name__}, not a Tensor")
                if id(p) in seen:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is in param groups {seen[id(p)]} "
                                     f"and {gi}; each parameter must be in exactly one group")
                seen[id(p)] = gi
            merged = {**self.defaults, **group, "params": params}
            merged.setdefault("name", f"group_{gi}")
            merged.setdefault("lr_scale", 1.0)
            self.param_groups.append(merged)
        self._where = {id(p): (gi, j) for gi, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])}
        self._master: List[Optional[List[Tensor]]] = [self._make_master(g["params"]) for g in self.param_groups]
        self.state: List[Dict] = [{"step": 0} for _ in self.param_groups]
        self.last_stats: Dict[str, Dict[str, float]] = {}
        self.peak_fp32_grad_elems = 0  # largest fp32 gradient working set of any step (elements)

    # --- master weights -------------------------------------------------------------------------
    def _needs_copy(self, p: Tensor) -> bool:
        return p.dtype != torch.float32 or (self.offload == "cpu" and p.device.type != "cpu")

    def _make_master(self, params: List[Tensor]) -> Optional[List[Tensor]]:
        if not any(self._needs_copy(p) for p in params):
            return None  # fp32 parameters on the master device are their own master copy
        device = "cpu" if self.offload == "cpu" else None
        return [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in params]

    def masters(self, gi: int) -> List[Tensor]:
        """fp32 master weights of group ``gi``."""
        m = self._master[gi]
        return m if m is not None else [p.detach() for p in self.param_groups[gi]["params"]]

    # --- stepping -------------------------------------------------------------------------------
    def _key(self, gi: int):
        g = self.param_groups[gi]
        return (g["lr"] * g["lr_scale"],) + tuple(
            tuple(g[h]) if isinstance(g[h], (list, tuple)) else g[h] for h in _HYPER[self.kind] if h != "lr"
        ) + (self.state[gi]["step"], self._master[gi] is None)

    def _batches(self) -> List[List[int]]:
        """Consecutive groups with equal hyperparameters, up to ``fuse_elems`` elements each."""
        batches: List[List[int]] = []
        size = 0
        for gi, g in enumerate(self.param_groups):
            n = sum(p.numel() for p in g["params"])
            if (batches and self.fuse_elems is not None and size + n <= self.fuse_elems
                    and self._key(batches[-1][0]) == self._key(gi)):
                batches[-1].append(gi)
                size += n
            else:
                batches.append([gi])
                size = n
        return batches

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0, want_stats: bool = False) -> None:
        """Update every group, one (fused) batch of groups at a time.

        Args:
            grad_scale: multiplies every gradient first (``clip_coef / loss_scale``).
            want_stats: record per-group grad norm, parameter norm and update/param ratio in
                ``last_stats`` (costs a few norms per group).
        """
        if not math.isfinite(grad_scale):
            raise ValueError(f"grad_scale must be finite, got {grad_scale}")
        self.last_stats = {}
        for batch in self._batches():
            self._step_batch(batch, grad_scale, want_stats)

    def _step_batch(self, batch: List[int], grad_scale: float, want_stats: bool) -> None:
        group = self.param_groups[batch[0]]
        owners, params, masters, grads32 = [], [], [], []
        for gi in batch:
            for p, m in zip(self.param_groups[gi]["params"], self.masters(gi)):
                if p.grad is None:
                    continue  # no gradient this step (frozen or unused): leave it untouched
                owners.append(gi)
                params.append(p)
                masters.append(m)
                g = p.grad
                grads32.append(g if (g.dtype == torch.float32 and g.device == m.device) else
                               g.to(device=m.device, dtype=torch.float32))
        if not params:
            return
        self.peak_fp32_grad_elems = max(self.peak_fp32_grad_elems,
                                        sum(g.numel() for g, p in zip(grads32, params) if g is not p.grad))
        if grad_scale != 1.0:
            torch._foreach_mul_(grads32, grad_scale)
        grad_norms = torch._foreach_norm(grads32) if want_stats else None
        states = [self._param_state(gi, p, m) for gi, p, m in zip(owners, params, masters)]
        step = self.state[batch[0]]["step"] + 1
        lr = group["lr"] * group["lr_scale"]
        if self.kind == "SGD":
            bufs = [s.get("momentum_buffer") for s in states]
            update = sgd_step(masters, grads32, bufs, lr=lr, momentum=group["momentum"],
                              dampening=group["dampening"], weight_decay=group["weight_decay"],
                              nesterov=group["nesterov"], want_update=want_stats)
            for s, b in zip(states, bufs):
                if b is not None:
                    s["momentum_buffer"] = b
        else:
            beta1, beta2 = group["betas"]
            update = adam_step(masters, grads32, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                               step=step, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                               weight_decay=group["weight_decay"], decoupled=self.kind == "AdamW",
                               want_update=want_stats, grads_are_scratch=True)
        for gi in batch:
            self.state[gi]["step"] = step
        if want_stats:
            self._record_stats(owners, grad_norms, masters, update)
        # write the new weights into the model (a cast for bf16/fp16, a copy for offload)
        for p, m in zip(params, masters):
            if m is not p and m.data_ptr() != p.data_ptr():
                p.copy_(m)
        del grads32  # release this group's fp32 gradients before the next group
        for p in params:
            p.grad = None

    def _param_state(self, gi: int, p: Tensor, master: Tensor) -> Dict:
        per_param = self.state[gi].setdefault("per_param", {})
        s = per_param.get(id(p))
        if s is None:
            s = {}
            if self.kind != "SGD":
                s["exp_avg"] = torch.zeros_like(master)
                s["exp_avg_sq"] = torch.zeros_like(master)
            per_param[id(p)] = s
        return s

    def _record_stats(self, owners, g_n, masters, update) -> None:
        p_n = torch._foreach_norm(masters)
        u_n = torch._foreach_norm(update)
        acc: Dict[int, List[float]] = {}
        for gi, a, b, c in zip(owners, g_n, p_n, u_n):
            s = acc.setdefault(gi, [0.0, 0.0, 0.0])
            s[0] += float(a) ** 2
            s[1] += float(b) ** 2
            s[2] += float(c) ** 2
        for gi, (g2, p2, u2) in acc.items():
            pn = math.sqrt(p2)
            self.last_stats[self.param_groups[gi]["name"]] = {
                "grad_norm": math.sqrt(g2), "param_norm": pn, "update_ratio": math.sqrt(u2) / pn if pn > 0 else 0.0}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the model gradients of every group."""
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    # --- state ----------------------------------------------------------------------------------
    def _locate(self, p: Tensor):
        """(group, position) of a parameter: a dict lookup, so per-parameter checkpointing stays linear."""
        where = self._where.get(id(p))
        if where is None:
            raise KeyError("parameter is not in this optimizer")
        return where

    def param_state(self, p: Tensor) -> Dict[str, Tensor]:
        """The state of one parameter: moments, fp32 master (if separate) and its group's step."""
        gi, j = self._locate(p)
        out = {k: v for k, v in self.state[gi].get("per_param", {}).get(id(p), {}).items() if isinstance(v, Tensor)}
        if self._master[gi] is not None:
            out["master"] = self._master[gi][j]
        out["step"] = torch.tensor(self.state[gi]["step"], dtype=torch.int64)
        return out

    def set_param_state(self, p: Tensor, state: Dict[str, Tensor]) -> None:
        """Restore what :meth:`param_state` returned (shapes are checked by the caller)."""
        gi, j = self._locate(p)
        self.state[gi]["step"] = int(state["step"])
        per = {k: v.to(self.masters(gi)[j].device, torch.float32).clone() for k, v in state.items()
               if k not in ("step", "master")}
        if per:
            self.state[gi].setdefault("per_param", {})[id(p)] = per
        if "master" in state and self._master[gi] is not None:
            self._master[gi][j].copy_(state["master"])
        elif self._master[gi] is not None:
            self._master[gi][j].copy_(p.detach())

    def state_dict(self) -> Dict:
        """Hyperparameters, steps, moments and master weights per group, keyed by group name."""
        groups = []
        for gi, g in enumerate(self.param_groups):
            per_param = self.state[gi].get("per_param", {})
            tensors = {}
            for j, (p, m) in enumerate(zip(g["params"], self.masters(gi))):
                s = per_param.get(id(p), {})
                tensors[j] = {k: v for k, v in s.items() if isinstance(v, Tensor)}
                if self._master[gi] is not None:
                    tensors[j]["master"] = m
            groups.append({"name": g["name"], "step": self.state[gi]["step"],
                           "hyper": {k: v for k, v in g.items() if k != "params"}, "tensors": tensors})
        return {"kind": self.kind, "groups": groups}

    def load_state_dict(self, state: Dict) -> None:
        """Restore from :meth:`state_dict`; group names and tensor shapes must match."""
        if state.get("kind") != self.kind:
            raise ValueError(f"optimizer state is for {state.get('kind')!r}, this optimizer is {self.kind!r}")
        names = [g["name"] for g in self.param_groups]
        saved = [g["name"] for g in state["groups"]]
        if saved != names:
            raise ValueError(f"optimizer state holds groups {saved[:5]}... but this optimizer has {names[:5]}...")
        for gi, sg in enumerate(state["groups"]):
            params = self.param_groups[gi]["params"]
            for j, tensors in sg["tensors"].items():
                p = params[int(j)]
                for k, v in tensors.items():
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(f"group {sg['name']!r} tensor {j} {k}: shape {tuple(v.shape)} != "
                                         f"{tuple(p.shape)}")
            self.state[gi] = {"step": sg["step"], "per_param": {}}
            for j, tensors in sg["tensors"].items():
                p = params[int(j)]
                per = {k: v.clone() for k, v in tensors.items() if k != "master"}
                if per:
                    self.state[gi]["per_param"][id(p)] = per
                if "master" in tensors and self._master[gi] is not None:
                    self._master[gi][int(j)].copy_(tensors["master"])
            self.param_groups[gi].update({k: v for k, v in sg["hyper"].items() if k not in ("params", "name")})
