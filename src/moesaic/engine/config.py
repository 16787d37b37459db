"""The engine config: DeepSpeed's top-level keys composed with the optimizer room's sections.

This one tree is both ``moesaic.initialize``'s config (a dict, or a JSON/TOML file, in DeepSpeed's
layout: ``{"train_micro_batch_size_per_gpu": 16, "bf16": {"enabled": true}, "optimizer": {...}}``)
and the ``engine`` section of ``moesaic train``'s config (``[engine]``, ``[engine.optimizer]`` ...
in TOML, ``--set engine.optimizer.params.lr=1e-3`` on the command line): the same names and
defaults in all three.

The batch sizes follow DeepSpeed's arithmetic (:meth:`EngineConfig.check_batch`). This tree holds
only what moesaic implements or chooses. DeepSpeed's other keys are the DeepSpeed bridge's
business, never silently ignored: the bridge reads DeepSpeed's dict into this tree
(:mod:`moesaic.deepspeed.config`), refusing the features moesaic lacks by name with the reason
(:mod:`moesaic.deepspeed.keys`) and checking, then dropping, the keys that only choose between
DeepSpeed's own implementations (:mod:`moesaic.deepspeed.accepted`: ``prescale_gradients``,
``activation_checkpointing`` ...). Given here directly, such a key says so and where it is
accepted (each section's ``MOVED``); any other unknown key is an error.
Differences on purpose: ``optimizer`` defaults to AdamW (DeepSpeed builds no optimizer without
one and cannot train); an optimizer or schedule moesaic does not implement is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Optional, Tuple

from .._checks import check_bool, check_choice, check_int, check_number, check_str, join_key, moved_names
from .._config import Section, section, setting
from ..optim.config import (BF16Config, FP16Config, MoEOptimConfig, OptimizerConfig, SchedulerConfig,
                            ZeroConfig, deepspeed_only)

TAG_VALIDATION = ("Warn", "Ignore", "Fail")

# DeepSpeed's activation_checkpointing section is the DeepSpeed bridge's (it configures nothing moesaic does)
__getattr__ = moved_names(__name__, {"ActivationCheckpointingConfig":
                                     "moesaic.deepspeed.accepted.ActivationCheckpointingConfig"})


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """The ``checkpoint`` section (DeepSpeed's): how ``save_checkpoint`` checks its tag."""

    PATH = "checkpoint"

    tag_validation: str = setting("Warn", check=partial(check_choice, choices=TAG_VALIDATION, fold_case=True),
                                  doc="Every rank must save under the same tag: 'Warn' warns when they differ, "
                                      "'Fail' raises, 'Ignore' does not check (any case).")


def _output_file(value: Any, key: str) -> Optional[str]:
    check_str(value, key, allow_none=True)
    if value is not None:
        folder = os.path.dirname(os.path.abspath(value))
        if not os.path.isdir(folder):
            raise ValueError(f"{key}={value!r}: the folder {folder!r} does not exist; create it or give another "
                             "path")
    return value


@dataclass(frozen=True)
class FlopsProfilerConfig(Section):
    """The ``flops_profiler`` section (DeepSpeed's keys): FLOPs per step and a per-module profile at one step."""

    PATH = "flops_profiler"
    MOVED = deepspeed_only("recompute_fwd_factor")

    enabled: bool = setting(False, check=check_bool,
                            doc="Count every step's FLOPs with torch.utils.flop_counter (as executed: an expert "
                                "counts the tokens it received) into the metrics (flops, flops_per_token, "
                                "flops_per_s, mfu on CUDA), and print a per-module profile at profile_step. While "
                                "enabled every operation passes through torch's counting mode, which slows steps "
                                "(several-fold on small CPU models, where per-operation overhead dominates).")
    profile_step: int = setting(1, check=partial(check_int, lo=0),
                                doc="The step profiled: the one taken after this many optimizer steps (DeepSpeed's "
                                    "count); it must come before the schedule's total_num_steps.")
    module_depth: int = setting(-1, check=partial(check_int, lo=-1),
                                doc="Deepest module level in the detailed profile; -1: all.")
    top_modules: int = setting(1, check=partial(check_int, lo=1),
                               doc="Modules listed per depth in the aggregated profile.")
    detailed: bool = setting(True, check=check_bool, doc="Print the per-module tree.")
    output_file: Optional[str] = setting(None, check=_output_file, type_text="str or null",
                                         doc="Write the profile to this file (its folder must exist); null: stdout. "
                                             "Rank 0 writes it.")


@dataclass(frozen=True)
class EngineConfig(Section):
    """The whole training-engine config (DeepSpeed's keys plus ``moe``); DeepSpeed's dict or file: :func:`moesaic.deepspeed.load_config`."""

    MOVED = deepspeed_only("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "communication_data_type",
                           "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op",
                           "sparse_gradients", "managed_gradient_accumulation", "memory_breakdown", "dump_state",
                           "disable_allgather", "activation_checkpointing")

    train_batch_size: Optional[int] = setting(
        None, check=partial(check_int, lo=1, none_word="null"),
        doc="Global batch per optimizer step = micro batch x gradient_accumulation_steps x data-parallel ranks; "
            "null: derived from the micro batch.")
    train_micro_batch_size_per_gpu: Optional[int] = setting(
        None, check=partial(check_int, lo=1, none_word="null"),
        doc="Samples per process per forward/backward; null: derived from train_batch_size. One of the two is "
            "required.")
    gradient_accumulation_steps: Optional[int] = setting(
        None, check=partial(check_int, lo=1, none_word="null"),
        doc="Micro-batches accumulated before each optimizer step; null: derived as DeepSpeed does "
            "(train_batch_size / micro batch / data-parallel ranks, or 1).")
    gradient_clipping: float = setting(1.0, check=partial(check_number, lo=0.0),
                                       doc="Clip the global gradient norm (dense once, each expert once) to this; "
                                           "0 disables clipping. 1.0 by default, as in DeepSpeed.")
    steps_per_print: Optional[int] = setting(None, check=partial(check_int, lo=1, none_word="null"),
                                             doc="Rank 0 logs 'step=N, skipped=S, lr=[...], mom=[...]' every this "
                                                 "many optimizer steps, as DeepSpeed does; null (DeepSpeed's "
                                                 "default): never.")
    wall_clock_breakdown: bool = setting(False, check=check_bool,
                                         doc="Time forward, backward and step; rank 0 logs their mean milliseconds "
                                             "with the steps_per_print line.")
    dataloader_drop_last: bool = setting(False, check=check_bool,
                                         doc="The data loader made from initialize(training_data=...) drops the last "
                                             "incomplete batch.")
    use_data_before_expert_parallelism: bool = setting(
        False, check=check_bool,
        doc="DeepSpeed's layout of expert-parallel groups: data-parallel ranks first (passed to "
            "setup_expert_parallel).")
    optimizer_in_backward: bool = setting(
        False, check=check_bool,
        doc="Step each optimizer group during backward as soon as its gradients are complete, so the model's "
            "gradients never all exist at once (lower peak memory). One process only; no gradient clipping, no "
            "fp16, ZeRO stage 0.")
    optimizer: OptimizerConfig = section(OptimizerConfig, doc="The optimizer (a client optimizer given to "
                                                              "moesaic.initialize takes precedence).")
    scheduler: Optional[SchedulerConfig] = section(SchedulerConfig, optional=True,
                                                   doc="The learning-rate schedule; absent: a constant lr.")
    fp16: FP16Config = section(FP16Config, doc="fp16 training and its loss scale.")
    bf16: BF16Config = section(BF16Config, doc="bf16 training.")
    zero_optimization: ZeroConfig = section(ZeroConfig, doc="ZeRO optimizer-state sharding.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, doc="Checkpoint tag validation.")
    flops_profiler: FlopsProfilerConfig = section(FlopsProfilerConfig, doc="DeepSpeed's FLOPs profiler.")
    moe: MoEOptimConfig = section(MoEOptimConfig, doc="Expert parameters in the optimizer.")

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        if values["bf16"].enabled and values["fp16"].enabled:
            raise ValueError(f"{join_key(path, 'bf16.enabled')} and {join_key(path, 'fp16.enabled')} are both true; "
                             f"enable at most one of them")
        # Inconsistency visible without the world size: it must be a multiple of micro * gas.
        micro, gas, total = (values["train_micro_batch_size_per_gpu"], values["gradient_accumulation_steps"],
                             values["train_batch_size"])
        if micro is not None and total is not None and total % (micro * (gas or 1)):
            times = f" * {join_key(path, 'gradient_accumulation_steps')} ({gas})" if gas is not None else ""
            raise ValueError(f"{join_key(path, 'train_batch_size')} ({total}) must be a multiple of "
                             f"{join_key(path, 'train_micro_batch_size_per_gpu')} ({micro}){times}")

    def check_batch(self, world_size: int, path: str = "") -> Tuple[int, int, int]:
        """Resolve and check the batch sizes for ``world_size`` data-parallel ranks, as DeepSpeed does.

        The missing ones are derived with DeepSpeed's integer arithmetic: ``gas = total // micro //
        world``, ``micro = total // world // gas``, ``total = micro * gas * world``; with one of
        them alone, ``gas = 1``.

        Args:
            world_size: number of data-parallel ranks.
            path: this section's key path, for messages (``"engine"`` inside a training config).

        Returns:
            ``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)``.

        Raises:
            ValueError: neither batch size is set, a derived size is 0, or
                train_batch_size != micro * gas * world_size.
        """
        check_int(world_size, "world_size", lo=1)
        total_key, micro_key, gas_key = (join_key(path, k) for k in (
            "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
        micro, gas, total = self.train_micro_batch_size_per_gpu, self.gradient_accumulation_steps, \
            self.train_batch_size
        if micro is None and total is None:
            raise ValueError(f"set {total_key} or {micro_key} (both are missing)")
        if total is not None and micro is not None and gas is None:
            gas = total // micro // world_size
        elif total is not None and micro is None:
            gas = 1 if gas is None else gas
            micro = total // world_size // gas
        elif total is None:
            gas = 1 if gas is None else gas
            total = micro * gas * world_size
        for key, value in ((micro_key, micro), (gas_key, gas)):
            if value < 1:
                raise ValueError(f"{key} comes out as {value} from {total_key} ({total}) over world_size "
                                 f"({world_size}); it must be >= 1")
        if total != micro * gas * world_size:
            raise ValueError(f"{total_key} ({total}) != {micro_key} ({micro}) * {gas_key} ({gas}) * "
                             f"world_size ({world_size}) = {micro * gas * world_size}")
        return total, micro, gas

    def offload(self) -> str:
        """Where master weights and optimizer state live: ``"cpu"`` when ``moe.offload`` or ZeRO-Offload ask."""
        return "cpu" if "cpu" in (self.moe.offload, self.zero_optimization.offload_device()) else "none"

    def check_complete(self, path: str = "") -> None:
        """Refuse a config the engine cannot run as it stands (a schedule without ``total_num_steps``).

        ``moesaic train`` fills ``total_num_steps`` from ``train.steps`` before it gets here.
        """
        if self.scheduler is not None and self.scheduler.needs_total():
            raise ValueError(f"{join_key(path, 'scheduler.params.total_num_steps')} is required for scheduler "
                             f"type {self.scheduler.type} (the number of steps of the whole schedule)")
        total = self.scheduler.params.get("total_num_steps") if self.scheduler is not None else None
        prof = self.flops_profiler
        if prof.enabled and total is not None and prof.profile_step >= total:
            raise ValueError(f"{join_key(path, 'flops_profiler.profile_step')}={prof.profile_step} is beyond the run: "
                             f"{join_key(path, 'scheduler.params.total_num_steps')} is {total} (steps 0-{total - 1})")
