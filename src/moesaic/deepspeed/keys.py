"""DeepSpeed's config keys that moesaic does not implement: each one is named and explained.

``moesaic.initialize`` reads DeepSpeed's config. A key moesaic implements is a setting of
:class:`~moesaic.engine.EngineConfig` (or of its sections) and does what DeepSpeed's does. The
rest fall in three kinds, and none is ever silently ignored:

* **accepted keys** (:mod:`moesaic.deepspeed.accepted`): keys that only choose between DeepSpeed's
  own implementations, accepted with the values describing what moesaic always does
  (``zero_optimization.contiguous_gradients: true``: moesaic reduces each bucket of gradients from
  one contiguous buffer) and dropped; any other value is refused with the reason;
* **refused keys** (:data:`REFUSED`): features moesaic does not have (DeepSpeed's ZeRO-3 tuning, NVMe offload,
  pipeline parallelism, autotuning ...). Present with any value, they are refused with the
  reason; a feature section whose ``enabled`` is false asks for nothing and is accepted.

* **hints** (:data:`HINTS`): keys that only tune speed, memory placement or logging in DeepSpeed
  and cannot change the numbers: accepted with any value, and ``initialize`` notes each one once.

All three kinds are listed in ``docs/config-reference.md`` (generated).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from .._checks import join_key
from ..optim.config import OPTIMIZER_TYPES, SCHEDULER_ALLOWED, SCHEDULER_TYPES, optimizer_type, torch_scheduler_class

# --- refused keys ---------------------------------------------------------------------------------

_ZERO3 = ("a ZeRO-3 (parameter partitioning) tuning key of DeepSpeed's own partitioner; moesaic's stage 3 is "
          "torch's FSDP2, which has no such setting")
_ZERO3_PREFETCH = ("a ZeRO-3 prefetch size in elements; moesaic's stage 3 is torch's FSDP2, which prefetches whole "
                   "units (the next transformer block), not a number of elements")
_ZERO3_PERSIST = ("a ZeRO-3 threshold below which parameters stay whole; moesaic's stage 3 (torch's FSDP2) shards "
                  "every parameter of every unit")
_ZERO3_LIVE = ("a ZeRO-3 limit on gathered parameters; moesaic's stage 3 (torch's FSDP2) gathers one unit (an MoE "
               "layer's experts, a block) at a time and frees it after forward (zero_optimization."
               "reshard_after_forward false keeps it until backward)")
_ZERO3_SAVE = ("gathers 16-bit weights onto one rank at save time under ZeRO-3; moesaic's stage-3 checkpoints store "
               "each rank's fp32 rows by identity and load whole into any layout (W=1, stage 0 included)")
_ZERO3_OFFLOAD = "parameter offload; moesaic's stage 3 (torch's FSDP2) keeps the shards on the parameters' device"
_ZEROPP = "a ZeRO++ key (quantized/hierarchical partitions of DeepSpeed's ZeRO-3); moesaic has no ZeRO++"
_NO_TP = "moesaic has no tensor, pipeline or sequence parallelism (experts are parallel, the rest is data parallel)"

#: ``{section path: {key: reason}}`` for the keys refused with any value ("" is the top level).
#: Feature sections listed in :data:`FEATURE_SECTIONS` are accepted while ``enabled`` is false.
REFUSED: Dict[str, Dict[str, str]] = {
    "": {
        "autotuning": "moesaic has no autotuner",
        "elasticity": "moesaic has no elastic batch-size search; checkpoints reload under any world size instead",
        "pipeline": _NO_TP,
        "tensor_parallel": _NO_TP,
        "sequence_parallel_size": _NO_TP,
        "data_parallel_size": "moesaic's data-parallel size is the world size",
        "expert_parallel": "DeepSpeed's AutoEP rewrites a model's experts; in moesaic, build the layers with "
                           "moesaic.MoE(ep_size=...)",
        "hybrid_engine": "moesaic has no RLHF hybrid engine",
        "compression_training": "moesaic has no compression training",
        "data_efficiency": "moesaic has no curriculum/data-efficiency sampler; order the data yourself",
        "curriculum_learning": "moesaic has no curriculum/data-efficiency sampler; order the data yourself",
        "torch_autocast": "moesaic trains in the model's dtype (bf16/fp16 with fp32 master weights); autocast "
                          "is not applied",
        "amp": "moesaic has its own fp16/bf16 with fp32 master weights; apex amp is not used",
        "aio": "moesaic has no NVMe offload",
        "compile": "moesaic does not compile the model; call torch.compile on the model yourself",
        "weight_quantization": "moesaic does not quantize weights",
        "zenflow": "moesaic has no ZenFlow",
        "data_types": "moesaic keeps parameters and gradients in the model's dtype and master weights and "
                      "optimizer state in fp32; these choices are fixed",
        "seq_parallel_communication_data_type": _NO_TP,
        "fp8": "moesaic has no fp8 training",
    },
    "zero_optimization": {
        "offload_param": _ZERO3_OFFLOAD,
        "sub_group_size": _ZERO3,
        "prefetch_bucket_size": _ZERO3_PREFETCH,
        "stage3_prefetch_bucket_size": _ZERO3_PREFETCH,
        "model_persistence_threshold": _ZERO3_PERSIST,
        "stage3_model_persistence_threshold": _ZERO3_PERSIST,
        "max_live_parameters": _ZERO3_LIVE,
        "stage3_max_live_parameters": _ZERO3_LIVE,
        "gather_16bit_weights_on_model_save": _ZERO3_SAVE,
        "stage3_gather_16bit_weights_on_model_save": _ZERO3_SAVE,
        "stage3_gather_fp16_weights_on_model_save": _ZERO3_SAVE,
        "module_granularity_threshold": _ZERO3,
        "stage3_module_granularity_threshold": _ZERO3,
        "use_all_reduce_for_fetch_params": _ZERO3,
        "stage3_use_all_reduce_for_fetch_params": _ZERO3,
        "allgather_sequential": _ZERO3,
        "stage3_allgather_sequential": _ZERO3,
        "cpu_offload_param": _ZERO3_OFFLOAD,
        "zero_hpz_partition_size": _ZEROPP,
        "zero_quantized_weights": _ZEROPP,
        "zero_quantized_nontrainable_weights": _ZEROPP,
        "zero_quantized_gradients": _ZEROPP,
        "zeropp_loco_param": _ZEROPP,
        "mics_shard_size": "MiCS (hierarchical ZeRO-3 partitioning); moesaic's stage 3 shards over every rank",
        "mics_hierarchical_params_gather": "MiCS (hierarchical ZeRO-3 partitioning); moesaic's stage 3 shards over every rank",
        "memory_efficient_linear": _ZERO3,
        "pipeline_loading_checkpoint": _ZERO3,
        "override_module_apply": _ZERO3,
        "leaf_module": _ZERO3,
        "zenflow": "moesaic has no ZenFlow",
        "enable_sanity_checks": "DeepSpeed's ZeRO-3 partitioner's sanity checks; moesaic's stage 3 is torch's FSDP2",
        "save_muon_momentum_buffer_in_memory": "moesaic has no Muon optimizer",
        "compute_grad_norm": "moesaic always computes the global gradient norm (dense once, each expert once)",
    },
    "zero_optimization.offload_optimizer": {
        "nvme_path": "moesaic offloads to CPU memory only, not to NVMe",
        "ratio": "moesaic offloads all of the optimizer state or none of it",
        "super_offload": "moesaic has no SuperOffload",
    },
    "checkpoint": {
        "load_universal": "moesaic checkpoints load under any world and ep size by themselves; there is no "
                          "universal-checkpoint conversion",
        "use_node_local_storage": "moesaic writes one checkpoint folder that every rank reads",
        "writer": "moesaic has one checkpoint writer",
    },
}

# --- refused names -------------------------------------------------------------------------------

#: Optimizer names DeepSpeed accepts (its own, any case, and torch.optim classes) that moesaic does not step.
_GROUPED = "moesaic steps its own grouped Adam, AdamW and SGD one parameter group at a time"
REFUSED_OPTIMIZERS: Dict[str, str] = {
    "lamb": f"DeepSpeed's fused LAMB is not implemented; {_GROUPED}",
    "onebitadam": f"DeepSpeed's 1-bit Adam (compressed communication) is not implemented; {_GROUPED}",
    "zerooneadam": f"DeepSpeed's 0/1 Adam (compressed communication) is not implemented; {_GROUPED}",
    "onebitlamb": f"DeepSpeed's 1-bit LAMB is not implemented; {_GROUPED}",
    "lion": f"Lion is not implemented; {_GROUPED}",
    "adagrad": f"Adagrad is not implemented; {_GROUPED}",
    "muadam": f"mup's MuAdam is not implemented; {_GROUPED}",
    "muadamw": f"mup's MuAdamW is not implemented; {_GROUPED}",
    "musgd": f"mup's MuSGD is not implemented; {_GROUPED}",
    "muon": f"Muon is not implemented; {_GROUPED}",
}
#: DeepSpeed's own schedules moesaic does not implement (torch.optim.lr_scheduler classes are honoured).
REFUSED_SCHEDULERS: Dict[str, str] = {
    "OneCycle": "DeepSpeed's OneCycle is not implemented; use torch's OneCycleLR (\"type\": \"OneCycleLR\") or "
                "WarmupLR, WarmupDecayLR, WarmupCosineLR",
    "LRRangeTest": "DeepSpeed's LRRangeTest is not implemented; use WarmupLR, WarmupDecayLR, WarmupCosineLR or a "
                   "torch.optim.lr_scheduler class",
}


def refuse_deepspeed_names(data: Any, path: str) -> None:
    """Raise for an ``optimizer.type`` or ``scheduler.type`` DeepSpeed accepts and moesaic does not implement.

    Args:
        data: the engine config's mapping (DeepSpeed's top level).
        path: its key path, for messages (``"engine"`` inside a training config).

    Raises:
        ValueError: naming the key, the value, why it is refused and the names allowed. Other
            values are left to the core's check.
    """
    if not isinstance(data, Mapping):
        return
    opt, sched = data.get("optimizer"), data.get("scheduler")
    kind = opt.get("type") if isinstance(opt, Mapping) else None
    if isinstance(kind, str) and kind and optimizer_type(kind, "") is None:
        reason = REFUSED_OPTIMIZERS.get(kind.lower())
        if reason is None:
            import torch.optim

            if isinstance(getattr(torch.optim, kind, None), type):
                reason = f"torch.optim.{kind} is not implemented; {_GROUPED}"
        if reason is not None:
            raise ValueError(f"{join_key(path, 'optimizer.type')}={kind!r} is not supported by moesaic: {reason}; "
                             f"allowed: {', '.join(OPTIMIZER_TYPES)} (any case)")
    kind = sched.get("type") if isinstance(sched, Mapping) else None
    if isinstance(kind, str) and kind in REFUSED_SCHEDULERS and kind not in SCHEDULER_TYPES \
            and torch_scheduler_class(kind) is None:
        raise ValueError(f"{join_key(path, 'scheduler.type')}={kind!r} is not supported by moesaic: "
                         f"{REFUSED_SCHEDULERS[kind]}; allowed: {SCHEDULER_ALLOWED}")


_HINT = "a performance or logging hint of DeepSpeed's; it cannot change the numbers, and moesaic "
_MONITOR_HINT = _HINT + "logs metrics to log_dir= of moesaic.initialize (metrics.csv and TensorBoard events) instead"

#: ``{section path: {key: what moesaic does instead}}``: DeepSpeed keys that only tune speed, memory
#: placement or logging, accepted with any value and a one-time note (:func:`hint_notes`), never acted on.
HINTS: Dict[str, Dict[str, str]] = {
    "": {
        "comms_logger": _HINT + "does not log collectives (use torch.profiler)",
        "tensorboard": _MONITOR_HINT,
        "wandb": _MONITOR_HINT,
        "csv_monitor": _MONITOR_HINT,
        "comet": _MONITOR_HINT,
        "aim": _MONITOR_HINT,
        "monitor_config": _MONITOR_HINT,
        "timers": _HINT + "times forward/backward/step with wall_clock_breakdown",
        "vocabulary_size": _HINT + "has no use for the tensor-core alignment hint",
        "graph_harvesting": _HINT + "does not capture CUDA graphs",
        "autotuning": _HINT + "has no autotuner (run the config as given)",
    },
    "zero_optimization": {
        "cpu_offload_use_pin_memory": _HINT + "does not pin the offloaded host memory",
        "use_multi_rank_bucket_allreduce": _HINT + "reduces each expert-data-parallel group's buckets separately",
        "parameter_alignment": _HINT + "keeps every parameter as its own tensor (no flat buffer to align)",
        "legacy_stage1": _HINT + "has one implementation per stage",
        "log_trace_cache_warnings": _HINT + "has no ZeRO-3 trace cache",
    },
    "zero_optimization.offload_optimizer": {
        "buffer_count": _HINT + "offloads to CPU memory, where NVMe buffers have no use",
        "fast_init": _HINT + "offloads to CPU memory, where NVMe initialisation has no use",
        "pipeline_read": _HINT + "offloads to CPU memory, where NVMe pipelining has no use",
        "pipeline_write": _HINT + "offloads to CPU memory, where NVMe pipelining has no use",
        "cpuadam_cores_perc": _HINT + "steps with torch's optimizers on the threads torch uses",
    },
    "checkpoint": {
        "parallel_write": _HINT + "already writes each rank's experts in parallel",
    },
}

#: ``{key path: (value moesaic's behaviour matches, note for any other value)}``: accepted keys
#: (:mod:`moesaic.deepspeed.accepted`) whose other values only tune speed, memory or logging; noted once when given.
VALUE_HINTS: Dict[str, tuple] = {
    "memory_breakdown": (False, _HINT + "does not print memory per step (see benchmarks/bench_step_memory.py)"),
    "dump_state": (False, _HINT + "does not dump its state (print engine.config)"),
    "disable_allgather": (False, _HINT.rstrip() + "'s owners broadcast their updated weights either way"),
    "zero_optimization.contiguous_gradients": (True, _HINT + "copies each bucket of gradients into one buffer "
                                                             "either way"),
    "zero_optimization.round_robin_gradients": (False, _HINT + "assigns whole groups to owners, balanced by size"),
    "zero_optimization.allgather_partitions": (True, _HINT.rstrip() + "'s owners broadcast their updated weights "
                                                                      "either way"),
    "zero_optimization.elastic_checkpoint": (False, _HINT.rstrip() + "'s checkpoints load under any world size "
                                                                     "either way"),
}

_NOTED: set = set()


def hint_notes(data: Any, section: str = "") -> list:
    """``"<key>: <note>"`` for every hint key of :data:`HINTS` present in ``data`` (a raw config mapping)."""
    if not isinstance(data, Mapping):
        return []
    out = []
    for name, value in data.items():
        if not isinstance(name, str):
            continue
        path = join_key(section, name)
        if name in HINTS.get(section, {}) and not (section == "" and name in FEATURE_SECTIONS and _disabled(value)):
            out.append(f"{path}: {HINTS[section][name]}")
        elif path in VALUE_HINTS and value != VALUE_HINTS[path][0] and isinstance(value, bool):
            out.append(f"{path}={str(value).lower()}: {VALUE_HINTS[path][1]}")
        elif (path in HINTS or path == "zero_optimization") and isinstance(value, Mapping):
            out.extend(hint_notes(value, path))
    return out


def note_hints_once(data: Any, emit) -> None:
    """Call ``emit(message)`` for each hint key of ``data`` not noted before in this process."""
    for note in hint_notes(data):
        if note not in _NOTED:
            _NOTED.add(note)
            emit(f"note: {note}; accepted, it changes nothing here")


#: Top-level feature sections accepted when disabled (``{"enabled": false}``): they ask for nothing.
FEATURE_SECTIONS = ("elasticity", "hybrid_engine", "data_efficiency",
                    "curriculum_learning", "torch_autocast", "amp", "compile", "fp8")


def refuse_deepspeed_keys(data: Any, path: str, section: str = "") -> Any:
    """``data`` without the disabled feature sections; raise for a refused DeepSpeed key.

    Args:
        data: the section's mapping as given (not changed).
        path: the section's key path, for messages (``"engine.zero_optimization"``).
        section: the section's name in :data:`REFUSED` (``""`` for the top level).

    Returns:
        A copy of ``data`` without the accepted (disabled) feature sections, with the nested
        sections of :data:`REFUSED` checked the same way; anything else is left to the section's
        own key check.

    Raises:
        ValueError: naming the key, DeepSpeed's meaning and why moesaic refuses it.
    """
    if not isinstance(data, Mapping):
        return data
    table = REFUSED.get(section, {})
    hints = HINTS.get(section, {})
    out = {}
    for name, value in data.items():
        if isinstance(name, str) and name in hints:
            continue  # a hint: noted by note_hints_once, never acted on
        reason = table.get(name) if isinstance(name, str) else None
        if reason is None:
            nested = join_key(section, name) if isinstance(name, str) else None
            if (nested in REFUSED or nested in HINTS) and isinstance(value, Mapping):
                value = refuse_deepspeed_keys(value, join_key(path, name), nested)
            out[name] = value
            continue
        if section == "" and name in FEATURE_SECTIONS and _disabled(value):
            continue  # {"enabled": false}: asks for nothing
        raise ValueError(f"{join_key(path, name)} is a DeepSpeed key that moesaic does not support: {reason}; "
                         f"remove it{' (or set enabled: false)' if section == '' and name in FEATURE_SECTIONS else ''}")
    return out


def _disabled(value: Any) -> bool:
    if isinstance(value, bool):
        return value is False
    return isinstance(value, Mapping) and (not value or value.get("enabled", True) is False)


def refused_rows():
    """``(key path, reason)`` of every refused key, for the generated reference."""
    return [(join_key(section, name), reason) for section, table in REFUSED.items() for name, reason in table.items()]


def hint_rows():
    """``(key path, note)`` of every hint key, for the generated reference."""
    return [(join_key(section, name), note) for section, table in HINTS.items() for name, note in table.items()]
