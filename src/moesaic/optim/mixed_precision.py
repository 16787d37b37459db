"""A mixed-precision optimizer that steps parameter groups one at a time, its state keyed by identity.

The reason MoE parameter groups are capped in size (DeepSpeed issue 5064): only the group being
stepped needs its gradients in full precision. Model parameters live in bf16/fp16 (or fp32);
each tensor keeps an fp32 master copy and its optimizer state. ``step()`` walks the groups in
order and, for each: upcasts that group's gradients to fp32, applies the grad scale (loss-scale
unscaling and the clip coefficient), updates the master weights and state, writes them back into
the model's low-precision parameters, and releases both the fp32 gradients and the model's
gradients before moving on. The full-precision working set at any moment is one group.

Many small groups (per-expert groups of small experts) would each pay a loop iteration and a
handful of kernel launches; consecutive groups with identical hyperparameters are therefore
stepped together by one ``foreach`` call, up to ``fuse_elems`` elements, keeping their identity,
names and per-group statistics.

State is addressed by identity, never by ``id()`` or position: every tensor the optimizer steps
is a :class:`~moesaic.layer.identity.ParamRef` with a stable name (a dense parameter's model name,
an expert tensor's ``"<layer>/<number>/<name>"``), so :meth:`state_dict` / :meth:`load_state_dict`
(the shape of torch.distributed.checkpoint's ``Stateful`` protocol) move state between runs of
different world sizes and expert-parallel layouts. The step counter is kept per tensor, as in
``torch.optim``: a tensor that received no gradient is not stepped and its count stays.

The class is a :class:`torch.optim.Optimizer`, so torch's LR schedulers drive its groups' ``lr``
and code that checks for an optimizer accepts it; ``state`` maps each tensor of ``param_groups``
to its state dict (``step``, moments), as in ``torch.optim``.

``offload="cpu"`` keeps master weights and optimizer state in CPU memory and brings one group's
gradients there at a time (on a CPU-only machine this is the same copy path, run on the CPU).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..layer.identity import ExpertIndex, ParamRef
from .._checks import check_bool, check_list, check_number
from .build_groups import IDENTITY_KEYS, saved_settings
from .config import OPTIMIZER_TYPES, UPDATE_HYPERPARAMETERS, optimizer_defaults
from .functional import adam_step, sgd_step
from .sharding import ShardPlan

OPTIMIZERS = OPTIMIZER_TYPES
_MOMENTS = {"AdamW": ("exp_avg", "exp_avg_sq"), "Adam": ("exp_avg", "exp_avg_sq"), "SGD": ()}
_OPTIONAL_STATE = {"SGD": ("momentum_buffer",)}  # made at the first step with momentum
FUSE_ELEMS_LIMIT = 1 << 19  # 512K elements (2 MiB in fp32): amortises launches over tiny groups, stays in cache


def check_state_entry(name: str, entry: Any, kind: str) -> Dict[str, Any]:
    """A saved optimizer-state entry of tensor ``name`` holds ``step`` and the moments ``kind`` keeps
    (the same rule at every ZeRO stage); returns it."""
    if entry is None:
        raise ValueError(f"the optimizer state has no entry for tensor {name!r}")
    if "step" not in entry:
        raise ValueError(f"the optimizer state of {name!r} has no 'step'")
    for key in _MOMENTS[kind]:
        if key not in entry:
            raise ValueError(f"the optimizer state of {name!r} has no {key!r} ({kind} keeps {list(_MOMENTS[kind])})")
    return entry


def default_fuse_elems(max_group_size: Optional[int]) -> int:
    """How many elements the engine fuses into one foreach call: the cap, at most 512K elements.

    Measured (benchmarks/bench_param_groups.py): fusing beyond a few MiB makes a CPU step slower,
    not faster, because the fp32 working set leaves the cache and fresh pages must be faulted in.
    """
    return FUSE_ELEMS_LIMIT if max_group_size is None else min(int(max_group_size), FUSE_ELEMS_LIMIT)


_DEFAULTS = {kind: optimizer_defaults(kind) for kind in OPTIMIZERS}  # the one place: optim/config.py


def _refs_of_group(group: Mapping, gi: int, index: Optional[ExpertIndex]) -> List[ParamRef]:
    """A group's tensors as refs: named by the index, or by group name and position without one."""
    refs = []
    for j, p in enumerate(group["params"]):
        if isinstance(p, ParamRef):
            refs.append(p)
        elif not isinstance(p, Tensor):
            raise TypeError(f"param_groups[{gi}]['params'][{j}] must be a Tensor or a ParamRef, got {type(p).__name__}")
        elif index is not None and p in index:
            refs.append(index.ref_of(p))
        elif index is not None:
            raise ValueError(f"param_groups[{gi}]['params'][{j}] (shape {tuple(p.shape)}) is not a parameter of the "
                             "indexed model")
        else:
            refs.append(ParamRef(f"{group['name']}/{j}", p))
    return refs


def _nonneg(value: Any, key: str) -> float:
    return check_number(value, key, lo=0.0)


def _beta(value: Any, key: str) -> float:
    return check_number(value, key, lo=0.0, hi=1.0, hi_open=True)


#: How a saved group setting is checked before it replaces a live one (torch.optim's own ranges).
_SETTING_CHECKS = {
    "lr": _nonneg, "eps": _nonneg, "weight_decay": _nonneg, "momentum": _nonneg, "lr_scale": _nonneg,
    "dampening": check_number, "nesterov": check_bool,
    "betas": lambda v, k: check_list(v, k, _beta, length=2, what="2 numbers in [0, 1)"),
}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def check_group_settings(groups: Any, live: Sequence[Mapping[str, Any]] = ()) -> None:
    """Saved per-group settings (``state_dict()["param_groups"]``) by type and range, before any is applied.

    Known hyperparameters are checked as ``torch.optim`` ranges them (``lr``, ``eps``,
    ``weight_decay``, ``momentum``, ``lr_scale`` finite and >= 0; ``betas`` two numbers in [0, 1);
    ``nesterov`` a bool); any other key that a live group of the same name holds (a client
    group's own key, torch's ``initial_lr``) must hold the same kind of value.

    Raises:
        TypeError / ValueError: naming ``param_groups[i].key`` and the group.
    """
    if not isinstance(groups, (list, tuple)):
        raise TypeError(f"param_groups must be a list of group settings, got {type(groups).__name__}")
    by_name = {g.get("name"): g for g in live}
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping):
            raise TypeError(f"param_groups[{i}] must be a mapping, got {type(g).__name__}")
        name = g.get("name")
        if not isinstance(name, str):
            raise TypeError(f"param_groups[{i}].name must be a str, got {type(name).__name__}: {name!r}")
        current = by_name.get(name, {})
        for key, value in g.items():
            if key in IDENTITY_KEYS:
                continue
            where = f"param_groups[{i}].{key} (group {name!r})"
            check = _SETTING_CHECKS.get(key)
            if check is not None:
                check(value, where)
            elif key in current and _json_kind(value) != _json_kind(current[key]):
                raise TypeError(f"{where} must be a {_json_kind(current[key])} like this optimizer's, got "
                                f"{type(value).__name__}: {value!r}")


class GroupedMixedPrecisionOptimizer(torch.optim.Optimizer):
    """Group-by-group optimizer with fp32 master weights, state keyed by tensor identity.

    Args:
        param_groups: dicts with ``params`` (model parameters, or :class:`ParamRef` for one
            expert's slice of a stacked parameter) and optional hyperparameters, ``name`` (unique)
            and ``lr_scale`` (multiplies ``lr``; schedulers set ``lr`` only).
        optimizer: "AdamW", "Adam" or "SGD".
        defaults: hyperparameters for groups that do not set them.
        offload: "none" or "cpu" (master weights and state in CPU memory).
        fuse_elems: the most elements stepped by one fused call over consecutive groups; None
            steps every group on its own.
        index: the model's :class:`ExpertIndex`; names every tensor by identity. Without it,
            tensors are called ``"<group name>/<position>"`` (state then moves only between
            optimizers built from the same groups).
        shard: a :class:`~moesaic.optim.sharding.ShardPlan` for these groups (ZeRO-1/2: only the
            groups this rank owns get master weights and state and are stepped here); None
            steps every group.
    """

    def __init__(self, param_groups: Sequence[Dict], optimizer: str = "AdamW", defaults: Optional[Dict] = None,
                 offload: str = "none", fuse_elems: Optional[int] = None,
                 index: Optional[ExpertIndex] = None, shard: Optional[ShardPlan] = None) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        if offload not in ("none", "cpu"):
            raise ValueError(f"offload must be 'none' or 'cpu', got {offload!r}")
        if fuse_elems is not None and (isinstance(fuse_elems, bool) or not isinstance(fuse_elems, int)
                                       or fuse_elems < 1):
            raise ValueError(f"fuse_elems must be a positive int or None, got {fuse_elems!r}")
        if not isinstance(param_groups, (list, tuple)) or not param_groups:
            raise TypeError("param_groups must be a non-empty list of dicts with a 'params' entry")
        if index is not None and not isinstance(index, ExpertIndex):
            raise TypeError(f"index must be an ExpertIndex or None, got {type(index).__name__}")
        self.kind = optimizer
        self.defaults = {**_DEFAULTS[optimizer], **(defaults or {})}
        unknown = set(self.defaults) - set(_DEFAULTS[optimizer])
        if unknown:
            raise ValueError(f"unknown {optimizer} hyperparameters {sorted(unknown)}; "
                             f"allowed: {sorted(_DEFAULTS[optimizer])}")
        self.offload = offload
        self.fuse_elems = fuse_elems
        self.param_groups: List[Dict] = []
        self._refs: List[List[ParamRef]] = []
        seen: Dict[Tuple[int, Optional[int]], int] = {}
        names_seen: Dict[str, int] = {}
        names: Dict[str, int] = {}
        for gi, group in enumerate(param_groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"param_groups[{gi}] must be a dict with a 'params' entry, got {type(group).__name__}")
            params = [group["params"]] if isinstance(group["params"], (Tensor, ParamRef)) else list(group["params"])
            merged = {**self.defaults, **group, "params": params}
            merged.setdefault("name", f"group_{gi}")
            merged.setdefault("lr_scale", 1.0)
            if merged["name"] in names:
                raise ValueError(f"param_groups[{names[merged['name']]}] and param_groups[{gi}] are both named "
                                 f"{merged['name']!r}; group names must be unique (state and learning rates are "
                                 "restored by name)")
            names[merged["name"]] = gi
            refs = _refs_of_group(merged, gi, index)
            for ref in refs:
                where = (id(ref.param), ref.index)
                if where in seen or ref.name in names_seen:
                    first = seen.get(where, names_seen.get(ref.name))
                    raise ValueError(f"a parameter of shape {tuple(ref.shape)} ({ref.name!r}) is in param groups "
                                     f"{first} and {gi}; each parameter must be in exactly one group")
                seen[where] = gi
                names_seen[ref.name] = gi
            merged["params"] = [r.param if r.index is None else r.data for r in refs]
            self.param_groups.append(merged)
            self._refs.append(refs)
        self._by_name: Dict[str, Tuple[int, int]] = {r.name: (gi, j) for gi, refs in enumerate(self._refs)
                                                     for j, r in enumerate(refs)}
        self._ref_count: Dict[int, int] = {}  # refs per parameter (several for a stacked one)
        for refs in self._refs:
            for r in refs:
                self._ref_count[id(r.param)] = self._ref_count.get(id(r.param), 0) + 1
        if shard is not None and len(shard.owner) != len(self.param_groups):
            raise ValueError(f"shard plans {len(shard.owner)} groups but there are {len(self.param_groups)}")
        self.shard = shard
        self._master: Dict[str, Tensor] = {}
        self._state: Dict[str, Dict[str, Any]] = {}
        for gi, refs in enumerate(self._refs):
            if self.steps_group(gi):
                for r in refs:
                    self._init_state(r)
        self.last_stats: Dict[str, Dict[str, float]] = {}
        self.peak_fp32_grad_elems = 0  # largest fp32 gradient working set of any step (elements)
        self._init_torch_optimizer()

    def _init_torch_optimizer(self) -> None:
        """What ``torch.optim.Optimizer``'s own methods (hooks, profiling) and torch's LR schedulers read.

        Its ``__init__`` is not called: it would rebuild ``param_groups`` and refuse the views that
        stand for one expert's slice of a stacked parameter.
        """
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    @property
    def state(self) -> Dict[Tensor, Dict[str, Any]]:
        """``{tensor of param_groups: its state}`` (``step``, moments) for the groups this rank steps, in group
        order, as ``torch.optim.Optimizer.state`` (the dicts are the live ones)."""
        out: Dict[Tensor, Dict[str, Any]] = {}
        for gi, group in enumerate(self.param_groups):
            for p, r in zip(group["params"], self._refs[gi]):
                if r.name in self._state:
                    out[p] = self._state[r.name]
        return out

    cur_scale = 1.0  # the loss scale of the step being taken (set by the step pipeline)
    clip_grad = 0.0  # the clipping threshold of the global norm (set by the step pipeline; 0: none)

    def unscale_and_clip_grads(self, total_norm: float, apply_scale: bool = True) -> float:
        """The divisor of every gradient before the update: the loss scale times the clip ratio (DeepSpeed's hook).

        Args:
            total_norm: the global norm of the (loss-scaled) gradients.
            apply_scale: also divide this rank's gradients by it, in place (the step pipeline
                passes False and folds the factor into the update instead).

        Returns:
            ``cur_scale * max(1, (total_norm / cur_scale + 1e-6) / clip_grad)``.
        """
        combined = self.cur_scale
        if self.clip_grad > 0:
            ratio = (total_norm / self.cur_scale + 1e-6) / self.clip_grad
            if ratio > 1:
                combined = ratio * self.cur_scale
        if apply_scale:
            grads = [r.grad for gi in range(len(self.param_groups)) if self.steps_group(gi)
                     for r in self._refs[gi] if r.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / combined)
        return combined

    def refresh_masters(self) -> None:
        """Copy the model's current weights into the fp32 master weights (after loading weights alone)."""
        with torch.no_grad():
            for refs in self._refs:
                for r in refs:
                    m = self._master.get(r.name)
                    if m is not None:
                        m.copy_(r.data)

    # --- per-tensor state -----------------------------------------------------------------------
    def _needs_copy(self, ref: ParamRef) -> bool:
        return ref.param.dtype != torch.float32 or (self.offload == "cpu" and ref.param.device.type != "cpu")

    def _init_state(self, ref: ParamRef) -> None:
        """Master copy (when the model's tensor cannot be its own) and zeroed moments."""
        if self._needs_copy(ref):
            device = "cpu" if self.offload == "cpu" else ref.param.device
            self._master[ref.name] = ref.data.to(device=device, dtype=torch.float32, copy=True)
        master = self.master(ref)
        state: Dict[str, Any] = {"step": 0}
        for key in _MOMENTS[self.kind]:
            state[key] = torch.zeros_like(master)
        self._state[ref.name] = state

    def master(self, ref: ParamRef) -> Tensor:
        """The fp32 master weights of ``ref`` (the model's own tensor when it is fp32 in place)."""
        m = self._master.get(ref.name)
        return m if m is not None else ref.data

    def masters(self, gi: int) -> List[Tensor]:
        """fp32 master weights of group ``gi``, in the order of its ``params``."""
        return [self.master(r) for r in self._refs[gi]]

    def refs(self, gi: int) -> List[ParamRef]:
        """The identity of each tensor of group ``gi``."""
        return list(self._refs[gi])

    def state_names(self) -> List[str]:
        """Names of every tensor this optimizer holds state for (its own groups' under ZeRO-1/2)."""
        return list(self._state)

    def steps_group(self, gi: int) -> bool:
        """Whether this rank steps group ``gi`` (and holds its state)."""
        return self.shard is None or self.shard.steps(gi)

    def owns_group(self, gi: int) -> bool:
        """Whether this rank is the one that counts, reports and saves group ``gi``."""
        return self.shard is None or self.shard.owns(gi)

    def writes_state(self, name: str) -> bool:
        """Whether this rank writes tensor ``name``'s optimizer state into checkpoints."""
        return self.owns_group(self._by_name[name][0])

    def ownership(self) -> Dict[str, int]:
        """``{group name: global rank that owns it}`` (all 0 without a shard plan)."""
        if self.shard is None:
            return {g["name"]: 0 for g in self.param_groups}
        return self.shard.ownership()

    # --- stepping -------------------------------------------------------------------------------
    def _key(self, gi: int):
        g = self.param_groups[gi]
        hyper = UPDATE_HYPERPARAMETERS[self.kind]
        return (g["lr"] * g["lr_scale"],) + tuple(
            tuple(g[h]) if isinstance(g[h], (list, tuple)) else g[h] for h in hyper if h != "lr")

    def _batches(self) -> List[List[int]]:
        """Consecutive groups with equal hyperparameters, up to ``fuse_elems`` elements each."""
        batches: List[List[int]] = []
        size = 0
        for gi, refs in enumerate(self._refs):
            if not self.steps_group(gi):
                continue
            n = sum(r.numel() for r in refs)
            if (batches and self.fuse_elems is not None and size + n <= self.fuse_elems
                    and self._key(batches[-1][0]) == self._key(gi)):
                batches[-1].append(gi)
                size += n
            else:
                batches.append([gi])
                size = n
        return batches

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0, want_stats: bool = False, groups: Optional[Sequence[int]] = None) -> None:
        """Update every group (or ``groups``), one (fused) batch of groups at a time.

        Args:
            grad_scale: multiplies every gradient first (``clip_coef / loss_scale``).
            want_stats: record per-group grad norm, parameter norm and update/param ratio in
                ``last_stats`` (costs a few norms per group).
            groups: indices of the groups to step now (each stepped alone, no fusing); None:
                every group this rank steps.
        """
        if not math.isfinite(grad_scale):
            raise ValueError(f"grad_scale must be finite, got {grad_scale}")
        if groups is None:
            self.last_stats = {}
            remaining = self._refs_per_param()
            for batch in self._batches():
                self._step_batch(batch, grad_scale, want_stats, remaining)
            return
        for gi in groups:
            if not self.steps_group(gi):
                raise ValueError(f"group {self.param_groups[gi]['name']!r} is not stepped on this rank")
            # a parameter's gradient is freed once all its refs are stepped: one whose refs live
            # in other groups too (a stacked parameter) keeps it until zero_grad()
            remaining: Dict[int, int] = {}
            for r in self._refs[gi]:
                remaining[id(r.param)] = remaining.get(id(r.param), 0) + 1
            for key, n in remaining.items():
                if n < self._ref_count[key]:
                    remaining[key] = n + 1
            self._step_batch([gi], grad_scale, want_stats, remaining)

    def _refs_per_param(self) -> Dict[int, int]:
        """How many refs of each parameter are still to be stepped (its gradient is freed at 0)."""
        count: Dict[int, int] = {}
        for gi, refs in enumerate(self._refs):
            if not self.steps_group(gi):
                continue
            for r in refs:
                count[id(r.param)] = count.get(id(r.param), 0) + 1
        return count

    def _step_batch(self, batch: List[int], grad_scale: float, want_stats: bool, remaining: Dict[int, int]) -> None:
        group = self.param_groups[batch[0]]
        # tensors with a gradient, split by step count (all equal unless some tensor missed a step)
        by_step: Dict[int, List[Tuple[int, ParamRef]]] = {}
        for gi in batch:
            for r in self._refs[gi]:
                if r.grad is not None:  # no gradient this step (unused): leave it untouched
                    by_step.setdefault(self._state[r.name]["step"], []).append((gi, r))
        for step, members in by_step.items():
            self._step_tensors(group, members, step + 1, grad_scale, want_stats)
        for gi in batch:  # release the model's gradients of this batch before the next one
            for r in self._refs[gi]:
                remaining[id(r.param)] -= 1
                if remaining[id(r.param)] == 0:
                    r.param.grad = None

    def _step_tensors(self, group: Dict, members: List[Tuple[int, ParamRef]], step: int, grad_scale: float,
                      want_stats: bool) -> None:
        refs = [r for _, r in members]
        masters = [self.master(r) for r in refs]
        grads32 = []
        for r, m in zip(refs, masters):
            g = r.grad
            grads32.append(g if (g.dtype == torch.float32 and g.device == m.device) else
                           g.to(device=m.device, dtype=torch.float32))
        self.peak_fp32_grad_elems = max(self.peak_fp32_grad_elems,
                                        sum(g.numel() for g, r in zip(grads32, refs) if g is not r.grad))
        if grad_scale != 1.0:
            torch._foreach_mul_(grads32, grad_scale)
        grad_norms = torch._foreach_norm(grads32) if want_stats else None
        states = [self._state[r.name] for r in refs]
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
        for s in states:
            s["step"] = step
        if want_stats:
            self._record_stats([gi for gi, _ in members], grad_norms, masters, update)
        # write the new weights into the model (a cast for bf16/fp16, a copy for offload)
        for r, m in zip(refs, masters):
            if r.name in self._master:
                r.data.copy_(m)
        del grads32  # release this group's fp32 gradients before the next group

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
            if not self.owns_group(gi):
                continue  # a replica at stage 0: the owner reports it
            name = self.param_groups[gi]["name"]
            prev = self.last_stats.get(name)
            if prev is not None:  # a group stepped in parts (tensors at different step counts)
                g2 += prev["grad_norm"] ** 2
                p2 += prev["param_norm"] ** 2
                u2 += (prev["update_ratio"] * prev["param_norm"]) ** 2
            pn = math.sqrt(p2)
            self.last_stats[name] = {"grad_norm": math.sqrt(g2), "param_norm": pn,
                                     "update_ratio": math.sqrt(u2) / pn if pn > 0 else 0.0}

    def non_finite_group_names(self) -> List[str]:
        """Names of the groups holding a non-finite gradient on this rank (for warnings)."""
        return [g["name"] for gi, g in enumerate(self.param_groups)
                if any(r.grad is not None and not bool(torch.isfinite(r.grad).all()) for r in self._refs[gi])]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the model gradients of every group."""
        for refs in self._refs:
            for r in refs:
                if set_to_none:
                    r.param.grad = None
                elif r.param.grad is not None:
                    r.param.grad.zero_()

    # --- state (the Stateful protocol) ----------------------------------------------------------
    def hyperparameters(self, gi: int) -> Dict[str, Any]:
        """Group ``gi``'s settings without its tensors or identity keys."""
        return {k: v for k, v in self.param_groups[gi].items() if k not in IDENTITY_KEYS}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue: per-tensor state by name, per-group settings by group name.

        Returns:
            ``{"optimizer": kind, "state": {name: {"step", moments..., "master"?}},
            "param_groups": [{"name", settings..., "params": [names]}]}``. Tensors are the live
            ones (no copies); ``step`` is a 0-dim int64 tensor, as in ``torch.optim``.
        """
        state = {}
        for name, s in self._state.items():
            entry = {k: v for k, v in s.items() if isinstance(v, Tensor)}
            entry["step"] = torch.tensor(s["step"], dtype=torch.int64)
            if name in self._master:
                entry["master"] = self._master[name]
            state[name] = entry
        groups = [{**self.hyperparameters(gi), "name": g["name"], "params": [r.name for r in self._refs[gi]]}
                  for gi, g in enumerate(self.param_groups)]
        return {"optimizer": self.kind, "state": state, "param_groups": groups}

    @property
    def state_fields(self) -> Tuple[str, ...]:
        """The per-tensor state fields this optimizer keeps besides ``step`` and ``master``."""
        return _MOMENTS[self.kind] + _OPTIONAL_STATE.get(self.kind, ())

    def check_param_groups(self, groups: Any) -> None:
        """Check saved group settings for :meth:`load_state_dict` (see :func:`check_group_settings`)."""
        check_group_settings(groups, self.param_groups)

    def check_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Raise the error :meth:`load_state_dict` would raise, changing nothing."""
        self._read_state_dict(state_dict, strict, copy=False)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore from :meth:`state_dict` output, possibly written under another layout.

        Tensors are matched by name and groups by group name, so a state written with other
        world or expert-parallel sizes (or other group caps) loads. Everything is checked before
        anything is copied: on an error this optimizer is unchanged.

        Args:
            state_dict: ``{"optimizer", "state", "param_groups"}`` as :meth:`state_dict` returns
                (``param_groups`` may be partial or absent; settings of groups it does not name
                keep their current values).
            strict: also refuse state for tensors this optimizer does not hold.

        Raises:
            ValueError: another optimizer type, a tensor without state, a shape mismatch, or
                (strict) state for an unknown tensor; each names the tensor.
        """
        new_state, new_master, settings = self._read_state_dict(state_dict, strict)
        # all checked: apply. A master missing from the state (it was written by an fp32 run)
        # starts from the model's current weights, so load the model first.
        for name, ref_master in new_master.items():
            if ref_master is None:
                gi, j = self._by_name[name]
                new_master[name] = self._refs[gi][j].data.to(device=self._master[name].device, dtype=torch.float32,
                                                             copy=True)
        self._state = new_state
        self._master.update(new_master)
        for g in self.param_groups:
            saved_group = saved_settings(settings, g)
            if saved_group is not None:
                g.update({k: v for k, v in saved_group.items() if k not in IDENTITY_KEYS})

    def _read_state_dict(self, state_dict: Mapping[str, Any], strict: bool, copy: bool = True):
        """Check a state dict against this optimizer; returns the state to install (nothing applied)."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict:
            raise TypeError("state_dict must be a mapping with 'optimizer', 'state' and 'param_groups' (what "
                            f"state_dict() returns), got {type(state_dict).__name__}")
        kind = state_dict.get("optimizer")
        if kind != self.kind:
            raise ValueError(f"the optimizer state is for {kind!r} but this optimizer is {self.kind!r}; "
                             "resume with the optimizer type that wrote it")
        saved = state_dict["state"]
        if strict:
            unknown = sorted(set(saved) - set(self._state))
            if unknown:
                raise ValueError(f"the optimizer state holds tensors this optimizer does not have: {unknown[:5]}"
                                 f"{' ...' if len(unknown) > 5 else ''}")
        new_state: Dict[str, Dict[str, Any]] = {}
        new_master: Dict[str, Tensor] = {}
        for name, current in self._state.items():
            entry = check_state_entry(name, saved.get(name), self.kind)
            gi, j = self._by_name[name]
            ref = self._refs[gi][j]
            shape = tuple(ref.shape)
            for key, value in entry.items():
                if key == "step":
                    continue
                if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"the optimizer state {name}::{key} has shape {got} but the tensor has {shape}")
            master = self.master(ref)
            s: Dict[str, Any] = {"step": int(entry["step"])}
            for key, value in entry.items():
                if key not in ("step", "master"):
                    s[key] = value.detach().to(device=master.device, dtype=torch.float32).clone() if copy else value
            new_state[name] = s
            if name in self._master:
                src = entry.get("master")
                if src is not None and copy:
                    src = src.detach().to(device=master.device, dtype=torch.float32).clone()
                new_master[name] = src
        groups = state_dict.get("param_groups") or ()
        self.check_param_groups(groups)
        settings = {g.get("name"): g for g in groups}
        return new_state, new_master, settings
