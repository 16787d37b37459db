"""The MoE layer: router -> dispatcher -> experts, and the identity of every expert parameter."""

from .balancing import update_expert_bias
from .dispatch import Dispatcher, LocalDispatcher
from .experts import ExpertContainer, Experts
from .ffn import FFNExpert, GLUExpert
from .config import MoEConfig, RouterConfig
from .moe import MixtureOfExperts, name_moe_layers, setup_expert_parallel
from .recompute_policy import apply_recompute, recompute_policy
from .replay import Routes, record_routing, replay_routing
from .gate import TopKGate, compute_routing, expert_capacity
from .routing import Routing
from .stacked import StackedExperts

__all__ = ["Dispatcher", "ExpertContainer", "Experts", "FFNExpert", "GLUExpert", "LocalDispatcher", "MixtureOfExperts", "MoEConfig",
           "RouterConfig", "Routes", "Routing", "StackedExperts", "TopKGate", "apply_recompute", "compute_routing",
           "expert_capacity", "name_moe_layers", "recompute_policy", "record_routing", "replay_routing", "setup_expert_parallel", "update_expert_bias"]
