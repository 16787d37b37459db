"""Build the training engine from a model and an :class:`EngineConfig`: the one path every entry takes.

``moesaic.initialize`` (DeepSpeed's signature, :mod:`moesaic.deepspeed.initialize`) translates its
arguments into one :func:`build_engine` call; ``moesaic train`` calls it directly. The process
group is the caller's: joined before the call, or none (one process). The steps:

1. checks that need the world size: the batch sizes, ``optimizer_in_backward``, sparse embeddings,
   and at ZeRO stage 3 everything FSDP2 cannot honour (:func:`check_zero3`);
2. the model: MoE layers named when their default names collide, put on their expert-parallel
   groups, cast to bf16/fp16, moved to the device; ``replicas.sync_replicas`` checks that every
   rank runs the same config and layout and broadcasts the first replica's weights; the index;
3. the optimizer: parameter groups from the index (``optim/build_groups.py``) over the config's
   update, the given ``param_groups``, or the groups of an outside optimizer the engine follows
   (a :class:`GroupFollower`, made once the model is on its device); at stage 3 the model is
   sharded (EP + FSDP2) and a torch optimizer built over moesaic's named groups;
4. the schedule: ``scheduler(optimizer)`` when given, else the config's;
5. the :class:`~moesaic.engine.engine.MoEEngine`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_int
from ..layer.identity import ExpertIndex
from ..layer.moe import iter_moe_modules, name_moe_layers, setup_expert_parallel
from ..optim.build_groups import build_param_groups
from ..optim.config import MoEOptimConfig, torch_scheduler_class
from ..optim.fsdp import check_shardable, shard_model
from ..optim.in_backward import check_in_backward_config
from ..optim.mixed_precision import GroupedMixedPrecisionOptimizer, default_fuse_elems
from ..optim.schedulers import build_scheduler
from ..optim.sharding import plan_shards
from ..optim.zero3 import Zero3Optimizer, build_zero3_groups
from ..parallel.launch import LaunchEnv, resolve_device
from .config import EngineConfig
from .engine import MoEEngine
from .replicas import sync_replicas


class GroupFollower(Protocol):
    """An outside optimizer whose parameter groups the engine's groups are made from and follow.

    The DeepSpeed bridge's client optimizer (:class:`moesaic.deepspeed.client.ClientOptimizer`) is one.
    """

    opt: Any  #: the outside optimizer (a schedule given as a callable drives it)
    kind: str  #: the update the engine runs: "AdamW", "Adam" or "SGD"

    def param_groups(self, moe: MoEOptimConfig) -> List[Dict[str, Any]]:
        """The groups to build from, each with its hyperparameters and ``client_group`` (its source's number);
        the engine splits each on its own, its MoE groups right after it."""

    def link(self, param_groups: List[Dict[str, Any]]) -> None:
        """Remember (and drop) the ``client_group`` of each of the engine's groups."""

    def sync(self, param_groups: List[Dict[str, Any]]) -> None:
        """Copy hyperparameters changed on the outside optimizer to the engine's groups made from them."""


def check_zero3(cfg: EngineConfig, model: nn.Module, world: Optional[int], *, optimizer_given: bool = False) -> None:
    """What ``zero_optimization.stage`` 3 (FSDP2) cannot honour, refused before any process-group work.

    Args:
        cfg: the engine config (stage 3).
        model: the model to shard.
        world: the number of processes the process group has (or will have once joined); None
            when there is none.
        optimizer_given: an outside optimizer was given (stage 3 builds its own).
    """
    if optimizer_given:
        raise ValueError("zero_optimization.stage=3 builds its own torch optimizer over the sharded parameters from "
                         "the config's optimizer section; pass optimizer=None and set optimizer.type/params")
    if cfg.offload() != "none":
        raise ValueError("zero_optimization.stage=3 with CPU offload (zero_optimization.offload_optimizer.device or "
                         "moe.offload 'cpu') is not supported: FSDP2 keeps the shards on the parameters' device; "
                         "allowed: offload 'none'")
    if not cfg.zero_optimization.reduce_scatter:
        raise ValueError("zero_optimization.reduce_scatter=false with stage=3: FSDP2 always reduce-scatters "
                         "gradients onto their shards; allowed: true")
    if cfg.optimizer is None:
        raise ValueError("zero_optimization.stage=3 needs the config's optimizer section (type and params): the "
                         "engine builds a torch optimizer over the sharded parameters")
    if world is None:
        raise ValueError("zero_optimization.stage=3 shards parameters with torch's FSDP2 and needs torch.distributed: "
                         "call moesaic.init_distributed() before moesaic.initialize (one process started without "
                         "a launcher joins a group of itself alone; several: launch with torchrun), as DeepSpeed "
                         "needs deepspeed.init_distributed()")
    check_shardable(model, world)


def _name_layers(model: nn.Module) -> None:
    """Give MoE layers unique names when their defaults (``ep_size_<n>``) collide: their module paths."""
    names = [m.expert_group_name for _, m in iter_moe_modules(model)]
    if len(names) != len(set(names)):
        name_moe_layers(model)


def _build_optimizer(model, index, cfg: EngineConfig, param_groups, follower: Optional[GroupFollower]):
    """The grouped optimizer over the follower's groups, the given groups, or all parameters (the config's update)."""
    moe, stage = cfg.moe, cfg.zero_optimization.stage
    if follower is not None:
        kind, defaults = follower.kind, {}
        param_groups = follower.param_groups(moe)
    else:
        kind, defaults = cfg.optimizer.update()
    groups = build_param_groups(model, param_groups, index=index, split_by=moe.split_by,
                                max_group_size=moe.max_group_size, lr_scale=moe.lr_scale, freeze=moe.freeze_experts,
                                each_group_apart=follower is not None)
    if follower is not None:
        follower.link(groups)
    shard = plan_shards([g["name"] for g in groups], [g["params"] for g in groups], index, stage=stage)
    return GroupedMixedPrecisionOptimizer(groups, kind, defaults, offload=cfg.offload(),
                                          fuse_elems=default_fuse_elems(moe.max_group_size), index=index, shard=shard)


def _build_zero3(model: nn.Module, cfg: EngineConfig, param_groups=None):
    """Shard the model (EP + FSDP2) and build the torch optimizer over moesaic's named groups; the index of
    the sharded model (FSDP2 made new Parameter objects) goes with it to the engine.

    ``param_groups`` (the caller's base groups, e.g. weight decay on matrices only) are kept
    by parameter name across the sharding, which replaces every parameter object.
    """
    base = None
    if param_groups is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        items = list(param_groups)
        groups_in = items if items and isinstance(items[0], dict) else [{"params": items}]
        base = []
        for gi, g in enumerate(groups_in):
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError(f"param_groups[{gi}] must be a dict with 'params' (or pass a list of tensors)")
            params = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
            missing = [tuple(p.shape) for p in params if id(p) not in names]
            if missing:
                raise ValueError(f"param_groups[{gi}] holds tensors of shapes {missing[:3]} that are not "
                                 "parameters of the model")
            base.append({**g, "params": [names[id(p)] for p in params]})
    param_dtype = torch.bfloat16 if cfg.bf16.enabled else torch.float16 if cfg.fp16.enabled else None
    shard_model(model, param_dtype=param_dtype, reduce_dtype=torch.float32,
                reshard_after_forward=cfg.zero_optimization.reshard_after_forward,
                use_data_before_expert_parallel_=cfg.use_data_before_expert_parallelism)
    index = ExpertIndex.build(model)  # FSDP2 made new Parameter objects
    if base is not None:
        by_name = dict(model.named_parameters())
        base = [{**g, "params": [by_name[n] for n in g["params"]]} for g in base]
    moe = cfg.moe
    groups = build_zero3_groups(model, index, split_by=moe.split_by, lr_scale=moe.lr_scale,
                                freeze=moe.freeze_experts, base=base)
    kind, defaults = cfg.optimizer.update()
    return Zero3Optimizer(groups, kind, defaults, index=index), index


def config_scheduler(cfg: EngineConfig, optimizer):
    """The config's learning-rate schedule on ``optimizer`` (torch's class or moesaic's), or None without one."""
    if cfg.scheduler is None:
        return None
    torch_cls = torch_scheduler_class(cfg.scheduler.type)
    if torch_cls is not None:
        return torch_cls(optimizer, **cfg.scheduler.params)
    return build_scheduler(optimizer, cfg.scheduler)


def build_engine(model: nn.Module, config: EngineConfig, *, param_groups=None,
                 follow: Optional[Callable[[], GroupFollower]] = None,
                 scheduler: Optional[Callable[[Any], Any]] = None, local_rank: Optional[int] = None,
                 log_dir: Optional[str] = None, telemetry_every: int = 1) -> MoEEngine:
    """The engine for ``model`` under ``config`` (see the module docstring for the steps).

    Args:
        model: the model; its MoE layers are put on their process groups, cast and moved here.
        config: the checked engine config (``check_complete`` is called again).
        param_groups: parameters or param-group dicts to optimise (None: all of the model's);
            ignored when ``follow`` is given.
        follow: called once the model is on its device, returns the :class:`GroupFollower` whose
            groups and update the optimizer is built from (None: the config's ``optimizer``).
        scheduler: given the optimizer to drive (the follower's, else the engine's), returns the
            schedule; None: the config's ``scheduler`` section.
        local_rank: this process's GPU on its node; None: ``LOCAL_RANK`` (0 without a launcher).
        log_dir: where rank 0 writes TensorBoard events and ``metrics.csv``.
        telemetry_every: per-group statistics every this many steps.

    Returns:
        The :class:`~moesaic.engine.engine.MoEEngine`; its ``optimizer`` and ``lr_scheduler`` are
        the ones built here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    if follow is not None and not callable(follow):
        raise TypeError(f"follow must be None or a callable returning the followed optimizer, got "
                        f"{type(follow).__name__}")
    if scheduler is not None and not callable(scheduler):
        raise TypeError(f"scheduler must be None or a callable taking the optimizer, got {type(scheduler).__name__}")
    check_int(telemetry_every, "telemetry_every", lo=1)
    if local_rank is None:
        local_rank = LaunchEnv.from_environ().local_rank
    check_int(local_rank, "local_rank", lo=0)
    cfg = config
    cfg.check_complete()
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    stage3 = cfg.zero_optimization.stage == 3
    if stage3:
        check_zero3(cfg, model, world if initialized else None, optimizer_given=follow is not None)
    batch = cfg.check_batch(world)
    if cfg.optimizer_in_backward:
        why = check_in_backward_config(clip=cfg.gradient_clipping, fp16=cfg.fp16.enabled, world_size=world,
                                       stage=cfg.zero_optimization.stage)
        if why is not None:
            raise ValueError(why)
    if any(isinstance(m, nn.Embedding) and m.sparse for m in model.modules()):
        raise ValueError("the model has an nn.Embedding with sparse=True; moesaic reduces dense gradients only: "
                         "build it with sparse=False")
    # the model
    _name_layers(model)
    if world > 1 and any(m.parallel_groups is None for _, m in iter_moe_modules(model)):
        setup_expert_parallel(model, cfg.use_data_before_expert_parallelism)
    if stage3:
        pass  # fp32 parameters: the sharded masters; FSDP2 computes in bf16/fp16 (optim/fsdp.py)
    elif cfg.bf16.enabled:
        model.to(torch.bfloat16)
    elif cfg.fp16.enabled:
        model.to(torch.float16)
    device = resolve_device("auto", local_rank)
    model.to(device)
    index = ExpertIndex.build(model)
    # replicas agree on config and layout, then start from the same weights (replicas.py)
    sync_replicas(index, cfg.to_dict(), device)
    # optimizer and schedule
    follower = None
    if stage3:
        opt, index = _build_zero3(model, cfg, param_groups)
    else:
        follower = follow() if follow is not None else None
        opt = _build_optimizer(model, index, cfg, param_groups, follower)
    target = follower.opt if follower is not None else opt
    sched = scheduler(target) if scheduler is not None else config_scheduler(cfg, target)
    if follower is not None:
        follower.sync(opt.param_groups)  # the lrs a schedule has just written
    return MoEEngine(model, opt, sched, cfg, batch=batch, device=device, local_rank=local_rank, log_dir=log_dir,
                     telemetry_every=telemetry_every, index=index, client=follower)
