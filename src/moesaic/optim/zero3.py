"""ZeRO stage 3 inside the engine: a torch optimizer over FSDP2's sharded parameters, and its boundary step.

At ``zero_optimization.stage: 3`` the model is sharded by :func:`moesaic.optim.fsdp.shard_model`:
its parameters are fp32 ``DTensor`` shards (the masters), forward and backward run in bf16/fp16
when enabled, and FSDP2 reduce-scatters the gradients during backward. What is left for the
engine's optimizer is small, and this module holds it:

* :func:`build_zero3_groups`: moesaic's groups (per expert or per layer, with the names of stages
  0-2), freezing by identity and ``lr_scale``: whole (sharded) parameters, except a stacked expert
  tensor, whose experts go to their own groups as :class:`~moesaic.layer.identity.ParamRef` s
  (one expert's slice each), as at stages 0-2;
* :class:`Zero3Optimizer`: a ``torch.optim.Optimizer`` whose groups keep those names and whose
  ``lr`` times ``lr_scale`` is used. Groups of whole tensors are stepped by torch's Adam, AdamW or
  SGD on the local shards; a group of stacked experts' slices by moesaic's functional step
  (:mod:`moesaic.optim.functional`, the stage 0-2 math) on this rank's rows of each slice: FSDP2
  shards a stacked tensor on dim 0, the expert dim, so a rank holds whole experts (none, one or
  several: torch's chunking of ``E_local`` rows over the expert-data-parallel mesh), and each expert's
  rows get their group's learning rate. The state stays torch's, one entry per parameter
  (``step``, moments as full-shape ``DTensor`` s), so checkpoints and the ``safe_get_full_*``
  accessors read every group kind alike;
* :class:`Zero3Pipeline`: the boundary step with the engine's :class:`~moesaic.optim.pipeline.StepPipeline`
  interface: the exact global norm over both meshes (:func:`~moesaic.optim.fsdp.grad_norm`), a
  skip on a non-finite gradient anywhere (fp16 loss scaling), unscale and clip in one
  multiplication, the step; with ``want_stats`` (the engine's telemetry steps) every group's
  ``grad_norm``, ``param_norm`` and ``update_ratio`` as stages 0-2 report them (a stacked expert's
  group: its rows only), from each rank's sums of squares over the rows it holds, gathered by group name.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..layer.identity import ExpertIndex
from ..layer.identity import ParamRef
from .build_groups import check_lr_scale, freeze_experts, index_members, saved_settings, split_group
from .config import UPDATE_HYPERPARAMETERS as _HYPER, optimizer_defaults
from ..parallel.dtensor import local_rows, local_tensor
from .fsdp import grad_norm
from .functional import adam_step, sgd_step
from .mixed_precision import _MOMENTS, _OPTIONAL_STATE, check_group_settings, check_state_entry
from .pipeline import BoundaryResult

_TORCH = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}


def build_zero3_groups(model: nn.Module, index: ExpertIndex, *, split_by: str = "expert",
                       lr_scale: Optional[Dict[str, float]] = None,
                       freeze: Sequence[Union[int, str]] = (),
                       base: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Named groups of the sharded model: dense, then per expert or per layer (see module docstring).

    The groups, their names, order and ``lr_scale`` are stage 0-2's (``build_param_groups`` with no
    size cap): a whole parameter is a tensor of its group; one expert's slice of a stacked parameter
    is a :class:`ParamRef` (``ref.index`` its global row), in that expert's group on every rank of the
    layer's expert-data-parallel mesh, whichever rank holds its rows. Freezing is stage 0-2's
    (:func:`~moesaic.optim.build_groups.freeze_experts`: a stacked tensor freezes all its experts or none).

    ``base``: the client's groups over the sharded parameters (each with its own settings, e.g.
    ``weight_decay``); default one group ``"params"`` of every parameter.
    """
    if lr_scale:
        check_lr_scale(lr_scale, index)
    if freeze:
        freeze_experts(model, list(freeze), index)
    if base is None:
        base = [{"params": list(model.parameters()), "name": "params"}]
    base = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in base]
    if not any(g["params"] for g in base):
        raise ValueError("the model has no trainable parameters")
    names = [f"group_{gi}" if g.get("name") is None else str(g["name"]) for gi, g in enumerate(base)]
    names = [n if names.count(n) == 1 else f"{n}[{gi}]" for gi, n in enumerate(names)]

    def members(gi, g):  # whole tensors as themselves, a stacked tensor's experts as refs
        return [(r.param if r.index is None else r, layer, unit)
                for r, layer, unit in index_members(g["params"], index, f"param_groups[{gi}]")]

    parts = [split_group(g, names[gi], members(gi, g), None, split_by) for gi, g in enumerate(base)]
    groups = [part[0] for part in parts] + [h for part in parts for h in part[1:]]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        if g.get("moe") and lr_scale:
            layer, number = g["expert_group_name"], g.get("expert_number")
            g["lr_scale"] = lr_scale.get(f"{layer}/{number}", lr_scale.get(layer, g["lr_scale"]))
    return groups


def _sliced(group: Dict[str, Any]) -> bool:
    """Whether a group holds stacked experts' slices (stepped by moesaic's functional step)."""
    return any(isinstance(m, ParamRef) for m in group["params"])


def _param_of(member: Any) -> Tensor:
    return member.param if isinstance(member, ParamRef) else member


def _local_rows(t: Optional[Tensor], member: Any, rows) -> Optional[Tensor]:
    """This rank's part of ``t`` (the parameter, its gradient or a state buffer) for one group member."""
    if t is None:
        return None
    local = local_tensor(t)
    if not isinstance(member, ParamRef):
        return local
    return local[member.index - (rows[0] if rows is not None else 0)]


def _holds(member: Any) -> Optional[tuple]:
    """``(rows,)`` when this rank holds rows of ``member`` (a stacked slice: all of them, or none), else None;
    ``rows`` is :func:`~moesaic.parallel.dtensor.local_rows` of its parameter (None for a plain tensor)."""
    rows = local_rows(_param_of(member))
    if isinstance(member, ParamRef) and rows is not None and not rows[0] <= member.index < rows[1]:
        return None
    return (rows,)


class Zero3Optimizer(torch.optim.Optimizer):
    """A torch optimizer over sharded parameters whose groups carry moesaic's names and ``lr_scale``.

    A group holds whole parameters (stepped by torch's optimizer of ``kind``) or stacked experts'
    slices as :class:`ParamRef` s (stepped by :mod:`moesaic.optim.functional` on the rows this rank
    holds); ``param_groups`` lists both kinds in :func:`build_zero3_groups`' order, :meth:`params`
    each parameter once, and ``state`` is torch's, one entry per parameter.

    Its state moves in and out of checkpoints by identity (:mod:`moesaic.checkpoint.sharded`):
    :meth:`state_names`, :meth:`state_dict`, :meth:`check_state_dict` and :meth:`load_state_dict` speak moesaic's
    ``{"optimizer", "state": {name: {"step", moments..., "master"?}}, "param_groups"}`` with each
    tensor's fields holding this rank's rows only (a stacked expert's slice whole, where it is local).

    Args:
        groups: from :func:`build_zero3_groups`.
        kind: ``"AdamW"``, ``"Adam"`` or ``"SGD"`` (``EngineConfig.optimizer.update()``).
        defaults: its hyperparameters (``lr``, ``betas`` ...).
        index: the sharded model's :class:`ExpertIndex` (names the tensors for checkpoints).
    """

    def __init__(self, groups: List[Dict[str, Any]], kind: str, defaults: Dict[str, Any],
                 index: Optional[ExpertIndex] = None) -> None:
        if kind not in _TORCH:
            raise ValueError(f"zero_optimization.stage 3 steps a torch optimizer: optimizer.type must give one of "
                             f"{sorted(_TORCH)}, got {kind!r}")
        if index is not None and not isinstance(index, ExpertIndex):
            raise TypeError(f"index must be an ExpertIndex or None, got {type(index).__name__}")
        if not isinstance(groups, (list, tuple)) or not groups:
            raise TypeError("groups must be a non-empty list of dicts with 'params' (build_zero3_groups)")
        for gi, g in enumerate(groups):
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError(f"groups[{gi}] must be a dict with 'params', got {type(g).__name__}")
            g["params"] = list(g["params"])
            for m in g["params"]:
                if not isinstance(m, (Tensor, ParamRef)):
                    raise TypeError(f"groups[{gi}] ({g.get('name')!r}) holds a {type(m).__name__}; allowed: "
                                    "parameters, or ParamRefs for stacked experts' slices")
        self.kind = kind
        self.index = index
        whole = [g for g in groups if not _sliced(g)]
        if len(whole) < len(groups):  # moesaic's functional step reads exactly stage 0-2's hyperparameters
            extra = sorted(set(defaults) - set(_HYPER[kind]))
            if extra:
                raise ValueError(f"stacked experts' groups step with {kind}'s {list(_HYPER[kind])} only (as at "
                                 f"stages 0-2); got {extra}")
            defaults = {**optimizer_defaults(kind), **defaults}
        # torch's optimizer checks, defaults and steps the groups of whole tensors; it shares their
        # dicts (schedulers write lr into them) and the state, which the sliced groups' tensors join
        super().__init__(whole or [{"params": []}], dict(defaults))
        self._inner = _TORCH[kind](whole, **defaults) if whole else None
        if self._inner is not None:
            self.state = self._inner.state
        for g in groups:
            if _sliced(g):
                for k, v in self.defaults.items():
                    g.setdefault(k, v)
        self.param_groups = list(groups)
        self._names = {}
        anywhere: Dict[int, str] = {}  # parameter -> the first group holding it (whole or a slice)
        held: Dict[tuple, str] = {}  # (parameter, None for whole or the slice's row) -> its group
        for gi, g in enumerate(self.param_groups):
            if g["name"] in self._names:
                raise ValueError(f"two optimizer groups are called {g['name']!r}")
            self._names[g["name"]] = gi
            for m in g["params"]:
                pid = id(_param_of(m))
                if isinstance(m, ParamRef):
                    clash = held.get((pid, None)) or held.get((pid, m.index))
                    held[(pid, m.index)] = g["name"]
                else:
                    clash = anywhere.get(pid)
                    held[(pid, None)] = g["name"]
                if clash is not None:
                    raise ValueError(f"a parameter (or a stacked expert's slice) is in groups {clash!r} and "
                                     f"{g['name']!r}; each must be in exactly one group")
                anywhere.setdefault(pid, g["name"])

    def local_members(self, group: Dict[str, Any]) -> List[tuple]:
        """``(parameter, this rank's rows of its data, of its gradient or None)`` for every member of ``group``
        whose rows this rank holds: a whole tensor's local shard, a stacked expert's rows of the local shard."""
        out = []
        for m in group["params"]:
            held = _holds(m)
            if held is None:
                continue
            p = _param_of(m)
            out.append((p, _local_rows(p.detach(), m, held[0]), _local_rows(p.grad, m, held[0])))
        return out

    def group_names(self) -> List[str]:
        return [g["name"] for g in self.param_groups]

    # --- checkpoints by identity (moesaic.checkpoint.sharded) ------------------------------------
    @property
    def state_fields(self) -> tuple:
        """Per-tensor state fields besides ``step`` and ``master`` (as moesaic's stage 0-2 optimizer)."""
        return _MOMENTS[self.kind] + _OPTIONAL_STATE.get(self.kind, ())

    @property
    def required_fields(self) -> tuple:
        """The fields every tensor's state holds (zeros before the first step)."""
        return _MOMENTS[self.kind]

    def params(self) -> List[Tensor]:
        """Every parameter this optimizer steps, in group order, each once (a stacked one where its first
        expert's group is)."""
        out, seen = [], set()
        for g in self.param_groups:
            for m in g["params"]:
                p = _param_of(m)
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _index(self) -> ExpertIndex:
        if self.index is None:
            raise RuntimeError("this Zero3Optimizer was built without index=; checkpoints address its state by "
                               "the model's ExpertIndex")
        return self.index

    def _held(self) -> Dict[str, ParamRef]:
        return {r.name: r for r in self._index().held_refs(self.params())}

    def state_names(self) -> List[str]:
        """Names of the tensors whose rows this rank holds (a stacked expert where its slice is local)."""
        return list(self._held())

    def refresh_masters(self) -> None:
        """Nothing to copy: the sharded fp32 parameters are the masters."""

    def check_param_groups(self, groups: Any) -> None:
        """Saved group settings by type and range (``moesaic.optim.mixed_precision.check_group_settings``)."""
        check_group_settings(groups, self.param_groups)

    def portable_groups(self) -> List[Dict[str, Any]]:
        """Every group's settings that mean the same at every stage: name, hyperparameters, ``lr_scale``."""
        keep = (*_HYPER[self.kind], "lr_scale", "initial_lr")
        return [{"name": g["name"], **{k: list(g[k]) if isinstance(g[k], tuple) else g[k] for k in keep if k in g}}
                for g in self.param_groups]

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """This rank's state in the format :meth:`load_state_dict` reads (stage 0-2's, by tensor name).

        ``{"optimizer", "state": {name: {"step", moments...}}, "param_groups"}``: a whole tensor's
        fields are this rank's rows of it, a stacked expert's its slice where this rank holds it;
        a tensor not stepped yet has zero moments and step 0. Tensors are this optimizer's own (no copies).
        """
        state: Dict[str, Dict[str, Any]] = {}
        for p in self.params():
            entry = self.state.get(p, {})
            rows = local_rows(p)
            step = int(entry["step"]) if "step" in entry else 0
            for ref in self._index().held_refs([p]):
                out: Dict[str, Any] = {"step": step}
                for f in self.state_fields:
                    value = entry.get(f)
                    if value is None and f in self.required_fields:
                        value = torch.zeros_like(p)
                    if value is not None:
                        out[f] = _local_rows(value.detach(), ref if ref.index is not None else p, rows)
                state[ref.name] = out
        return {"optimizer": self.kind, "state": state, "param_groups": self.portable_groups()}

    def check_state_dict(self, state_dict: Dict[str, Any], strict: bool = True) -> None:
        """Raise the error :meth:`load_state_dict` would raise, changing nothing."""
        self._read(state_dict, strict)

    def _read(self, state_dict: Dict[str, Any], strict: bool) -> Dict[str, ParamRef]:
        if not isinstance(state_dict, dict) or "state" not in state_dict:
            raise TypeError("state_dict must be a dict with 'optimizer', 'state' and 'param_groups'")
        if state_dict.get("optimizer") != self.kind:
            raise ValueError(f"the optimizer state is for {state_dict.get('optimizer')!r} but this optimizer is "
                             f"{self.kind!r}; resume with the optimizer type that wrote it")
        held = self._held()
        saved = state_dict["state"]
        if strict:
            unknown = sorted(set(saved) - set(held))
            if unknown:
                raise ValueError(f"the optimizer state holds tensors this optimizer does not have: {unknown[:5]}")
        for name, ref in held.items():
            entry = check_state_entry(name, saved.get(name), self.kind)
            rows = local_rows(ref.param)
            want = tuple(ref.shape) if ref.index is not None or rows is None else \
                (rows[1] - rows[0],) + tuple(ref.shape[1:])
            for key, value in entry.items():
                if key != "step" and (not isinstance(value, Tensor) or tuple(value.shape) != want):
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"the optimizer state {name}::{key} holds rows of shape {got}; this rank's "
                                     f"are {want}")
        self.check_param_groups(state_dict.get("param_groups") or [])
        return held

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True) -> None:  # type: ignore[override]
        """Install state written by any stage and layout (this rank's rows; checked first, then copied).

        A ``master`` field (the fp32 masters of a bf16/fp16 run at stages 0-2) becomes the
        parameter's rows: at stage 3 the parameters are the masters.
        """
        held = self._read(state_dict, strict)
        saved = state_dict["state"]
        fields = self.state_fields
        new: Dict[Tensor, Dict[str, Any]] = {}
        for p in self.params():
            rows = local_rows(p)
            refs = [r for r in self._index().refs_of(p) if r.name in held]
            if not refs:
                steps = [0]
            else:
                steps = [int(saved[r.name]["step"]) for r in refs]
            state: Dict[str, Any] = {"step": torch.tensor(float(max(steps)), dtype=torch.float32)}
            for f in fields:
                if not any(f in saved[r.name] for r in refs) and f not in _MOMENTS[self.kind]:
                    continue
                buf = torch.zeros_like(p)
                for r in refs:
                    v = saved[r.name].get(f)
                    if v is None:
                        continue
                    target = local_tensor(buf)
                    target = target if r.index is None else target[r.index - (rows[0] if rows else 0)]
                    target.copy_(v)
                state[f] = buf
            for r in refs:
                m = saved[r.name].get("master")
                if m is not None:
                    target = local_tensor(p)
                    target = target if r.index is None else target[r.index - (rows[0] if rows else 0)]
                    target.copy_(m)
            new[p] = state
        self.state.clear()
        self.state.update(new)
        by_name = {g["name"]: g for g in state_dict.get("param_groups") or []}
        for g in self.param_groups:
            saved_group = saved_settings(by_name, g)
            if saved_group is not None:
                g.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items()
                          if k in (*_HYPER[self.kind], "lr_scale", "initial_lr")})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every group, at ``lr * lr_scale`` (the scheduler's ``lr`` is restored after)."""
        if closure is not None:
            raise ValueError("Zero3Optimizer.step takes no closure")
        saved = [g["lr"] for g in self.param_groups]
        try:
            for g in self.param_groups:
                g["lr"] = g["lr"] * g["lr_scale"]
            if self._inner is not None:
                self._inner.step()
            self._step_sliced()
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr

    def _step_sliced(self) -> None:
        """The groups of stacked experts' slices: each expert's local rows at its group's (scaled) ``lr``.

        A stacked parameter with a gradient counts one step (its ``step`` is shared by its experts, as
        every expert of it is stepped together); its moments are full-shape buffers like torch's, of which
        each group reads and writes its experts' rows only.
        """
        sliced = [g for g in self.param_groups if _sliced(g)]
        if not sliced:
            return
        fresh = set()  # parameters whose momentum buffer is made at this step (torch's SGD: the gradient)
        stepped = set()
        for g in sliced:
            for m in g["params"]:
                p = _param_of(m)
                if p.grad is None or id(p) in stepped:
                    continue
                stepped.add(id(p))
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for f in _MOMENTS[self.kind]:
                        state[f] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
        for g in sliced:
            members = [(m, _holds(m)) for m in g["params"] if _param_of(m).grad is not None]
            members = [(m, held[0]) for m, held in members if held is not None]
            if not members:
                continue
            params = [_local_rows(_param_of(m).detach(), m, rows) for m, rows in members]
            grads = [_local_rows(_param_of(m).grad, m, rows) for m, rows in members]
            states = [self.state[_param_of(m)] for m, _ in members]
            if self.kind == "SGD":
                bufs = []
                for (m, rows), st in zip(members, states):
                    if g["momentum"] and "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(_param_of(m))
                        fresh.add(id(_param_of(m)))
                    new = id(_param_of(m)) in fresh
                    bufs.append(None if new or not g["momentum"] else _local_rows(st["momentum_buffer"], m, rows))
                sgd_step(params, grads, bufs, lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"],
                         weight_decay=g["weight_decay"], nesterov=g["nesterov"])
                for (m, rows), st, b in zip(members, states, bufs):
                    if b is not None and id(_param_of(m)) in fresh:
                        _local_rows(st["momentum_buffer"], m, rows).copy_(b)
            else:
                beta1, beta2 = g["betas"]
                rows_of = [(m, rows, st) for (m, rows), st in zip(members, states)]
                adam_step(params, grads, [_local_rows(st["exp_avg"], m, rows) for m, rows, st in rows_of],
                          [_local_rows(st["exp_avg_sq"], m, rows) for m, rows, st in rows_of],
                          step=int(states[0]["step"]), lr=g["lr"], beta1=beta1, beta2=beta2, eps=g["eps"],
                          weight_decay=g["weight_decay"], decoupled=self.kind == "AdamW")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    def non_finite_group_names(self) -> List[str]:
        """Groups holding a non-finite gradient shard on this rank."""
        out = []
        for g in self.param_groups:
            if any(grad is not None and not torch.isfinite(grad).all() for _, _, grad in self.local_members(g)):
                out.append(g["name"])
        return out


class Zero3Pipeline:
    """The engine's boundary step at stage 3 (the :class:`~moesaic.optim.pipeline.StepPipeline` interface)."""

    def __init__(self, optimizer: Zero3Optimizer, model: nn.Module) -> None:
        self.optimizer = optimizer
        self.model = model

    def reduce(self) -> int:
        """Nothing to do: FSDP2 reduce-scattered every gradient during backward."""
        return 0

    def run(self, *, loss_scale: float = 1.0, clip: float = 0.0, want_stats: bool = False,
            reduced: bool = False) -> BoundaryResult:
        """Norm (exact, both meshes), skip on non-finite, unscale and clip in one multiplication, step."""
        params = self.optimizer.params()
        scaled = float(grad_norm(params))
        if not math.isfinite(scaled):
            return BoundaryResult(norm=float("nan"), coef=0.0, skipped=True)
        norm = scaled / loss_scale
        combined = loss_scale
        if clip > 0:
            ratio = (norm + 1e-6) / clip
            if ratio > 1:
                combined = ratio * loss_scale
        if combined != 1.0:
            grads = [local_tensor(p.grad) for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / combined)
        before = self._stats_before() if want_stats else None
        self.optimizer.step()
        self._stats = self._stats_after(before) if want_stats else {}
        return BoundaryResult(norm=norm, coef=loss_scale / combined, skipped=False)

    _stats: Dict[str, Dict[str, float]] = {}

    def _stats_before(self):
        """Per group: the sum of squares of this rank's (unscaled, clipped) gradient rows, and its rows before the step."""
        out = []
        for g in self.optimizer.param_groups:
            members = self.optimizer.local_members(g)
            g2 = sum(float(grad.float().pow(2).sum()) for _, _, grad in members if grad is not None)
            out.append((g2, [data.clone() for _, data, _ in members]))
        return out

    def _stats_after(self, before) -> Dict[str, Dict[str, float]]:
        """stage 0-2's per-group figures (grad_norm, param_norm, update_ratio), each shard counted once over the world."""
        import torch.distributed as dist

        mine: Dict[str, List[float]] = {}
        for g, (g2, old) in zip(self.optimizer.param_groups, before):
            new = [data for _, data, _ in self.optimizer.local_members(g)]
            mine[g["name"]] = [g2, sum(float(t.float().pow(2).sum()) for t in new),
                               sum(float((t.float() - o.float()).pow(2).sum()) for t, o in zip(new, old))]
        parts = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # ranks hold different expert groups (their own experts); a group's shards each live on one
            # rank of its mesh, so the sums by name over every rank count each shard once
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        total: Dict[str, List[float]] = {}
        for part in parts:
            for name, sums in part.items():
                acc = total.setdefault(name, [0.0, 0.0, 0.0])
                for i, v in enumerate(sums):
                    acc[i] += v
        out = {}
        for name, (g2, p2, u2) in total.items():
            pn = math.sqrt(p2)
            out[name] = {"grad_norm": math.sqrt(g2), "param_norm": pn,
                         "update_ratio": math.sqrt(u2) / pn if pn > 0 else 0.0}
        return out

    def gather_stats(self) -> Dict[str, Dict[str, float]]:
        """Every group's statistics of the last step (computed with ``want_stats``; the same on every rank)."""
        return dict(self._stats)
