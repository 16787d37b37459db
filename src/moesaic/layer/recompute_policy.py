"""Selective recompute: which activations a model keeps and which it recomputes in backward.

``apply_recompute(model, policy)`` turns on one of four policies for a whole model:

* ``"none"``: keep everything (undoes any other policy);
* ``"block"``: recompute every transformer block (the elements of the ``nn.ModuleList`` that holds
  the MoE layers' blocks), keeping only each block's input. A ``transformers`` model is given its
  own ``gradient_checkpointing_enable(use_reentrant=False)``;
* ``"moe"``: recompute only the MoE layers (router, dispatch, experts, combine, shared expert);
  attention and the rest keep their activations;
* ``"experts"``: keep the routing and the experts' inputs, recompute only the experts'
  intermediate activations (the `(N, F)` projections, the largest tensors of a fine-grained layer).

Every policy is exact: a recomputed MoE layer reuses its first forward's routing
(:mod:`moesaic.layer.recompute`), so loss, gradients and statistics equal the run without
recompute. All use ``torch.utils.checkpoint`` without reentrancy, and act only in training with
autograd on (evaluation and ``no_grad`` run plainly).
"""

from __future__ import annotations

import types
from typing import Dict, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .moe import iter_moe_modules

POLICIES = ("none", "block", "moe", "experts")
_MARK = "_moesaic_recompute"


def _checkpointed_forward(self, *args, **kwargs):
    """The instance ``forward`` of a module under the "block" or "moe" policy."""
    inner = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(inner, self, *args, use_reentrant=False, **kwargs)
    return inner(self, *args, **kwargs)


def _wrap(module: nn.Module) -> None:
    module.forward = types.MethodType(_checkpointed_forward, module)
    setattr(module, _MARK, True)


def _unwrap(module: nn.Module) -> None:
    if module.__dict__.pop(_MARK, False):
        module.__dict__.pop("forward", None)


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks of ``model``: every element of each ``nn.ModuleList`` that holds an MoE layer's block."""
    moe_paths = [path for path, _ in iter_moe_modules(model)]
    blocks: Dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        prefix = f"{name}." if name else ""
        if any(p.startswith(prefix) for p in moe_paths):
            for child in module:
                blocks[id(child)] = child
    return list(blocks.values())


def _hf_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has its own checkpointing on (transformers 5's name first: no deprecation warning)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _hf_enable(model: nn.Module, on: bool) -> None:
    new = "activation_checkpointing_enable" if on else "activation_checkpointing_disable"
    if hasattr(model, new):
        getattr(model, new)(**({"activation_checkpointing_kwargs": {"use_reentrant": False}} if on else {}))
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "gradient_checkpointing_enable") and getattr(model, "supports_gradient_checkpointing",
                                                                         False)


def apply_recompute(model: nn.Module, policy: str) -> Dict[str, int]:
    """Apply a recompute policy to ``model`` (see module docstring); replaces any earlier one.

    Args:
        model: a module holding ``moesaic.MoE`` layers (a native model, a converted
            ``transformers`` model, ...).
        policy: ``"none"``, ``"block"``, ``"moe"`` or ``"experts"``.

    Returns:
        ``{"blocks": n, "moe_layers": m}``: how many blocks / MoE layers now recompute.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"Unknown recompute policy {policy!r}; choose one of {list(POLICIES)}")
    layers = [layer for _, layer in iter_moe_modules(model)]
    if policy != "none" and not layers:
        raise ValueError(f"recompute policy {policy!r} acts on moesaic MoE layers and their blocks, and the model "
                         f"({type(model).__name__}) has none; wrap its blocks in torch.utils.checkpoint yourself")
    # undo everything first
    for module in model.modules():
        _unwrap(module)
    for layer in layers:
        layer.recompute_experts = False
    if _is_hf(model) and _hf_checkpointing(model):
        _hf_enable(model, False)
    counts = {"blocks": 0, "moe_layers": 0}
    if policy == "block":
        if _is_hf(model):
            _hf_enable(model, True)
            counts["blocks"] = len(transformer_blocks(model))
        else:
            blocks = transformer_blocks(model)
            if not blocks:
                raise ValueError("recompute policy 'block' needs the model's blocks in an nn.ModuleList (as "
                                 "transformers and moesaic's GPT keep them); none holds an MoE layer here. Use 'moe' "
                                 "or 'experts', or wrap the blocks in torch.utils.checkpoint yourself")
            for block in blocks:
                _wrap(block)
            counts["blocks"] = len(blocks)
    elif policy == "moe":
        for layer in layers:
            _wrap(layer)
        counts["moe_layers"] = len(layers)
    elif policy == "experts":
        for layer in layers:
            layer.recompute_experts = True
        counts["moe_layers"] = len(layers)
    return counts


def recompute_policy(model: nn.Module) -> str:
    """The policy :func:`apply_recompute` last applied to ``model`` (``"none"`` when none is active)."""
    layers = [layer for _, layer in iter_moe_modules(model)]
    if any(getattr(layer, "recompute_experts", False) for layer in layers):
        return "experts"
    if any(getattr(layer, _MARK, False) for layer in layers):
        return "moe"
    if any(getattr(m, _MARK, False) for m in model.modules()) or \
            (_is_hf(model) and _hf_checkpointing(model)):
        return "block"
    return "none"
