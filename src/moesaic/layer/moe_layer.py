"""``MOELayer``: router -> dispatcher -> experts -> combine, one path whatever the parallelism.

DeepSpeed's ``MoE`` keeps this inner layer as ``deepspeed_moe`` (class ``MOELayer`` in
``deepspeed/moe/sharded_moe.py``) with the router as ``gate`` and the experts as ``experts``;
moesaic keeps the same structure, so ``state_dict`` keys are DeepSpeed's. The dispatcher is not a
module (it holds no parameters): a :class:`~moesaic.layer.dispatch.LocalDispatcher` when every
expert is local, or whatever ``set_dispatcher`` installs when the layer is put on its process
groups.

Routing statistics of the last forward (``l_aux``, ``exp_counts``, ...) stay on the layer for
telemetry; they are not state and are never checkpointed.

Shape legend: S = tokens, E = experts, D = model dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .dispatch import Dispatcher, LocalDispatcher
from .experts import Experts
from .router import TopKGate
from .routing import Routing


class MOELayer(nn.Module):
    """The routed part of an MoE layer: ``gate`` picks experts, a dispatcher moves tokens, ``experts`` compute.

    Args:
        gate: the router.
        experts: this rank's experts.
        ep_group_name: the layer's name (DeepSpeed's argument; the experts carry it too).
        ep_size: expert-parallel ranks the experts are spread over.
        num_local_experts: experts held here (``gate.num_experts / ep_size``).

    Attributes set by ``forward``: ``l_aux``, ``z_loss``, ``exp_counts``, ``tokens_per_expert``,
    ``num_routes``, ``num_dropped_routes``.
    """

    def __init__(self, gate: TopKGate, experts: Experts, ep_group_name: str, ep_size: int,
                 num_local_experts: int) -> None:
        super().__init__()
        if not isinstance(gate, TopKGate):
            raise TypeError(f"gate must be a TopKGate, got {type(gate).__name__}")
        if not isinstance(experts, Experts):
            raise TypeError(f"experts must be an Experts, got {type(experts).__name__}")
        if gate.num_experts != ep_size * num_local_experts or len(experts) != num_local_experts:
            raise ValueError(f"the gate routes to {gate.num_experts} experts, which must be ep_size ({ep_size}) x "
                             f"num_local_experts ({num_local_experts}), and experts holds {len(experts)}")
        self.gate = gate
        self.experts = experts
        self.ep_group_name = ep_group_name
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts
        self.dispatcher: Optional[Dispatcher] = LocalDispatcher(num_local_experts) if ep_size == 1 else None
        self.l_aux: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None
        self.exp_counts: Optional[Tensor] = None
        self.tokens_per_expert: Optional[Tensor] = None
        self.num_routes: int = 0
        self.num_dropped_routes: int = 0

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Install the dispatcher that moves this layer's tokens (chosen for its process groups)."""
        if not isinstance(dispatcher, Dispatcher):
            raise TypeError(f"dispatcher must be a moesaic Dispatcher, got {type(dispatcher).__name__}")
        if dispatcher.num_local_experts != self.num_local_experts:
            raise ValueError(f"the dispatcher feeds {dispatcher.num_local_experts} local experts, this layer holds "
                             f"{self.num_local_experts}")
        self.dispatcher = dispatcher

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> Tensor:
        """Route, dispatch, compute, combine.

        Args:
            hidden_states: `(..., D)` tokens.
            used_token: optional 0/1 mask over the tokens (shape ``hidden_states.shape[:-1]`` or
                `(S,)`); masked tokens use no expert and get a zero output.

        Returns:
            The combined output, shaped like ``hidden_states``.
        """
        D = self.gate.model_dim
        if not isinstance(hidden_states, Tensor):
            raise TypeError(f"hidden_states must be a Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != D:
            raise ValueError(f"hidden_states must have last dimension hidden_size={D}, "
                             f"got shape {tuple(hidden_states.shape)}")
        if self.dispatcher is None:
            raise RuntimeError(f"MoE layer {self.ep_group_name!r} has ep_size={self.ep_size} but no "
                               "expert-parallel process group; call moesaic.setup_expert_parallel(model) or "
                               "moe.set_deepspeed_parallelism() after torch.distributed.init_process_group()")
        x_SD = hidden_states.reshape(-1, D)
        if used_token is not None:
            used_token = _check_used_token(used_token, hidden_states, x_SD.shape[0])

        routing = self.gate(x_SD, used_token)
        pieces, meta = self.dispatcher.dispatch(x_SD, routing)
        with self.dispatcher.saved_inputs(pieces, meta):
            outputs = self.experts(pieces)
        del pieces  # the experts' saved inputs are the only references left
        out_SD = self.dispatcher.combine(outputs, meta)
        self._record(routing)
        return out_SD.reshape(hidden_states.shape)

    def _record(self, routing: Routing) -> None:
        self.l_aux = routing.l_aux
        self.z_loss = routing.z_loss
        self.exp_counts = routing.exp_counts_E
        self.tokens_per_expert = routing.tokens_per_expert_E
        self.num_routes = routing.num_routes
        self.num_dropped_routes = routing.num_dropped

    def extra_repr(self) -> str:
        return f"ep_group_name={self.ep_group_name!r}, ep_size={self.ep_size}, dispatcher={self.dispatcher!r}"


def _check_used_token(used_token, hidden_states: Tensor, S: int) -> Tensor:
    if not isinstance(used_token, Tensor):
        raise TypeError(f"used_token must be a Tensor or None, got {type(used_token).__name__}")
    if used_token.shape != hidden_states.shape[:-1] and tuple(used_token.shape) != (S,):
        raise ValueError(f"used_token must have shape {tuple(hidden_states.shape[:-1])} or ({S},) to match "
                         f"the tokens, got {tuple(used_token.shape)}")
    flat = used_token.reshape(S)
    if flat.dtype != torch.bool and not bool(((flat == 0) | (flat == 1)).all()):
        raise ValueError("used_token must hold only 0 and 1 (a token mask), got other values")
    return flat
