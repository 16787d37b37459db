"""``moesaic.initialize``: DeepSpeed's ``deepspeed.initialize``, argument for argument.

The DeepSpeed side of the call lives here (the arguments, the config dict, the client optimizer
and schedule, the process group, the data loader); steps 3-5 are one call of the core builder,
:func:`moesaic.engine.build_engine`, which takes only typed values. In order:

1. the config: ``config``, its alias ``config_params``, or ``args.deepspeed_config`` (a path);
2. torch.distributed from the torchrun environment when needed (``dist_init_required``);
3. the model: MoE layers named (when DeepSpeed's default names collide) and put on their
   expert-parallel groups, cast to bf16/fp16, moved to the device, and its weights broadcast from
   the first replica (dense from rank 0, each expert within its expert-data-parallel group) so
   every replica starts equal, as DeepSpeed does;
4. the optimizer: the client's (an instance, or a callable given the parameters) translated into
   moesaic's grouped optimizer (:mod:`moesaic.deepspeed.client`), else the config's;
5. the schedule: the client's (an instance, or a callable given the optimizer), else the config's;
6. the data loader of ``training_data``: a ``DistributedSampler`` over the data-parallel ranks,
   the micro batch size, ``collate_fn`` and ``dataloader_drop_last``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_int
from ..engine.build import build_engine, check_zero3
from ..engine.config import EngineConfig
from ..engine.engine import _log
from ..parallel.launch import LaunchEnv
from ..parallel.process_group import init_distributed
from .accessors import link as link_accessors
from .client import ClientOptimizer, class_name
from .config import read_config
from .keys import note_hints_once

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
    return read_config(config)


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


def _check_data(training_data, collate_fn) -> None:
    if training_data is not None and not (isinstance(training_data, torch.utils.data.Dataset) or
                                          (hasattr(training_data, "__getitem__") and hasattr(training_data, "__len__"))):
        raise TypeError(f"training_data must be a torch.utils.data.Dataset, got {type(training_data).__name__}")
    if collate_fn is not None and not callable(collate_fn):
        raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")


def _data_loader(training_data, micro: int, world: int, rank: int, collate_fn, drop_last: bool):
    """DeepSpeed's training loader: a ``DistributedSampler`` over the data-parallel ranks, the micro batch."""
    sampler = None
    if not isinstance(training_data, torch.utils.data.IterableDataset):
        sampler = torch.utils.data.DistributedSampler(training_data, num_replicas=world, rank=rank)
    return torch.utils.data.DataLoader(training_data, batch_size=micro, sampler=sampler, collate_fn=collate_fn,
                                       drop_last=drop_last, pin_memory=torch.cuda.is_available())


def _world_to_be(dist_init_required: Optional[bool]) -> Optional[int]:
    """The world size once ``initialize`` has joined the process group; None when it will not be joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    env = LaunchEnv.from_environ()
    return env.world_size if dist_init_required is not False and env.launched else None


def _follow(model, cfg: EngineConfig, optimizer, model_parameters, raw: dict):
    """The client optimizer (instance or callable) as the group follower the core builder calls for."""
    def follow() -> ClientOptimizer:
        client_opt, params = optimizer, model_parameters
        if "optimizer" in raw:
            warnings.warn("initialize: both a client optimizer and the config's optimizer section were given; the "
                          "client optimizer is used and the config's optimizer section is not (DeepSpeed's "
                          "precedence)", UserWarning, stacklevel=4)
        if not isinstance(client_opt, torch.optim.Optimizer) and callable(client_opt):
            client_opt = client_opt(list(model.parameters()) if params is None else params)
        elif params is not None:
            _check_same_parameters(client_opt, params)
        return ClientOptimizer(client_opt, cfg.zero_optimization.stage)
    return follow


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


def _client_scheduler(raw: dict, lr_scheduler):
    """DeepSpeed's client schedule as the core builder's ``scheduler`` callable, or None (the config's)."""
    if lr_scheduler is None:
        return None

    def build(sched_target):
        if "scheduler" in raw:
            warnings.warn("initialize: both a client lr_scheduler and the config's scheduler section were given; the "
                          "client lr_scheduler is used (DeepSpeed's precedence)", UserWarning, stacklevel=4)
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
    return build


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
            grouped optimizer (:mod:`moesaic.deepspeed.client`). None: the config's ``optimizer``.
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
    _check_data(training_data, collate_fn)
    # 1-2. config and process group
    cfg, raw = _resolve_config(args, config, config_params)
    if cfg.zero_optimization.stage == 3:  # every refusal before any process-group work
        check_zero3(cfg, model, _world_to_be(dist_init_required), optimizer_given=optimizer is not None)
    _init_distributed(dist_init_required, distributed_port)
    initialized = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if initialized else (1, 0)
    local_rank = _local_rank(args)
    if rank == 0:  # DeepSpeed's speed/logging hints: accepted, each noted once per process
        note_hints_once(raw, _log)
    # 3-5. the model, the optimizer (the client's, translated) and the schedule: the core builder
    follow = _follow(model, cfg, optimizer, model_parameters, raw) if optimizer is not None else None
    engine = build_engine(model, cfg, param_groups=model_parameters, follow=follow,
                          scheduler=_client_scheduler(raw, lr_scheduler), local_rank=local_rank, log_dir=log_dir,
                          telemetry_every=telemetry_every)
    if engine.optimizer is not None:
        link_accessors(engine)  # safe_get_full_grad & co. (moesaic's and DeepSpeed's) on its parameters
    # 6. data
    if training_data is not None:
        engine.training_dataloader = _data_loader(training_data, engine.train_micro_batch_size_per_gpu(), world,
                                                  rank, collate_fn, cfg.dataloader_drop_last)
    engine.collate_fn = collate_fn
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


