"""The training config of ``moesaic train``: one tree composed of the sections each room owns.

=========  ============================================  ==============================================
section    class (owner)                                 what it sets
=========  ============================================  ==============================================
model      :class:`moesaic.models.GPTConfig`              the GPT and its MoE layers
data       :class:`DataConfig` (here)                     the corpus and its validation share
train      :class:`LoopConfig` (here)                     the loop: steps, evaluation, checkpoints, device
engine     :class:`moesaic.engine.EngineConfig`           DeepSpeed's keys: batch, optimizer, scheduler,
                                                         precision, clipping, ZeRO, ``moe`` groups
=========  ============================================  ==============================================

The ``engine`` section is exactly ``moesaic.initialize``'s config (the same keys, names and
defaults), so a DeepSpeed JSON config pasted under ``[engine]`` means the same thing here. One rule
joins sections: a schedule's ``engine.scheduler.params.total_num_steps``, when absent, is
``train.steps`` (:meth:`TrainConfig.engine_config`). Every error names the full key path
(``engine.optimizer.params.lr``), the value and what is allowed; unknown keys at any level are errors
(keys of the former layout name their new place). Combinations that cannot run (``train.nproc`` not
divisible by ``model.ep_size``, no batch size ...) fail here, before any process starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .._checks import check_bool, check_choice, check_int, check_list, check_number, check_str
from ..layer.recompute_policy import POLICIES as RECOMPUTE_POLICIES
from .._config import Section, apply_overrides, load_source, section, setting
from ..deepspeed.config import engine_section
from ..engine.config import EngineConfig
from ..models.gpt import GPTConfig
from ..parallel.launch import check_device
from .data import DEFAULT_SUFFIXES

# Keys of the layout before the config tree was unified (checkpoints written then still resume).
RENAMED = {
    "optim.lr": "engine.optimizer.params.lr",
    "optim.weight_decay": "engine.optimizer.params.weight_decay",
    "optim.betas": "engine.optimizer.params.betas",
    "optim.warmup_steps": "engine.scheduler.params.warmup_num_steps",
    "optim.min_lr_ratio": "engine.scheduler.params.cos_min_ratio",
    "optim.grad_clip": "engine.gradient_clipping",
    "train.batch_size": "engine.train_micro_batch_size_per_gpu",
    "train.grad_accum": "engine.gradient_accumulation_steps",
    "train.bf16": "engine.bf16.enabled",
    "moe.split_by": "engine.moe.split_by",
    "moe.max_group_size": "engine.moe.max_group_size",
}


@dataclass(frozen=True)
class DataConfig(Section):
    """``data``: the corpus (None: the standard library's source) and its validation share."""

    PATH = "data"

    path: Optional[str] = setting(None, check=partial(check_str, allow_none=True),
                                  doc="A text file or a folder of them; absent: the Python standard library's "
                                      "sources. With --hf also instruction/chat data: a .jsonl/.json/.parquet file, "
                                      "a folder of them or a datasets save_to_disk folder (rows of text, "
                                      "prompt + completion, or messages).")
    val_percent: int = setting(5, check=partial(check_int, lo=1, hi=50),
                               doc="Share of the corpus held out for validation, in percent.")
    val_path: Optional[str] = setting(None, check=partial(check_str, allow_none=True),
                                      doc="Instruction/chat data (--hf): a separate validation file or folder; "
                                          "absent: val_percent of the rows of data.path.")
    train_on: str = setting("answers", check=partial(check_choice, choices=("answers", "all")),
                            doc="Instruction/chat data (--hf): 'answers' learns the completions and assistant "
                                "turns only; 'all' every token.")
    packing: bool = setting(True, check=check_bool,
                            doc="Instruction/chat data (--hf): pack documents best-fit into rows of "
                                "model.block_size tokens, each attending only to itself; false: one document "
                                "per row, padded (pads never reach an expert).")
    truncate: bool = setting(False, check=check_bool,
                             doc="Instruction/chat data (--hf): cut rows longer than model.block_size; false: "
                                 "such rows are bad rows.")
    max_bad_fraction: float = setting(0.01, check=partial(check_number, lo=0.0, hi=1.0),
                                      doc="Instruction/chat data (--hf): stop when more than this share of a "
                                          "split's rows cannot be used (the report names the first ones).")
    suffixes: Tuple[str, ...] = setting(DEFAULT_SUFFIXES, check=partial(check_list, item=check_str, min_length=1,
                                                                        what="file suffixes (non-empty str)"),
                                        doc="In a folder, the files read (by suffix).")


@dataclass(frozen=True)
class LoopConfig(Section):
    """``train``: the loop around the engine."""

    PATH = "train"

    steps: int = setting(200, check=partial(check_int, lo=1), doc="Optimizer steps of the whole run.")
    eval_every: int = setting(50, check=partial(check_int, lo=1), doc="Validation loss every this many steps "
                                                                       "(and at the last one).")
    eval_batches: int = setting(8, check=partial(check_int, lo=1), doc="Validation batches per evaluation.")
    checkpoint_every: int = setting(100, check=partial(check_int, lo=0),
                                    doc="Checkpoint every this many steps; 0: only the final checkpoint.")
    log_every: int = setting(10, check=partial(check_int, lo=1),
                             doc="Per-group optimizer statistics every this many steps (metrics.csv, TensorBoard).")
    seed: int = setting(1337, check=partial(check_int, lo=0), doc="Seed of the weights (plus the rank) and of the "
                                                                   "data order.")
    nproc: int = setting(1, check=partial(check_int, lo=1),
                         doc="Processes; a multiple of model.ep_size (each holds num_experts / ep_size experts "
                             "of every MoE layer).")
    max_minutes: Optional[float] = setting(None, check=partial(check_number, lo=0.0, lo_open=True, allow_none=True),
                                           doc="Stop (with a checkpoint) after this many minutes; absent: never.")
    keep_last: Optional[int] = setting(None, check=partial(check_int, lo=1, none_word="null"),
                                       doc="Keep only this many newest checkpoints in <out>/checkpoints (older ones "
                                           "are removed after each save); absent: keep every checkpoint.")
    dist_timeout_s: float = setting(300.0, check=partial(check_number, lo=0.0, lo_open=True),
                                    doc="Seconds any wait for a peer may last: joining the process group and "
                                        "every collective of every process group; under moesaic train --nproc "
                                        "N also how long a process may stop answering before the launcher "
                                        "ends the run, naming its rank.")
    recompute: str = setting("auto", check=partial(check_choice, choices=("auto",) + RECOMPUTE_POLICIES),
                             doc="Activation recompute (moesaic.apply_recompute): 'auto' is 'block' for a fine-tuning "
                                 "run (train --hf) and 'none' for the byte-level GPT; 'none' keeps every activation; "
                                 "'block' recomputes each transformer block in backward (keeps its input); 'moe' "
                                 "recomputes only the MoE layers; 'experts' only the experts' hidden activations. "
                                 "Exact: the recompute reuses the first forward's routing. The run's summary.json "
                                 "and checkpoints hold the resolved policy.")
    device: str = setting("auto", check=check_device,
                          doc="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' (GPU = local rank) or "
                              "'cuda:<index>'; the model and every batch go there.")


def _renamed_keys(data: Mapping[str, Any]) -> None:
    """Refuse keys of the former layout, naming where each one lives now."""
    found = [f"{old} -> {new}" for old, new in RENAMED.items()
             if isinstance(data.get(old.split(".")[0]), Mapping) and old.split(".")[1] in data[old.split(".")[0]]]
    if found:
        raise ValueError(f"config keys of the former layout: {'; '.join(found)} (see docs/config-reference.md)")


@dataclass(frozen=True)
class TrainConfig(Section):
    """A whole training run: the four sections, cross-checked."""

    model: GPTConfig = section(GPTConfig, doc="The model.")
    data: DataConfig = section(DataConfig, doc="The corpus.")
    train: LoopConfig = section(LoopConfig, doc="The training loop.")
    engine: EngineConfig = section(EngineConfig, doc="The engine: moesaic.initialize's config, DeepSpeed's keys.")

    @classmethod
    def from_dict(cls, data: Any, path: Optional[str] = None) -> "TrainConfig":
        """Build from a mapping of sections (see :meth:`moesaic._config.Section.from_dict`)."""
        if isinstance(data, Mapping):
            _renamed_keys(data)
            # DeepSpeed's keys beyond the engine's: refused with the reason, or dropped (hints; DeepSpeed-only keys
            # once checked)
            if "engine" in data:
                data = {**data, "engine": engine_section(data["engine"], "engine")}
        return super().from_dict(data, path)

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        ep, nproc = values["model"].ep_size, values["train"].nproc
        if nproc % ep:
            raise ValueError(f"train.nproc ({nproc}) must be divisible by model.ep_size ({ep}): the processes "
                             f"form groups of ep_size that share the experts; use nproc in {ep}, {2 * ep}, ...")
        values["engine"].check_batch(nproc, "engine")

    def engine_config(self) -> EngineConfig:
        """The engine section as the run uses it: a schedule's absent ``total_num_steps`` becomes ``train.steps``."""
        scheduler = self.engine.scheduler
        if scheduler is None or not scheduler.needs_total():
            return self.engine
        return dataclasses.replace(self.engine, scheduler=scheduler.with_total(self.train.steps))

    def warmup_warning(self) -> Optional[str]:
        """One line when the lr schedule's warmup is longer than the run (the lr never reaches its peak), else None.

        Names the keys to change: ``engine.scheduler.params.warmup_num_steps`` and the run's length
        (``train.steps``, or ``engine.scheduler.params.total_num_steps`` when that is set).
        """
        scheduler = self.engine.scheduler
        if scheduler is None or "warmup_num_steps" not in scheduler.params or "total_num_steps" not in scheduler.params:
            return None
        key = "engine.scheduler.params"
        warmup, total = scheduler.params["warmup_num_steps"], scheduler.params["total_num_steps"]
        length = f"{key}.total_num_steps" if total is not None else "train.steps"
        total = self.train.steps if total is None else total
        if total >= max(2, warmup):  # (the schedules act as 2 below 2)
            return None
        return (f"{key}.warmup_num_steps={warmup} is more than the schedule's {total} steps ({length}={total}): the "
                f"learning rate is still warming up when the run ends; lower {key}.warmup_num_steps or raise {length}")

    def with_recompute(self, auto: str) -> "TrainConfig":
        """This config with ``train.recompute = "auto"`` resolved to ``auto`` (the run kind's default policy, one of
        :data:`moesaic.layer.recompute_policy.POLICIES`); an explicit policy is kept."""
        check_choice(auto, "auto", RECOMPUTE_POLICIES)
        if self.train.recompute != "auto":
            return self
        return dataclasses.replace(self, train=dataclasses.replace(self.train, recompute=auto))

    def batch(self) -> Tuple[int, int, int]:
        """``(global batch, micro batch per process, accumulation steps)`` for ``train.nproc`` processes."""
        return self.engine.check_batch(self.train.nproc, "engine")


def load_train_config(source: Union[str, os.PathLike, Mapping[str, Any], TrainConfig, None] = None,
                      overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Read and check a training config.

    Args:
        source: a ``.toml``/``.json`` path, a mapping of sections, a TrainConfig, or None (all defaults).
        overrides: ``{"engine.optimizer.params.lr": 1e-3, ...}``, applied to the source's keys before
            checking (so a schedule without ``total_num_steps`` follows an overridden ``train.steps``).

    Returns:
        The checked, frozen TrainConfig.

    Raises:
        ValueError / TypeError: naming the full key, its value and what is allowed.
        FileNotFoundError: the file does not exist.
    """
    if isinstance(source, TrainConfig):
        return source.with_overrides(overrides) if overrides else source
    data = load_source(source, "a .toml/.json path, a mapping or a TrainConfig")
    return TrainConfig.from_dict(apply_overrides(data, overrides))

