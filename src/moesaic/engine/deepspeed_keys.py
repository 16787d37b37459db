"""DeepSpeed's config keys that moesaic does not implement: each one is named and explained.

``moesaic.initialize`` reads DeepSpeed's config. A key moesaic implements is a setting of
:class:`~moesaic.engine.EngineConfig` (or of its sections) and does what DeepSpeed's does. The
rest fall in two kinds, and neither is ever silently ignored:

* **accepted values** (:func:`moesaic._checks.only`): the key is a setting whose values describe what moesaic
  always does (``zero_optimization.contiguous_gradients: true``: moesaic reduces each bucket of
  gradients from one contiguous buffer); any other value is refused with the reason;
* **refused keys** (:data:`REFUSED`): features moesaic does not have (ZeRO-3, NVMe offload,
  pipeline parallelism, profilers ...). Present with any value, they are refused with the
  reason; a feature section whose ``enabled`` is false asks for nothing and is accepted.

Both kinds are listed in ``docs/config-reference.md`` (generated).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from .._checks import join_key

# --- refused keys ---------------------------------------------------------------------------------

_ZERO3 = "a ZeRO-3 (parameter partitioning) key; moesaic implements stages 0-2"
_ZEROPP = "a ZeRO++ key (quantized/hierarchical partitions of ZeRO-3); moesaic implements stages 0-2"
_NO_TP = "moesaic has no tensor, pipeline or sequence parallelism (experts are parallel, the rest is data parallel)"
_MONITOR = "moesaic writes TensorBoard events and metrics.csv itself: pass log_dir= to moesaic.initialize"

#: ``{section path: {key: reason}}`` for the keys refused with any value ("" is the top level).
#: Feature sections listed in :data:`FEATURE_SECTIONS` are accepted while ``enabled`` is false.
REFUSED: Dict[str, Dict[str, str]] = {
    "": {
        "flops_profiler": "moesaic has no FLOPs profiler; use torch.profiler",
        "autotuning": "moesaic has no autotuner",
        "elasticity": "moesaic has no elastic batch-size search; checkpoints reload under any world size instead",
        "comms_logger": "moesaic does not log collectives; use torch.profiler",
        "tensorboard": _MONITOR,
        "wandb": _MONITOR,
        "csv_monitor": _MONITOR,
        "comet": _MONITOR,
        "aim": _MONITOR,
        "monitor_config": _MONITOR,
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
        "timers": "moesaic's timers are wall_clock_breakdown's",
        "data_types": "moesaic keeps parameters and gradients in the model's dtype and master weights and "
                      "optimizer state in fp32; these choices are fixed",
        "vocabulary_size": "a tensor-core alignment hint of DeepSpeed's; it has no meaning for moesaic",
        "seq_parallel_communication_data_type": _NO_TP,
        "fp8": "moesaic has no fp8 training",
        "graph_harvesting": "moesaic does not capture CUDA graphs",
    },
    "zero_optimization": {
        "offload_param": _ZERO3,
        "sub_group_size": _ZERO3,
        "prefetch_bucket_size": _ZERO3,
        "stage3_prefetch_bucket_size": _ZERO3,
        "param_persistence_threshold": _ZERO3,
        "stage3_param_persistence_threshold": _ZERO3,
        "model_persistence_threshold": _ZERO3,
        "stage3_model_persistence_threshold": _ZERO3,
        "max_live_parameters": _ZERO3,
        "stage3_max_live_parameters": _ZERO3,
        "max_reuse_distance": _ZERO3,
        "stage3_max_reuse_distance": _ZERO3,
        "gather_16bit_weights_on_model_save": _ZERO3,
        "stage3_gather_16bit_weights_on_model_save": _ZERO3,
        "stage3_gather_fp16_weights_on_model_save": _ZERO3,
        "module_granularity_threshold": _ZERO3,
        "stage3_module_granularity_threshold": _ZERO3,
        "use_all_reduce_for_fetch_params": _ZERO3,
        "stage3_use_all_reduce_for_fetch_params": _ZERO3,
        "allgather_sequential": _ZERO3,
        "stage3_allgather_sequential": _ZERO3,
        "cpu_offload_param": _ZERO3,
        "cpu_offload_use_pin_memory": "moesaic's CPU offload does not pin host memory",
        "zero_hpz_partition_size": _ZEROPP,
        "zero_quantized_weights": _ZEROPP,
        "zero_quantized_nontrainable_weights": _ZEROPP,
        "zero_quantized_gradients": _ZEROPP,
        "zeropp_loco_param": _ZEROPP,
        "mics_shard_size": "MiCS (hierarchical ZeRO-3 partitioning); moesaic implements stages 0-2",
        "mics_hierarchical_params_gather": "MiCS (hierarchical ZeRO-3 partitioning); moesaic implements stages 0-2",
        "memory_efficient_linear": _ZERO3,
        "pipeline_loading_checkpoint": _ZERO3,
        "override_module_apply": _ZERO3,
        "leaf_module": _ZERO3,
        "zenflow": "moesaic has no ZenFlow",
        "legacy_stage1": "DeepSpeed's old stage-1 implementation; moesaic has one implementation per stage",
        "parameter_alignment": "DeepSpeed's flat-buffer alignment; moesaic keeps every parameter as its own tensor",
        "log_trace_cache_warnings": _ZERO3,
        "enable_sanity_checks": "DeepSpeed's ZeRO-3 sanity checks; moesaic implements stages 0-2",
        "save_muon_momentum_buffer_in_memory": "moesaic has no Muon optimizer",
        "use_multi_rank_bucket_allreduce": "moesaic reduces expert gradients over each expert-data-parallel group "
                                           "separately; there is no multi-rank bucket all-reduce to choose",
        "compute_grad_norm": "moesaic always computes the global gradient norm (dense once, each expert once)",
    },
    "zero_optimization.offload_optimizer": {
        "nvme_path": "moesaic offloads to CPU memory only, not to NVMe",
        "buffer_count": "moesaic offloads to CPU memory only, not to NVMe",
        "pipeline_read": "moesaic offloads to CPU memory only, not to NVMe",
        "pipeline_write": "moesaic offloads to CPU memory only, not to NVMe",
        "fast_init": "moesaic offloads to CPU memory only, not to NVMe",
        "ratio": "moesaic offloads all of the optimizer state or none of it",
        "super_offload": "moesaic has no SuperOffload",
        "cpuadam_cores_perc": "moesaic has no DeepSpeed CPU Adam",
    },
    "checkpoint": {
        "load_universal": "moesaic checkpoints load under any world and ep size by themselves; there is no "
                          "universal-checkpoint conversion",
        "use_node_local_storage": "moesaic writes one checkpoint folder that every rank reads",
        "parallel_write": "moesaic's ranks already write their own experts in parallel",
        "writer": "moesaic has one checkpoint writer",
    },
}

#: Top-level feature sections accepted when disabled (``{"enabled": false}``): they ask for nothing.
FEATURE_SECTIONS = ("flops_profiler", "autotuning", "elasticity", "comms_logger",
                    "tensorboard", "wandb", "csv_monitor", "comet", "aim", "hybrid_engine", "data_efficiency",
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
    out = {}
    for name, value in data.items():
        reason = table.get(name) if isinstance(name, str) else None
        if reason is None:
            nested = join_key(section, name) if isinstance(name, str) else None
            if nested in REFUSED and isinstance(value, Mapping):
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
