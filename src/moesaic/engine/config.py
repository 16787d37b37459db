"""The engine config: DeepSpeed's top-level keys composed with the optimizer room's sections.

This one tree is both ``moesaic.initialize``'s config (a dict, or a JSON/TOML file, in DeepSpeed's
layout: ``{"train_micro_batch_size_per_gpu": 16, "bf16": {"enabled": true}, "optimizer": {...}}``)
and the ``engine`` section of ``moesaic train``'s config (``[engine]``, ``[engine.optimizer]`` ...
in TOML, ``--set engine.optimizer.params.lr=1e-3`` on the command line): the same names and
defaults in all three.

Differences from DeepSpeed, on purpose: ``gradient_accumulation_steps`` defaults to 1 instead of
being derived from ``train_batch_size``, so a mismatch is reported by :meth:`EngineConfig.check_batch`
rather than silently resolved; keys moesaic does not implement are unknown-key errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .._checks import check_bool, check_int, check_number, join_key
from .._config import Section, load_source, section, setting
from ..optim.config import (BF16Config, FP16Config, MoEOptimConfig, OptimizerConfig, SchedulerConfig,
                            ZeroConfig)


@dataclass(frozen=True)
class EngineConfig(Section):
    """The whole training-engine config (DeepSpeed's keys plus ``moe``); load a dict or file with :func:`load_config`."""

    train_batch_size: Optional[int] = setting(
        None, check=partial(check_int, lo=1, none_word="null"),
        doc="Global batch per optimizer step = micro batch x gradient_accumulation_steps x data-parallel ranks; "
            "null: derived from the micro batch.")
    train_micro_batch_size_per_gpu: Optional[int] = setting(
        None, check=partial(check_int, lo=1, none_word="null"),
        doc="Samples per process per forward/backward; null: derived from train_batch_size. One of the two is "
            "required.")
    gradient_accumulation_steps: int = setting(1, check=partial(check_int, lo=1),
                                               doc="Micro-batches accumulated before each optimizer step.")
    gradient_clipping: float = setting(0.0, check=partial(check_number, lo=0.0),
                                       doc="Clip the global gradient norm (dense once, each expert once) to this; "
                                           "0 disables clipping.")
    steps_per_print: int = setting(10, check=partial(check_int, lo=1),
                                   doc="DeepSpeed's print interval; accepted for compatibility (moesaic logs through "
                                       "log_dir instead).")
    optimizer_in_backward: bool = setting(
        False, check=check_bool,
        doc="Step each optimizer group during backward as soon as its gradients are complete, so the model's "
            "gradients never all exist at once (lower peak memory). One process only; no gradient clipping, no "
            "fp16, ZeRO stage 0.")
    optimizer: OptimizerConfig = section(OptimizerConfig, doc="The optimizer.")
    scheduler: Optional[SchedulerConfig] = section(SchedulerConfig, optional=True,
                                                   doc="The learning-rate schedule; absent: a constant lr.")
    fp16: FP16Config = section(FP16Config, doc="fp16 training and its loss scale.")
    bf16: BF16Config = section(BF16Config, doc="bf16 training.")
    zero_optimization: ZeroConfig = section(ZeroConfig, doc="ZeRO optimizer-state sharding.")
    moe: MoEOptimConfig = section(MoEOptimConfig, doc="Expert parameters in the optimizer.")

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        if values["bf16"].enabled and values["fp16"].enabled:
            raise ValueError(f"{join_key(path, 'bf16.enabled')} and {join_key(path, 'fp16.enabled')} are both true; "
                             f"enable at most one of them")
        # Inconsistency visible without the world size: it must be a multiple of micro * gas.
        micro, gas, total = (values["train_micro_batch_size_per_gpu"], values["gradient_accumulation_steps"],
                             values["train_batch_size"])
        if micro is not None and total is not None and total % (micro * gas):
            raise ValueError(f"{join_key(path, 'train_batch_size')} ({total}) must be a multiple of "
                             f"{join_key(path, 'train_micro_batch_size_per_gpu')} ({micro}) * "
                             f"{join_key(path, 'gradient_accumulation_steps')} ({gas})")

    def check_batch(self, world_size: int, path: str = "") -> Tuple[int, int, int]:
        """Resolve and check the batch sizes for ``world_size`` data-parallel ranks.

        Args:
            world_size: number of data-parallel ranks.
            path: this section's key path, for messages (``"engine"`` inside a training config).

        Returns:
            ``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)``.

        Raises:
            ValueError: neither batch size is set, or train_batch_size != micro * gas * world_size.
        """
        check_int(world_size, "world_size", lo=1)
        total_key, micro_key, gas_key = (join_key(path, k) for k in (
            "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
        micro, gas, total = self.train_micro_batch_size_per_gpu, self.gradient_accumulation_steps, \
            self.train_batch_size
        if micro is None and total is None:
            raise ValueError(f"set {total_key} or {micro_key} (both are missing)")
        if micro is None:
            micro = max(1, total // (gas * world_size))
        if total is None:
            total = micro * gas * world_size
        if total != micro * gas * world_size:
            raise ValueError(f"{total_key} ({total}) != {micro_key} ({micro}) * {gas_key} ({gas}) * "
                             f"world_size ({world_size}) = {micro * gas * world_size}")
        return total, micro, gas

    def check_complete(self, path: str = "") -> None:
        """Refuse a config the engine cannot run as it stands (a schedule without ``total_num_steps``).

        ``moesaic train`` fills ``total_num_steps`` from ``train.steps`` before it gets here.
        """
        if self.scheduler is not None and self.scheduler.needs_total():
            raise ValueError(f"{join_key(path, 'scheduler.params.total_num_steps')} is required for scheduler "
                             f"type {self.scheduler.type} (the number of steps of the whole schedule)")


def load_config(config: Union[Mapping[str, Any], str, os.PathLike, EngineConfig]) -> EngineConfig:
    """Load and check a DeepSpeed-style engine config (``moesaic.initialize``'s ``config``).

    Args:
        config: a mapping with DeepSpeed's keys plus ``moe``, a path (str or PathLike) to a ``.json``
            or ``.toml`` file holding one, or an EngineConfig (returned as is).

    Returns:
        The checked :class:`EngineConfig`, complete enough to run.
    """
    if not isinstance(config, EngineConfig):
        data = load_source(config, "a dict, a path to a .json/.toml file or an EngineConfig")
        config = EngineConfig.from_dict(data)
    config.check_complete()
    return config
