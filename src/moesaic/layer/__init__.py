"""The MoE layer: router -> dispatcher -> experts, and the identity of every expert parameter."""

from .dispatch import Dispatcher, LocalDispatcher
from .experts import Experts
from .moe import MoE, name_moe_layers, setup_expert_parallel
from .moe_layer import MOELayer
from .router import RouterConfig, TopKGate, compute_routing, expert_capacity
from .routing import Routing

__all__ = ["Dispatcher", "Experts", "LocalDispatcher", "MOELayer", "MoE", "RouterConfig", "Routing", "TopKGate",
           "compute_routing", "expert_capacity", "name_moe_layers", "setup_expert_parallel"]
