"""``moesaic.initialize``: DeepSpeed's ``deepspeed.initialize``, argument for argument.

1. the config: ``config``, its alias ``config_params``, or ``args.deepspeed_config`` (a path);
2. torch.distributed from the torchrun environment when needed (``dist_init_required``);
3. the model: MoE layers named (when DeepSpeed's default names collide) and put on their
   expert-parallel groups, cast to bf16/fp16, moved to the device, and its weights broadcast from
   the first replica (dense from rank 0, each expert within its expert-data-parallel group) so
   every replica starts equal, as DeepSpeed does;
4. the optimizer: the client's (an instance, or a callable given the parameters) translated into
   moesaic's grouped optimizer (:mod:`moesaic.engine.client`), else the config's;
5. the schedule: the client's (an instance, or a callable given the optimizer), else the config's;
6. the data loader of ``training_data``: a ``DistributedSampler`` over the data-parallel ranks,
   the micro batch size, ``collate_fn`` and ``dataloader_drop_last``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_int
from .._config import load_source
from ..layer.identity import ExpertIndex
from ..layer.moe import iter_moe_modules, name_moe_layers, setup_expert_parallel
from ..optim.build_groups import build_param_groups
from ..optim.in_backward import check_in_backward_config
from ..optim.mixed_precision import GroupedMixedPrecisionOptimizer, default_fuse_elems
from ..optim.schedulers import build_scheduler
from ..optim.config import torch_scheduler_class
from ..optim.fsdp import check_shardable, shard_model
from ..optim.sharding import plan_shards
from ..optim.zero3 import Zero3Optimizer, build_zero3_groups
from ..parallel.launch import LaunchEnv, resolve_device
from ..parallel.process_group import init_distributed
from .client import ClientOptimizer, class_name
from .replicas import sync_replicas
from .config import EngineConfig
from .deepspeed_keys import note_hints_once
from .engine import MoEEngine, _log

TORCH_DISTRIBUTED_DEFAULT_PORT = 29500  # DeepSpeed's default for distributed_port


def _resolve_config(args, config, config_params) -> Tuple[EngineConfig, dict]:
    """The engine config and the raw mapping it came from (to see which sections were given)."""
    if config is None and config_params is not None:
        config = config_params
    path = getattr(args, "deepspeed_config", None) if args is not None else None
    if path is None and args is not None:
        path = getattr(args, "deepscale_config", None)
    if path is not None:
        if config is not None:
            raise ValueError("the config was given twice: args.deepspeed_config and config (or config_params); "
                             "pass one of them")
        config = path
    if config is None:
        raise ValueError("config is required: pass config= (a dict or a path to a JSON/TOML file), config_params=, "
                         "or args with deepspeed_config")
    if isinstance(config, EngineConfig):
        config.check_complete()
        return config, config.to_dict()
    raw = load_source(config, "a dict, a path to a .json/.toml file or an EngineConfig")
    cfg = EngineConfig.from_dict(raw)
    cfg.check_complete()
    return cfg, raw


def _init_distributed(dist_init_required: Optional[bool], distributed_port: int) -> None:
    """DeepSpeed's rule: None initialises from the launcher's environment when needed, True insists, False never."""
    if dist_init_required is not None and not isinstance(dist_init_required, bool):
        raise TypeError(f"dist_init_required must be None or a bool, got {type(dist_init_required).__name__}")
    initialized = dist.is_available() and dist.is_initialized()
    if dist_init_required is False or initialized:
        return
    env = LaunchEnv.from_environ()  # the one place the launcher's variables are read
    if dist_init_required is None and not env.launched:
        return  # one process, no launcher: nothing to join
    if not env.launched:
        raise RuntimeError("dist_init_required=True but RANK and WORLD_SIZE are not set; launch with torchrun "
                           "(or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    init_distributed(env=env, default_port=distributed_port, timeout_s=1800.0)  # DeepSpeed's default 30 min


def _local_rank(args) -> int:
    env = LaunchEnv.from_environ()
    given = getattr(args, "local_rank", None) if args is not None else None
    if given is not None and given >= 0 and env.launched and given != env.local_rank:
        raise ValueError(f"args.local_rank ({given}) != the LOCAL_RANK environment variable ({env.local_rank}); "
                         "the launcher sets LOCAL_RANK, leave args.local_rank to it")
    return given if given is not None and given >= 0 else env.local_rank


def _name_layers(model: nn.Module) -> None:
    """Give MoE layers unique names when DeepSpeed's defaults (``ep_size_<n>``) collide: their module paths."""
    names = [m.expert_group_name for _, m in iter_moe_modules(model)]
    if len(names) != len(set(names)):
        name_moe_layers(model)


def _data_loader(training_data, micro: int, world: int, rank: int, collate_fn, drop_last: bool):
    """DeepSpeed's training loader: a ``DistributedSampler`` over the data-parallel ranks, the micro batch."""
    if not (isinstance(training_data, torch.utils.data.Dataset) or
            (hasattr(training_data, "__getitem__") and hasattr(training_data, "__len__"))):
        raise TypeError(f"training_data must be a torch.utils.data.Dataset, got {type(training_data).__name__}")
    if collate_fn is not None and not callable(collate_fn):
        raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
    sampler = None
    if not isinstance(training_data, torch.utils.data.IterableDataset):
        sampler = torch.utils.data.DistributedSampler(training_data, num_replicas=world, rank=rank)
    return torch.utils.data.DataLoader(training_data, batch_size=micro, sampler=sampler, collate_fn=collate_fn,
                                       drop_last=drop_last, pin_memory=torch.cuda.is_available())


def _build_optimizer(model, index, cfg: EngineConfig, optimizer, model_parameters, raw: dict):
    """moesaic's optimizer from the client's (instance or callable) or the config's; the client link or None."""
    moe, stage = cfg.moe, cfg.zero_optimization.stage
    client = None
    if optimizer is not None:
        if "optimizer" in raw:
            warnings.warn("initialize: both a client optimizer and the config's optimizer section were given; the "
                          "client optimizer is used and the config's optimizer section is not (DeepSpeed's "
                          "precedence)", UserWarning, stacklevel=3)
        if not isinstance(optimizer, torch.optim.Optimizer) and callable(optimizer):
            params = list(model.parameters()) if model_parameters is None else model_parameters
            optimizer = optimizer(params)
        elif model_parameters is not None:
            _check_same_parameters(optimizer, model_parameters)
        client = ClientOptimizer(optimizer, stage)
        kind, defaults = client.kind, {}
        model_parameters = client.base_groups()
    else:
        kind, defaults = cfg.optimizer.update()
    groups = build_param_groups(model, model_parameters, index=index, split_by=moe.split_by,
                                max_group_size=moe.max_group_size, lr_scale=moe.lr_scale, freeze=moe.freeze_experts,
                                each_group_apart=client is not None)
    if client is not None:
        client.link(groups)
    shard = plan_shards([g["name"] for g in groups], [g["params"] for g in groups], index, stage=stage)
    opt = GroupedMixedPrecisionOptimizer(groups, kind, defaults, offload=cfg.offload(),
                                         fuse_elems=default_fuse_elems(moe.max_group_size), index=index, shard=shard)
    return opt, client


def _check_zero3(cfg: EngineConfig, model: nn.Module, optimizer, dist_init_required) -> None:
    """What zero_optimization.stage 3 (FSDP2) cannot honour, refused before any process-group work."""
    if optimizer is not None:
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
    launched = dist.is_available() and dist.is_initialized()
    env = LaunchEnv.from_environ()
    if not launched and (dist_init_required is False or not env.launched):
        raise ValueError("zero_optimization.stage=3 shards parameters with torch's FSDP2 and needs torch.distributed: "
                         "launch with torchrun (one process is fine) or initialise the process group first")
    world = dist.get_world_size() if launched else env.world_size
    check_shardable(model, world)


def _build_zero3(model: nn.Module, cfg: EngineConfig):
    """Shard the model (EP + FSDP2) and build the torch optimizer over moesaic's named groups; the index of
    the sharded model (FSDP2 made new Parameter objects), which the engine keeps."""
    param_dtype = torch.bfloat16 if cfg.bf16.enabled else torch.float16 if cfg.fp16.enabled else None
    shard_model(model, param_dtype=param_dtype, reduce_dtype=torch.float32,
                use_data_before_expert_parallel_=cfg.use_data_before_expert_parallelism)
    index = ExpertIndex.build(model)  # FSDP2 made new Parameter objects
    moe = cfg.moe
    groups = build_zero3_groups(model, index, split_by=moe.split_by, lr_scale=moe.lr_scale,
                                freeze=moe.freeze_experts)
    kind, defaults = cfg.optimizer.update()
    return Zero3Optimizer(groups, kind, defaults), index


def _check_same_parameters(optimizer, model_parameters) -> None:
    """DeepSpeed ignores model_parameters when given an optimizer; moesaic checks they say the same thing."""
    items = list(model_parameters)
    given = {id(p) for x in items for p in (x["params"] if isinstance(x, dict) else [x])
             if isinstance(p, torch.Tensor)}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if given != held:
        raise ValueError(f"model_parameters and the client optimizer hold different parameters ({len(given)} vs "
                         f"{len(held)} tensors); with a client optimizer its groups decide: pass "
                         "model_parameters=None, or the same parameters")


def _build_scheduler(cfg: EngineConfig, raw: dict, lr_scheduler, sched_target):
    if lr_scheduler is not None:
        if "scheduler" in raw:
            warnings.warn("initialize: both a client lr_scheduler and the config's scheduler section were given; the "
                          "client lr_scheduler is used (DeepSpeed's precedence)", UserWarning, stacklevel=3)
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            if lr_scheduler.optimizer is not sched_target:
                raise ValueError("lr_scheduler drives another optimizer than the client optimizer given to "
                                 "initialize; build it on that optimizer (or pass a callable taking the optimizer)")
            return lr_scheduler
        if hasattr(lr_scheduler, "step") and hasattr(lr_scheduler, "state_dict"):
            return lr_scheduler  # a scheduler object of the user's own making
        if callable(lr_scheduler):
            return lr_scheduler(sched_target)
        raise TypeError(f"lr_scheduler must be a scheduler (with step() and state_dict()) or a callable taking the "
                        f"optimizer, got {class_name(lr_scheduler)}")
    if cfg.scheduler is None:
        return None
    torch_cls = torch_scheduler_class(cfg.scheduler.type)
    if torch_cls is not None:
        return torch_cls(sched_target, **cfg.scheduler.params)
    return build_scheduler(sched_target, cfg.scheduler)


def initialize(args: Any = None, model: Optional[nn.Module] = None, optimizer: Any = None, model_parameters=None,
               training_data=None, lr_scheduler: Any = None, distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT,
               mpu: Any = None, dist_init_required: Optional[bool] = None, collate_fn: Optional[Callable] = None,
               config=None, mesh_param: Any = None, config_params=None, *, log_dir: Optional[str] = None,
               telemetry_every: int = 1):
    """Build the engine: ``deepspeed.initialize``'s arguments and return value (see module docstring).

    Args:
        args: an object with ``deepspeed_config`` (a config path) and optionally ``local_rank``.
        model: the model (required).
        optimizer: a ``torch.optim.Optimizer`` (Adam, AdamW, SGD; DeepSpeed's FusedAdam) or a callable
            taking the parameters and returning one; its groups and hyperparameters drive moesaic's
            grouped optimizer (:mod:`moesaic.engine.client`). None: the config's ``optimizer``.
        model_parameters: parameters or param-group dicts to optimise (None: all of the model's).
        training_data: a dataset; the returned loader samples it over the data-parallel ranks.
        lr_scheduler: a scheduler on the client optimizer, or a callable taking the optimizer.
        distributed_port: MASTER_PORT when torch.distributed is initialised here and none is set.
        mpu: must be None: moesaic has no tensor or pipeline parallelism.
        dist_init_required: None initialises torch.distributed from the torchrun environment when
            it is set and not yet done; True requires it; False never initialises.
        collate_fn: the loader's collate function.
        config: a dict, or a path to a JSON or TOML file, with DeepSpeed's keys plus ``moe``
            (:class:`~moesaic.engine.EngineConfig`), or an EngineConfig.
        mesh_param: must be None: moesaic has no sequence parallelism.
        config_params: DeepSpeed's alias of ``config``.
        log_dir: keyword-only; where rank 0 writes TensorBoard events and ``metrics.csv``.
        telemetry_every: keyword-only; per-group statistics every this many steps.

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)``; the loader is None without
        ``training_data``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (deepspeed.initialize requires a model), got "
                        f"{type(model).__name__}")
    if mpu is not None:
        raise ValueError("mpu is not supported: moesaic has no tensor or pipeline parallelism (experts are expert "
                         "parallel, everything else data parallel); pass mpu=None")
    if mesh_param is not None:
        raise ValueError("mesh_param is not supported: moesaic has no sequence parallelism; pass mesh_param=None")
    check_int(distributed_port, "distributed_port", lo=1, hi=65535)
    check_int(telemetry_every, "telemetry_every", lo=1)
    # 1-2. config and process group
    cfg, raw = _resolve_config(args, config, config_params)
    stage3 = cfg.zero_optimization.stage == 3
    if stage3:  # every refusal before any process-group work
        _check_zero3(cfg, model, optimizer, dist_init_required)
    _init_distributed(dist_init_required, distributed_port)
    initialized = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if initialized else (1, 0)
    local_rank = _local_rank(args)
    if rank == 0:  # DeepSpeed's speed/logging hints: accepted, each noted once per process
        note_hints_once(raw, _log)
    batch = cfg.check_batch(world)
    if cfg.optimizer_in_backward:
        why = check_in_backward_config(clip=cfg.gradient_clipping, fp16=cfg.fp16.enabled, world_size=world,
                                       stage=cfg.zero_optimization.stage)
        if why is not None:
            raise ValueError(why)
    if any(isinstance(m, nn.Embedding) and m.sparse for m in model.modules()):
        raise ValueError("the model has an nn.Embedding with sparse=True; moesaic reduces dense gradients only: "
                         "build it with sparse=False")
    # 3. the model
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
    # 4-5. optimizer and schedule
    if stage3:
        (opt, index), client = _build_zero3(model, cfg), None
    else:
        opt, client = _build_optimizer(model, index, cfg, optimizer, model_parameters, raw)
    scheduler = _build_scheduler(cfg, raw, lr_scheduler, client.opt if client is not None else opt)
    if client is not None:
        client.sync(opt.param_groups)  # the lrs a schedule has just written
    # 6. data
    loader = None
    if training_data is not None:
        loader = _data_loader(training_data, batch[1], world, rank, collate_fn, cfg.dataloader_drop_last)
    engine = MoEEngine(model, opt, scheduler, cfg, batch=batch, device=device, local_rank=local_rank,
                       log_dir=log_dir, telemetry_every=telemetry_every, index=index, client=client,
                       training_dataloader=loader, collate_fn=collate_fn)
    return engine, opt, loader, scheduler


INITIALIZE_PARAMETERS = tuple(inspect.signature(initialize).parameters)
