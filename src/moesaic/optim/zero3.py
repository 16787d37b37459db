"""ZeRO stage 3 inside the engine: a torch optimizer over FSDP2's sharded parameters, and its boundary step.

At ``zero_optimization.stage: 3`` the model is sharded by :func:`moesaic.optim.fsdp.shard_model`:
its parameters are fp32 ``DTensor`` shards (the masters), forward and backward run in bf16/fp16
when enabled, and FSDP2 reduce-scatters the gradients during backward. What is left for the
engine's optimizer is small, and this module holds it:

* :func:`build_zero3_groups`: moesaic's groups (per expert or per layer, with names), freezing by
  identity and ``lr_scale``, over whole parameters (a stacked expert tensor is one group per layer:
  a torch optimizer steps whole tensors; ``lr_scale`` for one expert of a stacked layer is refused);
* :class:`Zero3Optimizer`: a ``torch.optim.Optimizer`` (Adam, AdamW or SGD from torch, stepping
  the local shards) whose groups keep those names and whose ``lr`` times ``lr_scale`` is used;
* :class:`Zero3Pipeline`: the boundary step with the engine's :class:`~moesaic.optim.pipeline.StepPipeline`
  interface: the exact global norm over both meshes (:func:`~moesaic.optim.fsdp.grad_norm`), a
  skip on a non-finite gradient anywhere (fp16 loss scaling), unscale and clip in one
  multiplication, the step.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..layer.identity import ExpertIndex
from .build_groups import check_lr_scale, freeze_experts, index_members, split_group
from .fsdp import grad_norm, local_tensor
from .pipeline import BoundaryResult

_TORCH = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}


def build_zero3_groups(model: nn.Module, index: ExpertIndex, *, split_by: str = "expert",
                       lr_scale: Optional[Dict[str, float]] = None,
                       freeze: Sequence[Union[int, str]] = ()) -> List[Dict[str, Any]]:
    """Named groups of whole (sharded) parameters: dense, then per expert or per layer (see module docstring)."""
    if lr_scale:
        check_lr_scale(lr_scale, index)
    if freeze:
        freeze_experts(model, list(freeze), index)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    groups = split_group({"params": trainable, "name": "params"}, "params",
                         index_members(trainable, index, "the model", views=False), None, split_by)
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        if not (g.get("moe") and lr_scale):
            continue
        layer, number = g["expert_group_name"], g.get("expert_number")
        if number is None and g["name"].endswith("/stacked"):
            per_expert = [k for k in lr_scale if k.startswith(layer + "/")]
            if per_expert:
                raise ValueError(f"moe.lr_scale keys {per_expert} scale single experts of layer {layer!r}, whose "
                                 "experts are stacked in one tensor per projection: at zero_optimization.stage 3 "
                                 "a torch optimizer steps whole tensors; scale the layer, or build it with "
                                 "per-module experts")
        g["lr_scale"] = lr_scale.get(f"{layer}/{number}", lr_scale.get(layer, 1.0))
    return groups


class Zero3Optimizer(torch.optim.Optimizer):
    """A torch optimizer over sharded parameters whose groups carry moesaic's names and ``lr_scale``.

    Args:
        groups: from :func:`build_zero3_groups`.
        kind: ``"AdamW"``, ``"Adam"`` or ``"SGD"`` (``EngineConfig.optimizer.update()``).
        defaults: its hyperparameters (``lr``, ``betas`` ...).
    """

    def __init__(self, groups: List[Dict[str, Any]], kind: str, defaults: Dict[str, Any]) -> None:
        if kind not in _TORCH:
            raise ValueError(f"zero_optimization.stage 3 steps a torch optimizer: optimizer.type must give one of "
                             f"{sorted(_TORCH)}, got {kind!r}")
        self.kind = kind
        super().__init__(groups, dict(defaults))
        # the torch optimizer shares the group dicts (schedulers write lr into them) and the state
        self._inner = _TORCH[kind](self.param_groups, **defaults)
        self.state = self._inner.state
        self._names = {}
        for gi, g in enumerate(self.param_groups):
            if g["name"] in self._names:
                raise ValueError(f"two optimizer groups are called {g['name']!r}")
            self._names[g["name"]] = gi

    def group_names(self) -> List[str]:
        return [g["name"] for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every group, at ``lr * lr_scale`` (the scheduler's ``lr`` is restored after)."""
        if closure is not None:
            raise ValueError("Zero3Optimizer.step takes no closure")
        saved = [g["lr"] for g in self.param_groups]
        try:
            for g in self.param_groups:
                g["lr"] = g["lr"] * g["lr_scale"]
            self._inner.step()
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._inner.zero_grad(set_to_none=set_to_none)

    def non_finite_group_names(self) -> List[str]:
        """Groups holding a non-finite gradient shard on this rank."""
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and not torch.isfinite(local_tensor(p.grad)).all():
                    out.append(g["name"])
                    break
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
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
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
        self.optimizer.step()
        return BoundaryResult(norm=norm, coef=loss_scale / combined, skipped=False)

    def gather_stats(self) -> Dict[str, Dict[str, float]]:
        """Per-group statistics are not gathered at stage 3 yet (the engine's metrics keep the global ones)."""
        return {}
