"""DeepSpeed's keys that moesaic accepts with the values describing what it does, checked and dropped here.

DeepSpeed's config has settings that only choose between DeepSpeed's own implementations
(``prescale_gradients``, ``zero_optimization.contiguous_gradients``, ``bf16.immediate_grad_update``,
the whole ``activation_checkpointing`` section ...). moesaic's engine config does not hold them: they
describe nothing moesaic chooses. So that a DeepSpeed config runs unchanged, this bridge reads them:
each key is checked as a setting of the sections below (a value describing what moesaic always
does is accepted, any other is refused with the key path, the value, what is allowed and the
reason, :func:`moesaic._checks.only`), then dropped before the core's
:class:`~moesaic.engine.EngineConfig` is built. Values that only tune logging or speed in DeepSpeed
(``memory_breakdown: true``) are accepted with a note (:data:`moesaic.deepspeed.keys.VALUE_HINTS`).

The core sections name each of these keys in their ``MOVED`` table, so an ``EngineConfig`` given one
directly says that it is DeepSpeed's key and where it is accepted. A unit test pins that the two
lists agree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Type

from .._checks import check_bool, check_keys, join_key, only
from .._config import Section, section, setting
from ..engine.config import EngineConfig
from ..optim.config import OPTIMIZER_PARAMS, optimizer_type

_SUM = "moesaic sums gradient buckets in fp32 and divides after the sum"


@dataclass(frozen=True)
class ActivationCheckpointingConfig(Section):
    """DeepSpeed's ``activation_checkpointing`` section: how ``deepspeed.checkpointing.checkpoint`` stores inputs.

    In DeepSpeed the section configures the checkpoint calls a model makes; it turns nothing on.
    moesaic's MoE layers recompute exactly under any ``torch.utils.checkpoint`` (reentrant or
    not), DeepSpeed's included; to choose what is recomputed use ``moesaic.apply_recompute(model,
    policy)`` or ``train.recompute``. Each key is accepted with the value that describes what
    torch's checkpoint does; the others are refused with the reason.
    """

    PATH = "activation_checkpointing"

    partition_activations: bool = setting(
        False, doc="Split checkpointed inputs over model-parallel ranks (moesaic has no tensor parallelism).",
        check=only((False,), "moesaic has no tensor parallelism, so a checkpointed input has no model-parallel "
                             "partition"))
    cpu_checkpointing: bool = setting(
        False, doc="Offload checkpointed inputs to the CPU (not done: they stay on the device).",
        check=only((False,), "moesaic keeps checkpointed inputs on the device; offload them with "
                             "torch.autograd.graph.save_on_cpu if needed"))
    contiguous_memory_optimization: bool = setting(
        False, doc="Copy checkpointed inputs into one preallocated buffer (not done: torch's allocator holds them).",
        check=only((False,), "torch's caching allocator holds the checkpointed inputs; there is no contiguous buffer"))
    number_checkpoints: Optional[int] = setting(
        None, type_text="int or null", doc="Size of the contiguous buffer in checkpoints (only with "
                                           "contiguous_memory_optimization, so null).",
        check=only((None,), "it sizes the contiguous buffer of contiguous_memory_optimization, which moesaic does "
                            "not use"))
    synchronize_checkpoint_boundary: bool = setting(
        False, doc="CUDA-synchronize at every checkpoint boundary (a debugging aid; not done).",
        check=only((False,), "moesaic does not synchronize at checkpoint boundaries"))
    profile: bool = setting(False, doc="Time the checkpoint calls (not done; use torch.profiler).",
                            check=only((False,), "moesaic does not time checkpoint calls; use torch.profiler"))


@dataclass(frozen=True)
class TopLevelKeys(Section):
    """DeepSpeed's top-level keys that choose between DeepSpeed's implementations or tune its logging."""

    zero_allow_untested_optimizer: bool = setting(
        False, check=check_bool,
        doc="DeepSpeed's permission to shard an optimizer it has not tested. moesaic shards the optimizers it "
            "implements (Adam, AdamW, SGD) whatever this says and refuses any other; an error names this key.")
    zero_force_ds_cpu_optimizer: bool = setting(
        True, check=check_bool,
        doc="DeepSpeed's refusal of a client optimizer under ZeRO-Offload: moesaic always steps its own optimizer "
            "(a client optimizer is translated into it), so either value gives the same result.")
    communication_data_type: Optional[str] = setting(
        None, type_text="str or null", doc="dtype of gradient reductions: moesaic reduces in fp32 ('fp32' or null).",
        check=only((None, "fp32"), "moesaic sums gradient buckets in fp32"))
    prescale_gradients: bool = setting(False, doc="Divide gradients before the reduction (not done by moesaic).",
                                       check=only((False,), "moesaic sums gradient buckets in fp32 and divides after "
                                                            "the sum; an fp32 sum does not overflow"))
    gradient_predivide_factor: float = setting(
        1.0, doc="DeepSpeed's pre-division factor of the reduction (only 1.0: see prescale_gradients).",
        check=only((1.0,), _SUM))
    gradient_allreduce_op: str = setting("mean", doc="Gradients are averaged over the data-parallel ranks ('mean').",
                                         check=only(("mean",), "moesaic averages gradients (the gradient of the "
                                                               "global mean loss)"))
    sparse_gradients: bool = setting(False, doc="Sparse embedding gradients (not supported).",
                                     check=only((False,), "moesaic reduces dense gradients only"))
    managed_gradient_accumulation: bool = setting(
        True, doc="The engine counts micro-batches to find the accumulation boundary (always, in moesaic).",
        check=only((True,), "moesaic counts micro-batches (or follows set_gradient_accumulation_boundary)"))
    memory_breakdown: bool = setting(False, check=check_bool,
                                     doc="DeepSpeed's per-step memory print: a logging hint, accepted with a note "
                                         "(moesaic does not print it; see benchmarks/bench_step_memory.py).")
    dump_state: bool = setting(False, check=check_bool,
                               doc="DeepSpeed's dump of its state at start: a logging hint, accepted with a note "
                                   "(print engine.config).")
    disable_allgather: bool = setting(False, check=check_bool,
                                      doc="DeepSpeed's switch to broadcasts: moesaic's owners always broadcast, so "
                                          "either value gives the same result (true is noted).")
    activation_checkpointing: ActivationCheckpointingConfig = section(
        ActivationCheckpointingConfig, doc="DeepSpeed's checkpoint-call settings (recompute itself: "
                                         "moesaic.apply_recompute / train.recompute).")


@dataclass(frozen=True)
class FlopsProfilerKeys(Section):
    """``flops_profiler``'s DeepSpeed-only key."""

    PATH = "flops_profiler"

    recompute_fwd_factor: float = setting(
        0.0, doc="DeepSpeed's estimate of recomputed forward FLOPs (only 0.0).",
        check=only((0.0,), "moesaic counts the backward's FLOPs as executed, activation recomputation included"))


@dataclass(frozen=True)
class AdamKeys(Section):
    """``optimizer.params``' DeepSpeed-only key when the type is Adam or AdamW."""

    PATH = "optimizer.params"

    torch_adam: bool = setting(False, check=check_bool,
                               doc="DeepSpeed's choice of torch's kernel over its fused one; the update is the same "
                                   "math either way and moesaic always runs its own grouped implementation.")


@dataclass(frozen=True)
class FP16Keys(Section):
    """``fp16``'s DeepSpeed-only keys."""

    PATH = "fp16"

    auto_cast: bool = setting(False, doc="DeepSpeed's cast of floating-point inputs to fp16 (not done by moesaic).",
                              check=only((False,), "moesaic does not cast the inputs; give the model tensors in "
                                                   "its dtype"))
    fp16_master_weights_and_grads: bool = setting(
        False, doc="DeepSpeed's fp16 master weights (moesaic keeps them in fp32).",
        check=only((False,), "moesaic keeps master weights and gradients for the step in fp32"))


@dataclass(frozen=True)
class BF16Keys(Section):
    """``bf16``'s DeepSpeed-only keys: DeepSpeed's variants of bf16 training, accepted as moesaic does it."""

    PATH = "bf16"

    check_grad_overflow: bool = setting(True, doc="Skip the step on every rank when a gradient is inf/nan (always "
                                                  "on in moesaic).",
                                        check=only((True,), "moesaic always checks bf16 gradients for inf/nan and "
                                                            "skips the step on every rank"))
    immediate_grad_update: bool = setting(
        False, doc="DeepSpeed's fp32 gradient accumulation during backward (not done by moesaic).",
        check=only((False,), "moesaic accumulates gradients in the parameters' .grad and converts one group to "
                             "fp32 at the step"))
    bf16_master_weights_and_grads: bool = setting(
        False, doc="DeepSpeed's bf16 master weights (moesaic keeps them in fp32).",
        check=only((False,), "moesaic keeps master weights in fp32"))
    bf16_optimizer_states: bool = setting(False, doc="DeepSpeed's bf16 optimizer state (moesaic keeps it in fp32).",
                                          check=only((False,), "moesaic keeps optimizer state in fp32"))


_REUSE_WHY = ("moesaic's stage 3 (torch's FSDP2) frees or keeps a whole unit's gathered parameters after forward, "
              "not by a reuse distance in parameters: 0 (release every parameter) is zero_optimization."
              "reshard_after_forward true; to keep gathered parameters until backward set "
              "zero_optimization.reshard_after_forward false instead")
_PERSIST_WHY = ("moesaic's stage 3 (torch's FSDP2) shards every parameter of every unit, however small: 0 "
                "(partition every parameter) is the only threshold that says so")


def _opt_bool(value: Any, key: str) -> Optional[bool]:
    return None if value is None else check_bool(value, key)


@dataclass(frozen=True)
class ZeroKeys(Section):
    """``zero_optimization``'s DeepSpeed-only keys: choices between DeepSpeed's ZeRO implementations."""

    PATH = "zero_optimization"

    contiguous_gradients: bool = setting(
        True, check=check_bool,
        doc="Copy gradients into contiguous buffers: moesaic always reduces each bucket from one buffer, so either "
            "value gives the same result (false is noted).")
    round_robin_gradients: bool = setting(
        False, check=check_bool,
        doc="Round-robin gradient partitioning (an offload speed hint): moesaic assigns whole groups to owners by "
            "size, so either value gives the same result (true is noted).")
    allgather_partitions: bool = setting(
        True, check=check_bool,
        doc="All-gather (true) or broadcasts (false) to hand every rank the updated weights: either way every "
            "rank ends the step with all of them; moesaic's owners broadcast, bucketed by allgather_bucket_size.")
    load_from_fp32_weights: bool = setting(
        True, doc="Restore fp32 master weights from the checkpoint (always, when it holds optimizer state).",
        check=only((True,), "moesaic restores master weights from the checkpoint's fp32 copy"))
    elastic_checkpoint: bool = setting(
        False, check=check_bool,
        doc="Load ZeRO checkpoints under another data-parallel size: moesaic's checkpoints always do, so either "
            "value gives the same result.")
    ignore_unused_parameters: bool = setting(
        True, doc="Parameters without a gradient are skipped (always, in moesaic).",
        check=only((True,), "moesaic skips parameters that received no gradient"))
    cpu_offload: Optional[bool] = setting(None, check=_opt_bool,
                                          doc="DeepSpeed's former spelling of offload_optimizer.device 'cpu' (true "
                                              "sets it).")
    stage3_max_reuse_distance: Optional[int] = setting(
        None, check=only((None, 0), _REUSE_WHY),
        doc="DeepSpeed's distance (in parameters) within which a gathered parameter is kept for its reuse; 0 "
            "(release every parameter after use) is reshard_after_forward true. null: not set.")
    max_reuse_distance: Optional[int] = setting(None, check=only((None, 0), _REUSE_WHY),
                                                doc="DeepSpeed's other spelling of stage3_max_reuse_distance.")
    stage3_param_persistence_threshold: Optional[int] = setting(
        None, check=only((None, 0), _PERSIST_WHY),
        doc="DeepSpeed's size below which a parameter is not partitioned at stage 3; 0 (partition every "
            "parameter) is what moesaic's stage 3 does. null: not set.")
    param_persistence_threshold: Optional[int] = setting(
        None, check=only((None, 0), _PERSIST_WHY),
        doc="DeepSpeed's other spelling of stage3_param_persistence_threshold.")

    def apply(self, node: Dict[str, Any], path: str) -> None:
        """Check these keys against the core's (``reshard_after_forward``) and translate ``cpu_offload``."""
        if node.get("reshard_after_forward", True) is False:
            for key in ("stage3_max_reuse_distance", "max_reuse_distance"):
                if getattr(self, key) == 0:
                    raise ValueError(f"{path}.{key}=0 (release every gathered parameter after use) contradicts "
                                     f"{path}.reshard_after_forward=false (keep them until backward); set one of "
                                     f"them")
        if self.cpu_offload and isinstance(node.get("offload_optimizer", {}), Mapping):
            node["offload_optimizer"] = {**node.get("offload_optimizer", {}), "device": "cpu"}


@dataclass(frozen=True)
class OffloadOptimizerKeys(Section):
    """``zero_optimization.offload_optimizer``'s DeepSpeed-only key."""

    PATH = "zero_optimization.offload_optimizer"

    pin_memory: bool = setting(False, doc="Pinned host buffers (not used by moesaic's offload; DeepSpeed's default "
                                          "is true).",
                               check=only((False,), "moesaic's CPU offload copies through ordinary host memory"))


#: ``{section path in DeepSpeed's config: the section of its DeepSpeed-only keys}``.
ACCEPTED: Dict[str, Type[Section]] = {
    "": TopLevelKeys,
    "flops_profiler": FlopsProfilerKeys,
    "optimizer.params": AdamKeys,
    "fp16": FP16Keys,
    "bf16": BF16Keys,
    "zero_optimization": ZeroKeys,
    "zero_optimization.offload_optimizer": OffloadOptimizerKeys,
}


def _names(cls: Type[Section]) -> List[str]:
    return [f.name for f in fields(cls)]


def _optimizer_kind(data: Mapping[str, Any]) -> Optional[str]:
    """The optimizer type ``data`` names (AdamW when absent) as moesaic spells it; None for one it has not."""
    opt = data.get("optimizer")
    kind = opt.get("type", "AdamW") if isinstance(opt, Mapping) else "AdamW"
    return optimizer_type(kind, "optimizer.type") if isinstance(kind, str) and kind else None


def _core_section(path: str, data: Mapping[str, Any]) -> Optional[Type[Section]]:
    """The core section class at ``path`` of the engine config (``optimizer.params``: the type's params)."""
    if path == "optimizer.params":
        return OPTIMIZER_PARAMS.get(_optimizer_kind(data))
    cls: Type[Section] = EngineConfig
    for part in path.split(".") if path else ():
        cls = next(f.metadata["section"] for f in fields(cls) if f.name == part)
    return cls


def _dicts(value: Any) -> Any:
    """A deep copy with every mapping a dict (the sections are edited in place)."""
    if isinstance(value, Mapping):
        return {k: _dicts(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _node(data: Dict[str, Any], path: str) -> Optional[Dict[str, Any]]:
    for part in path.split(".") if path else ():
        data = data.get(part) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


def accept_deepspeed_keys(data: Any, path: str = "") -> Any:
    """``data`` (DeepSpeed's config mapping at ``path``) without its DeepSpeed-only keys, each checked first.

    Args:
        data: the engine config's mapping, refused keys and hints already taken out (not changed).
        path: its key path, for messages (``"engine"`` inside a training config).

    Returns:
        A copy of ``data`` without the keys of :data:`ACCEPTED`; anything else is left to the core's
        :meth:`EngineConfig.from_dict`.

    Raises:
        ValueError: an unknown key in a section holding accepted keys (the allowed keys listed are
            the core's and the bridge's), or a value the key does not accept, with the reason.
        TypeError: a value of the wrong type.
    """
    if not isinstance(data, Mapping):
        return data
    out = _dicts(data)
    for where, cls in ACCEPTED.items():
        node = _node(out, where)
        if node is None or (cls is AdamKeys and _optimizer_kind(out) not in ("Adam", "AdamW")):
            continue
        core = _core_section(where, out)
        key = join_key(path, where) if where else path
        if core is not None:
            check_keys(node, key, _names(core) + _names(cls))
        keys = cls.from_dict({name: node.pop(name) for name in _names(cls) if name in node}, key)
        if hasattr(keys, "apply"):
            keys.apply(node, key)
    return out


def accepted_rows():
    """The accepted keys' reference rows (:class:`moesaic._config.KeyDoc`), paths as in DeepSpeed's config."""
    return [row for where, cls in ACCEPTED.items() for row in cls.describe(where)]
