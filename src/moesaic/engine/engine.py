"""The training engine: ``moesaic.initialize`` in DeepSpeed's shape, MoE-aware from end to end.

``engine(batch)`` runs the model; ``engine.backward(loss)`` scales and backpropagates a
micro-batch; ``engine.step()`` is called after every micro-batch and, at each gradient
accumulation boundary:

1. synchronises gradients (dense over the world, experts over their expert-data-parallel group,
   all to the gradient of the global mean loss; bucketed, once per step);
2. checks every rank for non-finite gradients (fp16: a loss-scale overflow skips the step on every
   rank and lowers the scale; bf16/fp32: the step is skipped with a warning naming the groups);
3. computes one global gradient norm (dense once, each expert once) and the clip coefficient;
4. steps the optimizer group by group (fp32 master weights, one group in full precision at once);
5. advances the LR scheduler and the loss scaler, and records telemetry.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint
from .._checks import check_int
from ..layer.balancing import update_expert_bias
from ..layer.identity import ExpertIndex
from ..layer.moe import iter_moe_modules, setup_expert_parallel
from ..optim.build_groups import build_param_groups
from ..optim.loss_scaler import build_loss_scaler
from ..optim.in_backward import InBackwardStepper, check_in_backward_config
from ..optim.mixed_precision import GroupedMixedPrecisionOptimizer, default_fuse_elems, group_refs
from ..optim.pipeline import StepPipeline
from ..optim.schedulers import build_scheduler
from ..optim.sharding import plan_shards
from ..telemetry import MetricsWriter, MoEStatsAccumulator
from .config import EngineConfig, load_config
from .replicas import sync_replicas


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


class MoEEngine:
    """Wraps a model, its optimizer, scheduler and loss scaler (see module docstring).

    Attributes:
        module: the wrapped model.
        global_steps: optimizer steps taken (skipped steps included, as DeepSpeed counts).
        skipped_steps: steps skipped for non-finite gradients.
        last_metrics: the metrics of the last optimizer step (also written to ``log_dir``); its
            ``"moe"`` figures (tokens per expert, dropped routes, ``l_aux``) cover every rank's tokens,
            every expert by its global number, the same on every rank.
    """

    def __init__(self, model: nn.Module, optimizer: GroupedMixedPrecisionOptimizer, scheduler, config: EngineConfig,
                 log_dir: Optional[str] = None, telemetry_every: int = 1, index: Optional[ExpertIndex] = None) -> None:
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.config = config
        self.loss_scaler = build_loss_scaler(config.fp16) if config.fp16.enabled else None
        self.gradient_accumulation_steps = config.gradient_accumulation_steps
        self.global_steps = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.last_metrics: Dict[str, Any] = {}
        self.index = index if index is not None else ExpertIndex.build(model)
        self._pipeline = StepPipeline(optimizer)
        self._in_backward = InBackwardStepper(optimizer) if config.optimizer_in_backward else None
        self._log_dir = log_dir
        self._losses = []
        self._grad_norm: Optional[float] = None
        self._telemetry_every = telemetry_every
        joined = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if joined else 0
        self.world_size = dist.get_world_size() if joined else 1
        self._moe_stats = MoEStatsAccumulator()
        self._writer = MetricsWriter(log_dir) if (log_dir is not None and self.rank == 0) else None

    # --- DeepSpeed-shaped API -------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if self.module.training:
            self._moe_stats.update(self.module)
        return out

    forward = __call__

    def train(self, mode: bool = True) -> "MoEEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "MoEEngine":
        return self.train(False)

    def parameters(self):
        return self.module.parameters()

    @property
    def loss_scale(self) -> float:
        return float(self.loss_scaler.loss_scale) if self.loss_scaler is not None else 1.0

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next ``step()`` call will update the weights."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss, scaled by ``loss_scale / gradient_accumulation_steps``."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss must be a scalar tensor, got {type(loss).__name__}"
                            f"{'' if not isinstance(loss, torch.Tensor) else ' of shape ' + str(tuple(loss.shape))}")
        self._losses.append(float(loss.detach()))
        if self._in_backward is not None and self.is_gradient_accumulation_boundary():
            self._in_backward.arm(want_stats=self._want_stats())
        (loss.float() * (self.loss_scale / self.gradient_accumulation_steps)).backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self):
        return [g["lr"] * g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        return self._grad_norm

    def step(self) -> None:
        """Count a micro-batch; at an accumulation boundary, update the weights (see module docstring)."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        # 1-4. reduce, check, clip, step group by group, send updated weights (optim/pipeline.py),
        # or, with optimizer_in_backward, step what the backward hooks left (optim/in_backward.py)
        want_stats = self._want_stats()
        if self._in_backward is not None and self._in_backward.armed:
            result = self._in_backward.finish()
        else:
            result = self._pipeline.run(loss_scale=self.loss_scale, clip=self.config.gradient_clipping,
                                        want_stats=want_stats)
        update_expert_bias(self.module, apply=not result.skipped)  # aux-loss-free balancing: after each applied step
        if result.skipped:
            self._skip_step()
            return
        norm, coef = result.norm, result.coef
        self._grad_norm = norm
        # 5. schedules and telemetry
        if self.loss_scaler is not None:
            self.loss_scaler.update_scale(False)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1
        self._record(norm, coef, want_stats)
        self.zero_grad()

    def _want_stats(self) -> bool:
        """Per-group statistics this step? (The same answer on every rank: gathering them is collective.)"""
        return self._log_dir is not None and self.global_steps % self._telemetry_every == 0

    def _skip_step(self) -> None:
        if self.loss_scaler is not None:
            self.loss_scaler.update_scale(True)
        else:
            names = self.optimizer.non_finite_group_names()
            warnings.warn(f"step {self.global_steps}: non-finite gradients (on this rank in groups "
                          f"{names if names else '[none here: another rank]'}); the step is skipped on every rank",
                          RuntimeWarning, stacklevel=3)
        self.skipped_steps += 1
        self.global_steps += 1
        self._grad_norm = float("nan")
        self._record(float("nan"), 0.0, False)
        self.zero_grad()

    def _record(self, norm: float, coef: float, group_stats: bool) -> None:
        if self.world_size > 1:
            self._moe_stats.all_reduce()  # collective: every expert's load over every rank's tokens
        metrics: Dict[str, Any] = {
            "train": {"loss": sum(self._losses) / len(self._losses) if self._losses else float("nan"),
                      "grad_norm": norm, "clip_coef": coef, "lr": self.get_lr()[0],
                      "loss_scale": self.loss_scale, "skipped_steps": self.skipped_steps},
            "moe": self._moe_stats.summary(),
        }
        if group_stats:
            stats = self._pipeline.gather_stats()  # collective: every group once, from its owner
            if stats:
                metrics["group"] = stats
        self._losses = []
        self._moe_stats.reset()
        self.last_metrics = metrics
        if self._writer is not None:
            self._writer.write(self.global_steps, metrics)

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag: Optional[str] = None, client_state: Optional[Dict] = None,
                        model_config: Optional[Dict] = None, keep_last: Optional[int] = None):
        """Save model, optimizer, scheduler, loss scaler, counters and RNG (every rank calls it).

        Returns the checkpoint folder. ``tag`` defaults to ``global_step<N>`` as in DeepSpeed;
        ``client_state`` holds JSON data and tensors (never pickled); ``keep_last=N`` removes all
        but the N newest checkpoints of ``save_dir`` after this one is published (None keeps all).
        """
        if client_state is not None and not isinstance(client_state, dict):
            raise TypeError(f"client_state must be a dict or None, got {type(client_state).__name__}")
        tag = tag if tag is not None else f"global_step{self.global_steps}"
        state = {"global_steps": self.global_steps, "micro_steps": self.micro_steps,
                 "skipped_steps": self.skipped_steps,
                 "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                 "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
                 "config": self.config.to_dict()}
        return checkpoint.save(save_dir, self.module, tag=tag, optimizer=self.optimizer, engine_state=state,
                               client_state=client_state, model_config=model_config, index=self.index,
                               keep_last=keep_last)

    def load_checkpoint(self, load_dir, tag: Optional[str] = None):
        """Load what :meth:`save_checkpoint` wrote, under this run's world and ep sizes.

        Returns ``(folder, client_state)`` as DeepSpeed does. Metrics that an earlier session wrote to
        ``log_dir`` after the checkpoint's step are discarded (CSV rows removed, TensorBoard events
        purged), since those steps are trained again.
        """
        folder, client_state, state = checkpoint.load(load_dir, self.module, tag=tag, optimizer=self.optimizer,
                                                      index=self.index)
        self.global_steps = state.get("global_steps", 0)
        self.micro_steps = state.get("micro_steps", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.lr_scheduler is not None and state.get("scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["scheduler"])
        if self.loss_scaler is not None and state.get("loss_scaler") is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        if self._writer is not None:
            # the steps after the checkpoint will be trained again: their old rows and events go
            self._writer.discard_after(self.global_steps)
        return folder, client_state

    def log_metrics(self, metrics: Dict[str, Any]) -> None:
        """Write extra metrics (e.g. validation loss) at the current step, next to the engine's own."""
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        self.last_metrics.update(metrics)
        if self._writer is not None:
            self._writer.write(self.global_steps, metrics)

    def close(self) -> None:
        """Flush and close the metrics writer."""
        if self._writer is not None:
            self._writer.close()


def initialize(model: nn.Module, model_parameters=None, config=None, *, log_dir: Optional[str] = None,
               telemetry_every: int = 1):
    """Build the engine, in DeepSpeed's shape.

    Args:
        model: the model; MoE layers with ``ep_size > 1`` must already be on their process groups
            (``moesaic.setup_expert_parallel(model)``; done here when the world is initialised).
        model_parameters: None (all parameters), parameters, or param-group dicts.
        config: a dict, or a path to a JSON or TOML file, with DeepSpeed's keys plus ``moe`` (see
            :class:`moesaic.engine.EngineConfig`; the same keys as ``moesaic train``'s ``[engine]``), or
            an EngineConfig.
        log_dir: where rank 0 writes ``metrics.csv`` and TensorBoard events (None: no files; events only
            when the ``tensorboard`` package is installed, else one warning and CSV only).
        telemetry_every: per-group statistics every this many steps (they cost a few norms).

    With several processes, the ranks first compare the engine config and the model's parameter
    layout (a ValueError names every key that differs), then every rank takes rank 0's dense weights
    and each expert's weights from the first rank of its expert-data-parallel group, as DeepSpeed's
    engine does (:mod:`moesaic.engine.replicas`): replicas must start equal for data parallelism,
    and for a checkpoint (one copy of each tensor) to resume them exactly.

    Returns:
        ``(engine, optimizer, None, lr_scheduler)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        raise ValueError("config is required: a dict or a path to a JSON/TOML file")
    check_int(telemetry_every, "telemetry_every", lo=1)
    cfg = load_config(config)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    cfg.check_batch(world)
    if cfg.optimizer_in_backward:
        why = check_in_backward_config(clip=cfg.gradient_clipping, fp16=cfg.fp16.enabled, world_size=world,
                                       stage=cfg.zero_optimization.stage)
        if why is not None:
            raise ValueError(why)
    if world > 1 and any(m.parallel_groups is None for _, m in iter_moe_modules(model)):
        setup_expert_parallel(model)
    if cfg.bf16.enabled:
        model.to(torch.bfloat16)
    elif cfg.fp16.enabled:
        model.to(torch.float16)
    moe = cfg.moe
    index = ExpertIndex.build(model)
    # replicas agree on config and layout, then start from the same weights (replicas.py)
    sync_replicas(index, cfg.to_dict(), _model_device(model))
    groups = build_param_groups(model, model_parameters, split_by=moe.split_by, max_group_size=moe.max_group_size,
                                lr_scale=moe.lr_scale, freeze=moe.freeze_experts, index=index)
    refs = group_refs(groups, index)
    shard = plan_shards([g["name"] for g in groups], refs, index, stage=cfg.zero_optimization.stage)
    optimizer = GroupedMixedPrecisionOptimizer(groups, cfg.optimizer.type, dict(cfg.optimizer.params),
                                               offload=moe.offload, fuse_elems=default_fuse_elems(moe.max_group_size),
                                               index=index, shard=shard)
    scheduler = build_scheduler(optimizer, cfg.scheduler) if cfg.scheduler is not None else None
    engine = MoEEngine(model, optimizer, scheduler, cfg, log_dir=log_dir, telemetry_every=telemetry_every,
                       index=index)
    return engine, optimizer, None, scheduler
