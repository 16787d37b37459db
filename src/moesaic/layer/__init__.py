"""Single-process MoE code: router, dispatch, experts and the MoE layer."""

from .experts import Experts
from .gating import Routing, TopKGate, compute_routing, expert_capacity
from .moe import MoE, name_moe_layers, setup_expert_parallel

__all__ = ["Experts", "MoE", "Routing", "TopKGate", "compute_routing", "expert_capacity", "name_moe_layers", "setup_expert_parallel"]
