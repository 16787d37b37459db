"""moesaic: Mixture-of-Experts layers, expert parallelism and identity-aware optimizer groups."""

from .layer import (Experts, FFNExpert, GLUExpert, MixtureOfExperts, MoEConfig, RouterConfig, StackedExperts, TopKGate,
                    apply_recompute, name_moe_layers, record_routing, replay_routing, setup_expert_parallel,
                    update_expert_bias)
from .deepspeed import MoE
from .layer.identity import ExpertIndex, ExpertKey
from .optim.param_groups import (
    configure_moe_param_groups,
    describe_param_groups,
    has_moe_layers,
    is_moe_param,
    is_moe_param_group,
    split_params_grads_into_shared_and_expert_params,
    split_params_into_different_moe_groups_for_optimizer,
    split_params_into_shared_and_expert_params,
)

from .parallel import init_distributed
from .optim.fsdp import clip_grad_norm_, shard_model
from .engine import MoEEngine
from .deepspeed import initialize, safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state

__version__ = "0.1.0"

__all__ = [
    "Experts", "ExpertIndex", "ExpertKey", "MoE", "MixtureOfExperts", "MoEConfig", "TopKGate", "name_moe_layers", "setup_expert_parallel", "init_distributed", "initialize", "MoEEngine",
    "FFNExpert", "GLUExpert", "RouterConfig", "StackedExperts", "update_expert_bias", "apply_recompute", "record_routing", "replay_routing",
    "configure_moe_param_groups", "describe_param_groups", "has_moe_layers", "is_moe_param", "is_moe_param_group",
    "split_params_grads_into_shared_and_expert_params", "split_params_into_different_moe_groups_for_optimizer",
    "split_params_into_shared_and_expert_params", "safe_get_full_grad", "safe_get_full_fp32_param",
    "safe_get_full_optimizer_state", "shard_model", "clip_grad_norm_",
]
