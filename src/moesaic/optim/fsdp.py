"""Parameters sharded too (ZeRO stage 3) on torch's FSDP2, composed with expert parallelism.

:func:`shard_model` is the torch-native door: it applies expert parallelism (moesaic's EP/EDP
groups, DeepSpeed's layouts) and ``torch.distributed.fsdp.fully_shard`` to a model made of
moesaic MoE layers, and returns it ready for a plain ``torch.optim`` optimizer over moesaic's
per-expert groups (:func:`moesaic.split_params_into_different_moe_groups_for_optimizer`). The
layout is torchtitan's:

* every MoE layer's local experts form one FSDP unit over the layer's **expert-data-parallel**
  mesh (the W/P ranks holding the same experts; a one-rank mesh when ``ep_size == W``);
* every MoE layer's router (``gate``) forms a unit over the **world** mesh, computed in fp32
  (the router scores in fp32 whatever the model's dtype);
* every module of an ``nn.ModuleList`` that holds an MoE layer (a transformer block), then the
  model itself, form units over the **world** mesh for the remaining (dense) parameters.

Parameters stay fp32 and sharded between steps (the masters); forward and backward run in
``param_dtype`` (bf16 by default) and gradients are reduced in ``reduce_dtype`` (fp32).

Gradients mean what moesaic's engine makes them mean at every ZeRO stage: the gradient of the
mean loss over the global batch. A dense gradient is summed over the world and divided by W. An
expert gradient already holds its expert-parallel peers' contributions (the all-to-all's
backward), so it is summed over the expert-data-parallel group only, and divided by W too, not
by the EDP size (torchtitan sets the same divide factor on its expert units). Reductions are
sums followed by one division, so they run on gloo as on NCCL.

A rank whose local experts receive no tokens still runs its expert unit (its all-gather and
reduce-scatter take part in every collective: no hang) and its experts' gradients are exactly
zero. Expert identity tags (:mod:`moesaic.layer.identity`) are written again on the sharded
``DTensor`` parameters, so groups, freezing, ``lr_scale`` and checkpoints by identity keep
working. :func:`clip_grad_norm_` computes the exact global norm over both meshes: every shard of
every parameter is held by exactly one rank, so one all-reduce over the world of the local sums
of squares counts each parameter once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layer.moe import moe_layers, setup_expert_parallel
from ..parallel.dtensor import local_tensor
from ..parallel.groups import GroupRegistry

_INFO_ATTR = "_moesaic_fsdp"


@dataclass(frozen=True)
class ShardInfo:
    """What :func:`shard_model` did, kept on the model (``model._moesaic_fsdp``).

    Attributes:
        world_size: W.
        param_dtype / reduce_dtype: the mixed-precision policy.
        dense_units: module paths of the dense units over the world mesh (the model is ``""``).
        expert_units: ``{expert_group_name: (module path, EDP ranks)}``.
    """

    world_size: int
    param_dtype: Optional[torch.dtype]
    reduce_dtype: Optional[torch.dtype]
    dense_units: Tuple[str, ...]
    expert_units: Dict[str, Tuple[str, Tuple[int, ...]]]


def _check_dtype(value, name: str) -> None:
    if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
        raise TypeError(f"{name} must be a floating torch.dtype or None, got {value!r}")


def _check_reshard(value) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int) and value >= 1:
        return
    raise ValueError(f"reshard_after_forward must be a bool or an int >= 1 (FSDP2: the size of the mesh to "
                     f"reshard onto after forward), got {value!r}")


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Errors, before any process-group work, for a model :func:`shard_model` cannot shard at ``world_size``.

    * an MoE layer whose ``ep_size`` does not divide the world (names the layer);
    * a model already sharded;
    * trainable floating parameters that are not fp32 (the sharded parameters are the masters);
    * a tensor shared by two FSDP units (tied between an MoE layer's experts and anything else).
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("model is already sharded by fully_shard; call shard_model once, on the unsharded model")
    for name, (path, layer) in moe_layers(model).items():  # the names must be unique (name_moe_layers)
        if world_size % layer.ep_size:
            raise ValueError(f"MoE layer {name!r} (module {path!r}) has ep_size={layer.ep_size}, which does not divide "
                             f"the world of {world_size} processes; allowed: ep_size among the divisors of "
                             f"{world_size} ({[d for d in range(1, world_size + 1) if world_size % d == 0]})")
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            raise ValueError(f"parameter {name!r} is {p.dtype}; shard_model keeps fp32 parameters as the sharded "
                             "masters and computes in param_dtype: build or cast the model in float32 (model.float())")
    layers = moe_layers(model)
    owner: Dict[int, str] = {}
    for name, (path, layer) in layers.items():
        for p in layer.experts.parameters():
            owner[id(p)] = name
    for pname, p in model.named_parameters(remove_duplicate=False):
        layer = owner.get(id(p))
        if layer is not None and not _is_inside(pname, layers[layer][0]):
            raise ValueError(f"parameter {pname!r} is shared with the experts of MoE layer {layer!r}; an expert's "
                             "tensors cannot be tied to tensors outside its layer when experts are sharded over "
                             "their expert-data-parallel mesh")


def _is_inside(name: str, path: str) -> bool:
    return path == "" or name.startswith(path + ".")


def _edp_mesh(groups, device_type: str, cache: Dict):
    """The expert-data-parallel mesh for one layer's groups (moesaic's own process group)."""
    from torch.distributed.device_mesh import DeviceMesh

    key = (groups.ep_size, groups.data_before_expert)
    if key not in cache:
        if groups.edp_group is not None:
            cache[key] = DeviceMesh.from_group(groups.edp_group, device_type)
        else:
            # EDP size 1 (ep_size == W): FSDP still needs a mesh; one group per rank, every rank
            # creating all of them in the same order (new_group is collective)
            mine = None
            for r in range(dist.get_world_size()):
                g = dist.new_group([r])
                if r == dist.get_rank():
                    mine = g
            cache[key] = DeviceMesh.from_group(mine, device_type)
    return cache[key]


def _block_units(model: nn.Module, layer_modules: Sequence[nn.Module]) -> List[Tuple[str, nn.Module]]:
    """Modules of every ModuleList that hold an MoE layer (transformer blocks); a block inside a chosen one is not."""
    holders = {id(m) for m in layer_modules}
    out, seen = [], set()
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList):
            continue
        for i, child in enumerate(mod):
            if id(child) in seen or id(child) in holders:
                continue
            if any(id(m) in holders for m in child.modules()):
                # the outermost block holding the layer is the unit; lists nested inside it are skipped
                out.append((f"{path}.{i}" if path else str(i), child))
                seen.update(id(m) for m in child.modules())
    return out


def shard_model(model: nn.Module, *, param_dtype: Optional[torch.dtype] = torch.bfloat16,
                reduce_dtype: Optional[torch.dtype] = torch.float32,
                reshard_after_forward: Union[bool, int] = True,
                blocks: Optional[Iterable[nn.Module]] = None,
                use_data_before_expert_parallel_: bool = False,
                registry: Optional[GroupRegistry] = None,
                collectives: str = "auto") -> nn.Module:
    """Apply expert parallelism and FSDP2 to ``model`` (see module docstring); returns the same model.

    Call it on every rank, after ``torch.distributed`` is initialised (``moesaic.init_distributed``)
    and before building the optimizer. Layers not yet on their expert-parallel groups are put on
    them (:func:`moesaic.setup_expert_parallel`). The model must be fp32 (its parameters become the
    sharded masters) and on its device.

    Args:
        model: a model made of moesaic MoE layers (or one from ``moesaic.hf.load``).
        param_dtype: compute dtype of forward and backward (None: the parameters' own, fp32).
        reduce_dtype: dtype of gradient reduction (None: ``param_dtype``).
        reshard_after_forward: FSDP2's option: free the gathered parameters after forward (True,
            ZeRO-3), keep them until backward (False, ZeRO-2-like), or an int: reshard onto that
            many ranks.
        blocks: the dense units (default: the modules of every ``nn.ModuleList`` holding an MoE
            layer); the model itself is always the last unit.
        use_data_before_expert_parallel_: DeepSpeed's alternative EP/EDP layout.
        registry: where the EP/EDP groups live (default: the process-wide registry).
        collectives: ``"auto"``: on gloo with CPU tensors, every unit all-gathers with one
            broadcast per rank and reduce-scatters with one reduce per rank
            (:mod:`moesaic.optim.fsdp_comms`: the same values, several times faster than gloo's
            own collectives); elsewhere (NCCL, CUDA tensors) FSDP2's.
            ``"torch"``: FSDP2's own everywhere.

    Returns:
        ``model``, its parameters now fp32 ``DTensor`` shards carrying moesaic's identity tags.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    _check_dtype(param_dtype, "param_dtype")
    _check_dtype(reduce_dtype, "reduce_dtype")
    _check_reshard(reshard_after_forward)
    if collectives not in ("auto", "torch"):
        raise ValueError(f"collectives must be 'auto' or 'torch', got {collectives!r}")
    if not isinstance(use_data_before_expert_parallel_, bool):
        raise TypeError(f"use_data_before_expert_parallel_ must be a bool, got {use_data_before_expert_parallel_!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed: call moesaic.init_distributed() (or "
                           "torch.distributed.init_process_group) first, e.g. under torchrun")
    world = dist.get_world_size()
    check_shardable(model, world)
    block_list = None if blocks is None else list(blocks)
    if block_list is not None:
        for b in block_list:
            if not isinstance(b, nn.Module) or not any(b is m for m in model.modules()):
                raise ValueError(f"blocks must be submodules of model, got {type(b).__name__}")
    devices = {p.device.type for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(f"model has parameters on several device types {sorted(devices)}; move it to one")
    device_type = devices.pop() if devices else "cpu"

    layers = moe_layers(model)
    if any(layer.parallel_groups is None for _, layer in layers.values()):
        setup_expert_parallel(model, use_data_before_expert_parallel_, registry=registry)
    world_mesh = DeviceMesh.from_group(dist.group.WORLD, device_type)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    router_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                     cast_forward_inputs=False)
    meshes: Dict = {}
    expert_units = {}
    from .fsdp_comms import ScratchPool

    scratch = ScratchPool()  # the gloo collectives' buffers, shared by every unit

    def _sum_then_divide(unit, mesh) -> None:
        # every unit's gradients: summed, then divided by W (see module docstring)
        mesh_size = mesh.size()
        unit.set_force_sum_reduction_for_comms(True)
        if collectives == "auto" and mesh_size > 1:
            _use_fast_gloo_collectives(unit, mesh.get_group(), device_type, scratch)
        if mesh_size > 1:
            unit.set_gradient_divide_factor(float(world))
        elif world > 1:
            # torch 2.13 divides twice by a custom factor on a one-rank mesh (once in its
            # single-rank copy, once after): leave FSDP's factor at 1 and divide here, once
            unit.set_all_reduce_hook(lambda flat: flat.div_(world))

    for name, (path, layer) in layers.items():
        groups = layer.parallel_groups
        experts = layer.experts
        mesh = _edp_mesh(groups, device_type, meshes)
        fully_shard(experts, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        _sum_then_divide(experts, mesh)
        experts.tag(experts.expert_group_name, experts.ep_rank)  # fully_shard made new Parameter objects
        expert_units[name] = (f"{path}.experts" if path else "experts", tuple(groups.edp_ranks))
        if any(True for _ in layer.gate.parameters()):
            fully_shard(layer.gate, mesh=world_mesh, mp_policy=router_mp, reshard_after_forward=reshard_after_forward)
            # the Hugging Face blocks score through gate.logits, not gate(...): gather for it too
            register_fsdp_forward_method(layer.gate, "logits")
            _sum_then_divide(layer.gate, world_mesh)

    if block_list is None:
        named_blocks = _block_units(model, [layer for _, layer in layers.values()])
    else:
        paths = {id(m): p for p, m in model.named_modules()}
        named_blocks = [(paths[id(b)], b) for b in block_list]
    for _, block in named_blocks:
        fully_shard(block, mesh=world_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        _sum_then_divide(block, world_mesh)
    # the root keeps its parameters gathered after forward (torchtitan's choice: backward needs them first)
    fully_shard(model, mesh=world_mesh, mp_policy=mp, reshard_after_forward=False)
    _sum_then_divide(model, world_mesh)
    setattr(model, _INFO_ATTR, ShardInfo(world, param_dtype, reduce_dtype,
                                         tuple(p for p, _ in named_blocks) + ("",), expert_units))
    return model


def _use_fast_gloo_collectives(unit, group, device_type: str, scratch) -> None:
    """On gloo with CPU tensors, the unit's all-gather and reduce-scatter as broadcasts and reduces
    (moesaic.optim.fsdp_comms); CUDA tensors keep FSDP2's collectives whatever the backend."""
    from .fsdp_comms import BroadcastAllGather, ReduceReduceScatter, uses_gloo

    if device_type == "cpu" and uses_gloo(group, device_type):
        unit.set_custom_all_gather(BroadcastAllGather(scratch))
        unit.set_custom_reduce_scatter(ReduceReduceScatter(scratch))


def shard_info(model: nn.Module) -> Optional[ShardInfo]:
    """What :func:`shard_model` did to ``model``, or None for a model it has not sharded."""
    return getattr(model, _INFO_ATTR, None)


def _grads(parameters) -> List[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    seen, out = set(), []
    for p in parameters:
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        out.append(p.grad)
    return out


def grad_norm(parameters, norm_type: float = 2.0) -> Tensor:
    """The exact global gradient norm of sharded parameters (fp32 scalar, the same on every rank).

    Every parameter must be a ``DTensor`` sharded by :func:`shard_model` when the world has more
    than one rank: each shard is then held once in the world, so one all-reduce of the local sums
    counts every parameter once, whichever mesh (world or expert-data-parallel) it lives on.

    Args:
        parameters: the model's parameters (e.g. ``model.parameters()``); those without a gradient
            are skipped.
        norm_type: 2.0 or ``inf``.
    """
    from torch.distributed.tensor import DTensor

    if norm_type not in (2.0, 2, math.inf):
        raise ValueError(f"norm_type must be 2.0 or math.inf, got {norm_type!r}")
    grads = _grads(parameters)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        for g in grads:
            if not isinstance(g, DTensor):
                raise TypeError(f"a gradient of shape {tuple(g.shape)} is not a DTensor: clip_grad_norm_ counts each "
                                "parameter once only when every parameter is sharded by shard_model")
    device = grads[0].device if grads else torch.device("cpu")
    acc = torch.zeros((), dtype=torch.float32, device=device)
    locals_ = [local_tensor(g).detach() for g in grads]
    locals_ = [t for t in locals_ if t.numel()]
    if locals_:
        # one norm per local shard, read in place and accumulated in fp32 (no squared copy of the gradients)
        norms = torch._foreach_norm(locals_, norm_type, dtype=torch.float32)
        acc = torch.stack(norms).max() if norm_type == math.inf else torch.stack(norms).pow(2).sum()
    if distributed:
        dist.all_reduce(acc, op=dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM)
    return acc if norm_type == math.inf else acc.sqrt()


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scale the gradients so their exact global norm is at most ``max_norm``; returns the norm before clipping.

    As ``torch.nn.utils.clip_grad_norm_`` (same coefficient ``max_norm / (norm + 1e-6)``, clamped
    at 1), over parameters that live on different meshes (see :func:`grad_norm`).
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
    parameters = list(parameters) if not isinstance(parameters, Tensor) else [parameters]
    norm = grad_norm(parameters, norm_type)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in _grads(parameters):
        local_tensor(g).mul_(coef.to(g.dtype))
    return norm
