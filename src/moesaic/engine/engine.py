"""The training engine: DeepSpeed's ``DeepSpeedEngine`` surface, MoE-aware from end to end.

``engine(batch)`` runs the model; ``engine.backward(loss)`` scales and backpropagates a
micro-batch; ``engine.step()`` is called after every micro-batch. At each gradient accumulation
boundary:

1. ``backward`` synchronises gradients at its end (dense over the world, experts over their
   expert-data-parallel group, all to the gradient of the global mean loss; bucketed), so the
   gradients read between ``backward`` and ``step`` are the averaged ones, as in DeepSpeed;
   with ``zero_optimization.overlap_comm`` the buckets are reduced while backward still runs
   (:mod:`moesaic.optim.overlap`), with the same result;
2. ``step`` checks every rank for non-finite gradients (fp16: a loss-scale overflow skips the
   step on every rank and lowers the scale; bf16/fp32: the step is skipped with a warning naming
   the groups);
3. computes one global gradient norm (dense once, each expert once) and the clip coefficient;
4. steps the optimizer group by group (fp32 master weights, one group in full precision at once),
   the owners' updated weights reaching the other replicas at ZeRO stages 1-2;
5. advances the LR scheduler (not on a skipped step) and the loss scaler, counts
   ``global_steps``/``global_samples``, logs every ``steps_per_print`` steps on rank 0, and
   records telemetry.

Like DeepSpeed's engine it is an ``nn.Module`` holding the model as ``module`` (so
``engine.parameters()`` are the model's and ``engine.state_dict()`` keys start with ``module.``)
and attributes it does not have are looked up on the model (``engine.moe_1`` is
``engine.module.moe_1``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint
from ..checkpoint.directory import read_pointer
from ..layer.balancing import update_expert_bias
from ..layer.identity import ExpertIndex, require_index
from ..optim.in_backward import InBackwardStepper
from ..optim.loss_scaler import build_loss_scaler
from ..optim.mixed_precision import GroupedMixedPrecisionOptimizer
from ..optim.overlap import OverlappedReducer
from ..optim.pipeline import StepPipeline
from ..optim.zero3 import Zero3Pipeline
from ..parallel.collectives import DEFAULT_BUCKET_ELEMS
from ..telemetry import MetricsWriter, MoEStatsAccumulator
from ..telemetry.flops import FlopsProfiler
from . import resume
from .config import EngineConfig

_LOG = logging.getLogger("moesaic.engine")


def _log(message: str) -> None:
    """Rank 0's progress lines, on stdout like DeepSpeed's (silence them through the ``moesaic.engine`` logger)."""
    if not _LOG.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[moesaic] %(message)s"))
        _LOG.addHandler(handler)
        _LOG.setLevel(logging.INFO)
        _LOG.propagate = False
    _LOG.info(message)


class _Timers:
    """forward / backward / step wall-clock milliseconds, summed until the next report (wall_clock_breakdown)."""

    NAMES = ("forward", "backward", "step")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.total = {n: 0.0 for n in self.NAMES}
        self.count = {n: 0 for n in self.NAMES}

    @contextlib.contextmanager
    def time(self, name: str):
        if not self.enabled:
            yield
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.total[name] += (time.perf_counter() - start) * 1e3
            self.count[name] += 1

    def report(self) -> str:
        parts = [f"{n}: {self.total[n] / max(self.count[n], 1):.2f}" for n in self.NAMES]
        self.total = {n: 0.0 for n in self.NAMES}
        self.count = {n: 0 for n in self.NAMES}
        return "time (ms) | " + " | ".join(parts)


class MoEEngine(nn.Module):
    """Wraps a model, its optimizer, scheduler and loss scaler (see module docstring); built by ``initialize``.

    Attributes (DeepSpeed's names and meanings):
        module: the wrapped model.
        optimizer: the :class:`GroupedMixedPrecisionOptimizer` (a ``torch.optim.Optimizer``).
        lr_scheduler: the schedule (config, client instance or client callable), or None.
        training_dataloader: the loader made from ``initialize(training_data=...)``, or None.
        global_steps: optimizer steps taken (skipped steps included, as DeepSpeed counts).
        global_samples: samples consumed, ``train_batch_size()`` per optimizer step.
        micro_steps: micro-batches stepped.
        skipped_steps: steps skipped for non-finite gradients.
        local_rank / global_rank / world_size / dp_world_size: this process and the data-parallel world.
        device: where the model lives (``cuda:<local_rank>`` when CUDA is present, else CPU).
        last_metrics: the metrics of the last optimizer step (also written to ``log_dir``); its
            ``"moe"`` figures (tokens per expert, dropped routes, ``l_aux``) cover every rank's tokens,
            every expert by its global number, the same on every rank.
        index: the model's :class:`ExpertIndex`, built once by ``initialize`` and passed in.
    """

    def __init__(self, model: nn.Module, optimizer: GroupedMixedPrecisionOptimizer, scheduler, config: EngineConfig,
                 *, batch: Tuple[int, int, int], device: torch.device, index: ExpertIndex,
                 local_rank: int = 0, log_dir: Optional[str] = None, telemetry_every: int = 1, client=None,
                 training_dataloader=None, collate_fn=None) -> None:
        super().__init__()
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.config = config
        self.training_dataloader = training_dataloader
        self.collate_fn = collate_fn
        self._client = client
        self._batch = batch
        self.device = device
        self.local_rank = local_rank
        initialized = dist.is_available() and dist.is_initialized()
        self.global_rank = dist.get_rank() if initialized else 0
        self.world_size = dist.get_world_size() if initialized else 1
        self.dp_world_size = self.world_size  # no tensor or pipeline parallelism: every rank is data parallel
        self.mp_world_size = 1
        self.rank = self.global_rank
        self.loss_scaler = build_loss_scaler(config.fp16) if config.fp16.enabled else None
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.sparse_tensor_module_names = set()  # sparse gradients are refused (config sparse_gradients)
        self.last_metrics: Dict[str, Any] = {}
        self.index = require_index(index, "MoEEngine(index=...)")
        zero = config.zero_optimization
        if zero.stage == 3:  # FSDP2 reduces in backward; the boundary step is optim/zero3.py's
            self._pipeline = Zero3Pipeline(optimizer, model)
        else:
            self._pipeline = StepPipeline(optimizer, bucket_elems=zero.reduce_bucket_size or DEFAULT_BUCKET_ELEMS,
                                          broadcast_bucket_elems=zero.allgather_bucket_size,
                                          reduce_scatter=zero.reduce_scatter)
        self._in_backward = InBackwardStepper(optimizer) if config.optimizer_in_backward else None
        prof = config.flops_profiler
        self._flops = (FlopsProfiler(model, module_depth=prof.module_depth, top_modules=prof.top_modules,
                                     detailed=prof.detailed) if prof.enabled else None)
        self._flops_profiled = False
        # overlap_comm: buckets reduced during the boundary's backward (nothing to reduce on one process)
        self._overlap = (OverlappedReducer(optimizer, model, reduce_scatter=zero.reduce_scatter,
                                           bucket_elems=zero.reduce_bucket_size or DEFAULT_BUCKET_ELEMS)
                         if zero.overlap_comm and zero.stage != 3 and optimizer is not None  # FSDP2 overlaps itself
                         and optimizer.shard is not None
                         and optimizer.shard.world_size > 1 else None)
        self._log_dir = log_dir
        self._losses: List[float] = []
        self._global_grad_norm: Optional[float] = None
        self._step_applied = False
        self._boundary_override: Optional[bool] = None
        self._inside_no_sync = False
        self._reduced = False
        self._telemetry_every = telemetry_every
        self._timers = _Timers(config.wall_clock_breakdown)
        self._moe_stats = MoEStatsAccumulator()
        self._writer = MetricsWriter(log_dir) if (log_dir is not None and self.global_rank == 0) else None

    def __getattr__(self, name: str):
        """Attributes the engine does not have are the model's, as in DeepSpeed (``engine.moe_1``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is not None and name != "module":
                try:
                    return getattr(module, name)
                except AttributeError:
                    pass
            raise AttributeError(f"{type(self).__name__} and its module {type(module).__name__} have no "
                                 f"attribute {name!r}") from None

    # --- batch sizes and flags (DeepSpeed's methods) ---------------------------------------------
    def train_batch_size(self) -> int:
        """Samples per optimizer step over all ranks: micro batch x accumulation steps x data-parallel ranks."""
        return self._batch[0]

    def train_micro_batch_size_per_gpu(self) -> int:
        """Samples per rank per forward/backward."""
        return self._batch[1]

    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self._batch[2]

    def zero_optimization(self) -> bool:
        return self.config.zero_optimization.stage > 0

    def zero_optimization_stage(self) -> int:
        return self.config.zero_optimization.stage

    def zero_optimization_partition_gradients(self) -> bool:
        return self.config.zero_optimization.stage >= 2

    def fp16_enabled(self) -> bool:
        return self.config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self.config.bf16.enabled

    bf16_enabled = bfloat16_enabled

    def gradient_clipping(self) -> float:
        return self.config.gradient_clipping

    def steps_per_print(self) -> Optional[int]:
        return self.config.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        return self.config.wall_clock_breakdown

    def optimizer_name(self) -> str:
        """The client optimizer's class name, else the config's optimizer type (DeepSpeed's answer)."""
        return type(self._client.opt).__name__ if self._client is not None else self.config.optimizer.type

    def scheduler_name(self) -> Optional[str]:
        return self.config.scheduler.type if self.config.scheduler is not None else None

    def get_data_parallel_rank(self) -> int:
        return self.global_rank

    def get_model_parallel_rank(self) -> int:
        return 0

    @property
    def loss_scale(self) -> float:
        """The current loss scale (fp16; 1.0 otherwise)."""
        return float(self.loss_scaler.loss_scale) if self.loss_scaler is not None else 1.0

    # --- forward and backward ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        counting = self._flops is not None and self.module.training
        with self._timers.time("forward"), (self._flops.forward(self._batch[1], timed=self._profile_step())
                                            if counting else contextlib.nullcontext()):
            out = self.module(*args, **kwargs)
        if self.module.training:
            self._moe_stats.update(self.module)
        return out

    def train(self, mode: bool = True) -> "MoEEngine":
        self.training = mode
        self.module.train(mode)
        return self

    def eval(self) -> "MoEEngine":
        return self.train(False)

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the current micro-batch ends an accumulation: its backward reduces and ``step()`` updates."""
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Say whether the next micro-batch ends an accumulation (overrides the count until reset with None)."""
        if is_boundary is not None and not isinstance(is_boundary, bool):
            raise TypeError(f"is_boundary must be a bool (or None to count micro-batches again), got "
                            f"{type(is_boundary).__name__}: {is_boundary!r}")
        self._boundary_override = is_boundary

    @contextlib.contextmanager
    def no_sync(self):
        """Skip the gradient reduction of the backward passes inside (DeepSpeed's; ZeRO stages 0-1 only)."""
        if self.zero_optimization_partition_gradients():
            raise RuntimeError(f"no_sync() is incompatible with zero_optimization.stage="
                               f"{self.zero_optimization_stage()}: stage 2 reduces each gradient onto its owner")
        if self._inside_no_sync:
            raise RuntimeError("no_sync() cannot be re-entered")
        self._inside_no_sync = True
        try:
            yield
        finally:
            self._inside_no_sync = False

    def _check_optimizer(self, what: str) -> None:
        if self.optimizer is None:
            raise RuntimeError(f"{what} needs an optimizer: pass optimizer= to initialize or set the config's "
                               "optimizer section")

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backpropagate one micro-batch's loss, scaled by the loss scale and ``1 / gradient_accumulation_steps``.

        At an accumulation boundary (outside ``no_sync``) the gradients are then reduced over the
        data-parallel ranks. Returns the loss divided by the accumulation steps (as DeepSpeed).
        """
        self._check_optimizer("backward()")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss must be a scalar tensor, got {type(loss).__name__}"
                            f"{'' if not isinstance(loss, torch.Tensor) else ' of shape ' + str(tuple(loss.shape))}")
        gas = self.gradient_accumulation_steps() if scale_wrt_gas else 1
        self._losses.append(float(loss.detach()))
        boundary = self.is_gradient_accumulation_boundary()
        with self._timers.time("backward"):
            if self._in_backward is not None and boundary:
                self._in_backward.arm(want_stats=self._want_stats())
            if self.config.zero_optimization.stage == 3:
                self.module.set_requires_gradient_sync(boundary)  # FSDP2: reduce-scatter at the boundary only
            reduce = boundary and not self._inside_no_sync and self._in_backward is None
            overlap = reduce and self._overlap is not None
            if overlap:
                self._overlap.arm()
            try:
                with self._flops.backward() if self._flops is not None else contextlib.nullcontext():
                    (loss.float() * (self.loss_scale / gas)).backward(retain_graph=retain_graph)
            except BaseException:
                if overlap:
                    self._overlap.abandon()
                raise
            if overlap:
                self._overlap.finish()
                self._reduced = True
            elif reduce:
                self._pipeline.reduce()
                self._reduced = True
        return loss.detach() / gas

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- step -------------------------------------------------------------------------------------
    def get_lr(self) -> List[float]:
        """The ``lr`` of every group of ``engine.optimizer`` (moesaic's groups; see ``moe.lr_scale`` for scaling)."""
        if self.optimizer is None:
            return []
        if self._client is not None:
            self._client.sync(self.optimizer.param_groups)
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_mom(self) -> List[Any]:
        """``betas`` (Adam, AdamW) or ``momentum`` (SGD) of every group, as DeepSpeed reports them."""
        key = "momentum" if self.optimizer.kind == "SGD" else "betas"
        return [g[key] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last step (nan when it was skipped; None before the first)."""
        return self._global_grad_norm

    def was_step_applied(self) -> bool:
        """Whether the last ``step()`` updated the weights (False between boundaries and on skipped steps)."""
        return self._step_applied

    def step(self, lr_kwargs: Optional[Dict[str, Any]] = None) -> None:
        """Count a micro-batch; at an accumulation boundary, update the weights (see module docstring)."""
        if self._inside_no_sync:
            raise RuntimeError("step() cannot be called inside no_sync()")
        self._check_optimizer("step()")
        boundary = self.is_gradient_accumulation_boundary()
        self._step_applied = False
        self.micro_steps += 1
        if not boundary:
            return
        with self._timers.time("step"):
            self._take_model_step(lr_kwargs)

    def _take_model_step(self, lr_kwargs: Optional[Dict[str, Any]]) -> None:
        if self._client is not None:
            self._client.sync(self.optimizer.param_groups)
        want_stats = self._want_stats()
        if self._in_backward is not None and self._in_backward.armed:
            result = self._in_backward.finish()
        else:
            result = self._pipeline.run(loss_scale=self.loss_scale, clip=self.config.gradient_clipping,
                                        want_stats=want_stats, reduced=self._reduced)
        self._reduced = False
        update_expert_bias(self.module, apply=not result.skipped)  # aux-loss-free balancing: after each applied step
        if result.skipped:
            self._skip_step()
        else:
            self._global_grad_norm = result.norm
            self._step_applied = True
            if self.loss_scaler is not None:
                self.loss_scaler.update_scale(False)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
            self._record(result.norm, result.coef, want_stats)
        self._report_progress()
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self.zero_grad()

    def _report_progress(self) -> None:
        """DeepSpeed's progress line every ``steps_per_print`` steps on rank 0 (counted before this step's +1)."""
        every = self.config.steps_per_print
        if every is None or self.global_rank != 0 or (self.global_steps + 1) % every:
            return
        _log(f"step={self.global_steps + 1}, skipped={self.skipped_steps}, lr={self.get_lr()}, mom={self.get_mom()}")
        if self._timers.enabled:
            _log(f"rank={self.global_rank} {self._timers.report()}")

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
                          RuntimeWarning, stacklevel=4)
        self.skipped_steps += 1
        self._global_grad_norm = float("nan")
        self._record(float("nan"), 0.0, False)

    def _record(self, norm: float, coef: float, group_stats: bool) -> None:
        if self.world_size > 1:
            self._moe_stats.all_reduce()  # collective: every expert's load over every rank's tokens
        lrs = self.get_lr()
        metrics: Dict[str, Any] = {
            "train": {"loss": sum(self._losses) / len(self._losses) if self._losses else float("nan"),
                      "grad_norm": norm, "clip_coef": coef, "lr": lrs[0] if lrs else float("nan"),
                      "loss_scale": self.loss_scale, "skipped_steps": self.skipped_steps},
            "moe": self._moe_stats.summary(),
        }
        if self._flops is not None:
            metrics["flops"] = self._flops.step_metrics(self.device)
            self._write_profile()
            self._flops.reset()
        if group_stats:
            stats = self._pipeline.gather_stats()  # collective: every group once, from its owner
            if stats:
                metrics["group"] = stats
        self._losses = []
        self._moe_stats.reset()
        self.last_metrics = metrics
        if self._writer is not None:
            self._writer.write(self.global_steps + 1, metrics)

    def _profile_step(self) -> bool:
        """Whether this step is flops_profiler.profile_step (counted as DeepSpeed: optimizer steps taken)."""
        return self._flops is not None and self.global_steps == self.config.flops_profiler.profile_step

    def _write_profile(self) -> None:
        """At the profile step, rank 0 prints (or writes to output_file) the per-module FLOPs profile."""
        if not self._profile_step():
            return
        self._flops_profiled = True
        if self.global_rank != 0:
            return
        text = self._flops.report(self.global_steps, world_size=self.world_size,
                                  batch_size=self.train_micro_batch_size_per_gpu())
        path = self.config.flops_profiler.output_file
        if path is None:
            print(text, flush=True)
        else:
            Path(path).write_text(text + "\n")

    # --- memory -----------------------------------------------------------------------------------
    def empty_partition_cache(self) -> None:
        """Release cached memory (DeepSpeed frees ZeRO-3 partitions here; moesaic has none to free)."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag: Optional[str] = None, client_state: Optional[Dict] = {},  # noqa: B006
                        save_latest: bool = True, exclude_frozen_parameters: bool = False,
                        model_config: Optional[Dict] = None, keep_last: Optional[int] = None):
        """Save model, optimizer, scheduler, loss scaler, counters and RNG (every rank calls it).

        Args:
            save_dir: the checkpoint directory.
            tag: the checkpoint's name; None: ``global_step<N>`` as in DeepSpeed.
            client_state: a dict of JSON data and tensors (never pickled) saved with the checkpoint
                and returned by :meth:`load_checkpoint` (never modified; the ``{}`` default is
                DeepSpeed's signature).
            save_latest: point ``latest`` at this checkpoint (False keeps the previous one).
            exclude_frozen_parameters: must be False: moesaic checkpoints hold every tensor of
                the model, frozen ones included, to reload by identity.
            model_config: the model's config, stored in the manifest (moesaic's extra).
            keep_last: remove all but the N newest checkpoints of ``save_dir`` after this one is
                published (moesaic's extra; None keeps all).

        Returns:
            The checkpoint folder (DeepSpeed returns True; a Path is truthy).
        """
        if client_state is not None and not isinstance(client_state, dict):
            raise TypeError(f"client_state must be a dict or None, got {type(client_state).__name__}")
        if not isinstance(save_latest, bool):
            raise TypeError(f"save_latest must be a bool, got {type(save_latest).__name__}: {save_latest!r}")
        if exclude_frozen_parameters is not False:
            raise ValueError(f"exclude_frozen_parameters={exclude_frozen_parameters!r} is not supported: moesaic "
                             "checkpoints hold every tensor of the model (frozen ones too) so that they reload by "
                             "identity under any layout; leave it False")
        tag = tag if tag is not None else f"global_step{self.global_steps}"
        self._check_tag(str(tag))
        state = {"global_steps": self.global_steps, "global_samples": self.global_samples,
                 "micro_steps": self.micro_steps, "skipped_steps": self.skipped_steps,
                 "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                 "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
                 "config": self.config.to_dict()}
        root = Path(save_dir)
        latest = root / "latest"
        previous = read_pointer(root) if (not save_latest and self.global_rank == 0) else None
        folder = checkpoint.save(save_dir, self.module, tag=str(tag), optimizer=self.optimizer, engine_state=state,
                                 client_state=client_state, model_config=model_config, index=self.index,
                                 keep_last=keep_last)
        if not save_latest and self.global_rank == 0:  # put the previous `latest` back (atomically)
            if previous is None:
                latest.unlink(missing_ok=True)
            else:
                tmp = root / ".latest.restore"
                tmp.write_text(previous)
                os.replace(tmp, latest)
        return folder

    def _check_tag(self, tag: str) -> None:
        """DeepSpeed's checkpoint.tag_validation: every rank must save under the same tag."""
        mode = self.config.checkpoint.tag_validation
        if mode == "Ignore" or self.world_size == 1:
            return
        tags: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(tags, tag)
        if len(set(tags)) > 1:
            message = (f"checkpoint tags differ between ranks: {tags}; every rank must call save_checkpoint with "
                       "the same tag (checkpoint.tag_validation)")
            if mode == "Fail":
                raise ValueError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _get_optimizer_ckpt_name(self, checkpoints_path, tag) -> str:
        """Where this rank reads its optimizer state from (DeepSpeed's name): the checkpoint folder.

        Loading calls it only when optimizer state is asked for, and checks that the checkpoint
        holds some.
        """
        folder = checkpoint.resolve(checkpoints_path, tag)
        manifest = checkpoint.read_manifest(folder)
        if manifest.get("format_version", 1) >= 2:
            has_state = manifest.get("optimizer") is not None
        else:
            has_state = any(".optim." in name for name in manifest.get("files", {}))
        if not has_state:
            raise checkpoint.CheckpointError(f"{folder}: no optimizer state in this checkpoint; load it with "
                                             "load_optimizer_states=False")
        return str(folder)

    def load_checkpoint(self, load_dir, tag: Optional[str] = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn=None):
        """Load what :meth:`save_checkpoint` wrote, under this run's world and ep sizes.

        Args:
            load_dir: the checkpoint directory.
            tag: the checkpoint; None: the one ``latest`` names.
            load_module_strict: must be True (every tensor is loaded by identity, shapes checked).
            load_optimizer_states: also restore master weights and optimizer state; False keeps
                this engine's optimizer state and restarts the master weights from the loaded model.
            load_lr_scheduler_states: also restore the schedule's position.
            load_module_only: the model alone (no counters, optimizer, scheduler or loss scale).
            custom_load_fn: must be None (DeepSpeed's hook for its own file format).

        Returns:
            ``(folder, client_state)``; ``(None, None)`` with a warning when there is no
            checkpoint to load (no ``latest``, or no folder for ``tag``), as DeepSpeed does.

        Raises:
            CheckpointError: any file, tensor or value that fails its checks (naming the file and
                the key), a tag that is not one folder name, a link or special file in the
                checkpoint; the model, optimizer, scheduler, loss scaler, counters and RNGs are then
                exactly as they were (docs/checkpoints.md, "What is verified, and when").

        Metrics that an earlier session wrote to ``log_dir`` after the checkpoint's step are
        discarded (CSV rows removed, TensorBoard events purged), since those steps are trained again.
        """
        for name, value in (("load_module_strict", load_module_strict), ("load_optimizer_states",
                            load_optimizer_states), ("load_lr_scheduler_states", load_lr_scheduler_states),
                            ("load_module_only", load_module_only)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
        if not load_module_strict:
            raise ValueError("load_module_strict=False is not supported: moesaic loads every tensor of the model by "
                             "identity and checks its shape; a partial load would leave tensors unset")
        if custom_load_fn is not None:
            raise ValueError("custom_load_fn is not supported: moesaic checkpoints are read by moesaic.checkpoint")
        root = Path(load_dir)
        tag = None if tag is None else str(tag)
        if checkpoint.find(root, tag) is None:  # a tag that cannot name a folder raises, naming it
            what = f"no 'latest' file in {root}" if tag is None else f"no checkpoint {tag!r} in {root}"
            warnings.warn(f"{what}: nothing loaded (as DeepSpeed, load_checkpoint returns (None, None))",
                          RuntimeWarning, stacklevel=2)
            return None, None
        with_optimizer = load_optimizer_states and not load_module_only
        if with_optimizer:
            self._get_optimizer_ckpt_name(root, tag)
        with_scheduler = load_lr_scheduler_states and not load_module_only
        # 1. read and check everything (engine.json against this engine too) on every rank; nothing changes
        staged = checkpoint.prepare(root, self.module, tag=tag, optimizer=self.optimizer if with_optimizer else None,
                                    index=self.index, check=None if load_module_only else
                                    (lambda s: resume.stage(self, s, with_scheduler)))
        # 2. apply: a scheduler of the user's own first (the only step that runs foreign code; it is undone
        #    if it raises), then model, optimizer, RNG, then the counters
        plan = staged.extra
        if plan is not None and plan.scheduler is not None:
            resume.load_scheduler(self.lr_scheduler, plan.scheduler, staged.engine_file)
        staged.apply()
        if not with_optimizer:
            self.optimizer.refresh_masters()  # the next step starts from the loaded weights
        if load_module_only:
            return staged.folder, staged.client_state
        resume.apply(self, plan)
        if plan.scheduler is not None and self._client is not None:
            self._client.sync(self.optimizer.param_groups)
        if self._writer is not None:
            # the steps after the checkpoint will be trained again: their old rows and events go
            self._writer.discard_after(self.global_steps)
        return staged.folder, staged.client_state

    # --- telemetry --------------------------------------------------------------------------------
    def log_metrics(self, metrics: Dict[str, Any]) -> None:
        """Write extra metrics (e.g. validation loss) at the current step, next to the engine's own."""
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        self.last_metrics.update(metrics)
        if self._writer is not None:
            self._writer.write(self.global_steps, metrics)

    def close(self) -> None:
        """Flush and close the metrics writer (and say so if flops_profiler.profile_step was never reached)."""
        if self._flops is not None and not self._flops_profiled and self.global_rank == 0:
            warnings.warn(f"flops_profiler.profile_step={self.config.flops_profiler.profile_step} was never reached "
                          f"({self.global_steps} steps taken): no profile was written", RuntimeWarning, stacklevel=2)
        if self._writer is not None:
            self._writer.close()
