"""Aux-loss-free load balancing (DeepSeek-V3): the per-expert bias update, once per optimizer step.

A router built with ``enable_expert_bias=True`` adds ``gate.expert_bias`` to its scores to choose
experts (the combine weights use the unbiased scores) and, in training, counts the routes each
expert was chosen for in ``gate.expert_load``. After every optimizer step
:func:`update_expert_bias` sums those counts over the data-parallel world (one all-reduce for all
layers), so every rank sees the load of the whole step (every micro-batch of every rank), and moves
each bias by the same amount on every rank::

    bias_e += bias_update_rate * sign(mean_load - load_e)

so an overloaded expert becomes less attractive and an idle one more. The counts are then reset.
The bias is a buffer, not a parameter: no optimizer group holds it; it is saved with the model's
state dict (the dense checkpoint file) and shown to telemetry as ``layer.expert_bias``.

The engine calls it at every optimizer step; a plain torch loop calls it after ``optimizer.step()``.
Loads are the routes *chosen* (before any capacity drop): the demand the bias steers. A forward
that activation checkpointing recomputes is counted once: the recompute reuses the first forward's
routing and leaves ``expert_load`` alone (:mod:`moesaic.layer.recompute`).
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..parallel.comm import CollectiveError
from .moe import iter_moe_modules
from .gate import TopKGate


def _biased_gates(model: nn.Module) -> Dict[str, TopKGate]:
    """``{name: gate}`` in module order; a layer is named by ``expert_group_name``, or by its module path
    when several layers share a name (layers need not be named for a plain torch loop)."""
    layers = [(path, layer) for path, layer in iter_moe_modules(model) if layer.gate.config.enable_expert_bias]
    names = [layer.expert_group_name for _, layer in layers]
    return {(layer.expert_group_name if names.count(layer.expert_group_name) == 1 else path or "<root>"): layer.gate
            for path, layer in layers}


def expert_bias_step(bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """``bias + rate * sign(mean(load) - load)`` (a new tensor; fp32)."""
    load = load_E.to(torch.float64)
    return bias_E + (rate * torch.sign(load.mean() - load)).to(bias_E.dtype)


@torch.no_grad()
def update_expert_bias(model: nn.Module, *, apply: bool = True) -> Dict[str, List[int]]:
    """Update every aux-loss-free expert bias of ``model`` from the step's loads, then reset the loads.

    Collective when ``apply`` and the default process group is initialised with more than one
    rank: every rank must call it at the same step (the engine does).

    Args:
        model: a module containing ``moesaic.MoE`` layers; layers without an expert bias are left alone.
        apply: False discards the step's counts without updating (a skipped step); no collective.

    Returns:
        ``{layer: loads}``: the global routes chosen per expert over the step (empty when nothing
        was applied); a layer is named by its ``expert_group_name`` (its module path when the name
        is shared).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    gates = _biased_gates(model)
    if not gates:
        return {}
    if not apply:
        for gate in gates.values():
            gate.expert_load.zero_()
        return {}
    loads = torch.cat([gate.expert_load for gate in gates.values()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.all_reduce(loads)  # the default group: every data-parallel rank routed its own tokens
        except RuntimeError as err:
            raise CollectiveError(f"all-reduce of the expert loads failed on rank {dist.get_rank()}: {err}. Every rank "
                                  "must call update_expert_bias at the same step") from err
    out: Dict[str, List[int]] = {}
    offset = 0
    for name, gate in gates.items():
        E = gate.config.num_experts
        load_E = loads[offset:offset + E]
        offset += E
        gate.expert_bias.copy_(expert_bias_step(gate.expert_bias, load_E, gate.config.bias_update_rate))
        gate.expert_load.zero_()
        out[name] = [int(c) for c in load_E.tolist()]
    return out
