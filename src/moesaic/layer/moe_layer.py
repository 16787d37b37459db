"""``MOELayer``: router -> dispatcher -> experts -> combine, one path whatever the parallelism.

DeepSpeed's ``MoE`` keeps this inner layer as ``deepspeed_moe`` (class ``MOELayer`` in
``deepspeed/moe/sharded_moe.py``) with the router as ``gate`` and the experts as ``experts``;
moesaic keeps the same structure, so ``state_dict`` keys are DeepSpeed's. The dispatcher is not a
module (it holds no parameters): a :class:`~moesaic.layer.dispatch.LocalDispatcher` when every
expert is local, or whatever ``set_dispatcher`` installs when the layer is put on its process
groups.

Routing statistics of the last forward (``l_aux``, ``exp_counts``, ...) stay on the layer for
telemetry; they are not state and are never checkpointed. (The aux-loss-free ``expert_bias`` is
state: it lives on the gate as a buffer, and the layer only shows it.)

A *sequence*, for the sequence-level balance loss, is a row of a `(batch, seq, D)` input (batch
first, as DeepSpeed's layer takes it; more leading dims are all batch). A 2-D `(S, D)` input is
one sequence of S tokens.

Shape legend: S = tokens, E = experts, D = model dim.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import recompute
from .dispatch import Dispatcher, LocalDispatcher
from .experts import ExpertContainer
from .router import TopKGate
from .routing import Routing, count_unrouted


class MOELayer(nn.Module):
    """The routed part of an MoE layer: ``gate`` picks experts, a dispatcher moves tokens, ``experts`` compute.

    Args:
        gate: the router.
        experts: this rank's experts.
        ep_group_name: the layer's name (DeepSpeed's argument; the experts carry it too).
        ep_size: expert-parallel ranks the experts are spread over.
        num_local_experts: experts held here (``gate.num_experts / ep_size``).

    Attributes set by ``forward``: ``l_aux``, ``z_loss``, ``seq_aux_loss``, ``exp_counts``,
    ``tokens_per_expert``, ``num_routes``, ``num_dropped_routes``; ``num_unrouted_tokens`` (valid
    tokens no expert took) is computed when read. ``expert_bias`` shows the gate's aux-loss-free
    bias (None without one).
    """

    def __init__(self, gate: TopKGate, experts: ExpertContainer, ep_group_name: str, ep_size: int,
                 num_local_experts: int) -> None:
        super().__init__()
        if not isinstance(gate, TopKGate):
            raise TypeError(f"gate must be a TopKGate, got {type(gate).__name__}")
        if not isinstance(experts, ExpertContainer):
            raise TypeError(f"experts must be an Experts or StackedExperts, got {type(experts).__name__}")
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
        self.seq_aux_loss: Optional[Tensor] = None
        self._unrouted = None  # (token_idx_N, S, valid tokens, nothing dropped) of the last forward
        self.exp_counts: Optional[Tensor] = None
        self.tokens_per_expert: Optional[Tensor] = None
        self.num_routes: int = 0
        self.num_dropped_routes: int = 0
        #: recompute the experts' intermediate activations in backward (moesaic.apply_recompute(model, "experts"))
        self.recompute_experts = False
        self._logits_out: Optional[list] = None  # set by a caller that wants the router logits (the HF block)
        self._replay_ids: Optional[Tensor] = None  # routes to replay (moesaic.replay_routing)
        self._route_recorder: Optional[list] = None  # where chosen expert ids go (moesaic.record_routing)

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
        weight = next(self.experts.parameters(), None)
        if weight is None:
            weight = self.gate.wg.weight
        if not hidden_states.is_floating_point():
            # integer or bool tokens: no cast of the layer or autocast helps (torch would say only
            # "mat1 and mat2 must have the same dtype")
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the MoE layer {self.ep_group_name!r} "
                            f"holds {weight.dtype} experts and takes floating-point tokens; cast the input "
                            f"(x.to({weight.dtype})), or embed token ids first")
        # sharded experts (FSDP2, moesaic.shard_model) hold fp32 masters and compute in their policy's dtype
        if (hidden_states.dtype != weight.dtype and not torch.is_autocast_enabled(hidden_states.device.type)
                and not _is_dtensor(weight)):
            # else torch's matmul error names neither the layer nor what to do
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the MoE layer {self.ep_group_name!r} "
                            f"holds {weight.dtype} experts; cast the input (x.to({weight.dtype})) or the layer, "
                            "or run under torch.autocast")
        if self.dispatcher is None:
            raise RuntimeError(f"MoE layer {self.ep_group_name!r} has ep_size={self.ep_size} but no "
                               "expert-parallel process group; call moesaic.setup_expert_parallel(model) or "
                               "moe.set_deepspeed_parallelism() after torch.distributed.init_process_group()")
        x_SD = hidden_states.reshape(-1, D)
        if used_token is not None:
            used_token = _check_used_token(used_token, hidden_states, x_SD.shape[0])

        # under activation checkpointing the call is recorded, and its recompute replays the record
        # (layer/recompute.py); elsewhere call is None and nothing changes
        call, token = recompute.begin(self, x_SD.device)
        try:
            return self._route_and_compute(hidden_states, x_SD, used_token, call)
        finally:
            recompute.end(call, token, x_SD.device)

    def _route_and_compute(self, hidden_states: Tensor, x_SD: Tensor, used_token: Optional[Tensor],
                           call: Optional[recompute.Call]) -> Tensor:
        record = call.record if call is not None else None
        decision = record.decision if record is not None else None
        if decision is None and self._replay_ids is not None:  # moesaic.replay_routing (layer/replay.py)
            decision = recompute.replay_decision(self, self._replay_ids, x_SD.shape[0], x_SD.device)
        # sequences for the sequence-level balance loss: rows of (batch, seq, D); a 2-D input is one
        num_sequences = math.prod(hidden_states.shape[:-2]) if hidden_states.dim() >= 3 else 1
        routing = self.gate(x_SD, used_token, num_sequences=num_sequences, decision=decision,
                            count=call is None or not call.recomputing, logits_out=self._logits_out)
        if record is not None and record.peer_counts is not None:
            routing = dataclasses.replace(routing, peer_counts=tuple(map(tuple, record.peer_counts)))
        if self._route_recorder is not None and (call is None or not call.recomputing):  # moesaic.record_routing
            self._route_recorder.append(recompute.recorded_routes(routing))
        # experts that take their pieces as one batch (stacked) get them as row blocks of one
        # tensor, from dispatchers that take the hint (a dispatcher of the older two-argument
        # interface is called as before)
        hint = {"together": True} if getattr(self.experts, "pieces_together", False) and \
            _takes_together(self.dispatcher) else {}
        pieces, meta = self.dispatcher.dispatch(x_SD, routing, **hint)
        if call is not None and call.sinks and decision is None:
            made = recompute.Decision.of(routing)
            counts = getattr(getattr(meta, "blocks", None), "counts", None)
            for sink in call.sinks:
                sink.decision, sink.peer_counts = made, counts
        with self.dispatcher.saved_inputs(pieces, meta, **hint):
            if getattr(self, "recompute_experts", False) and self.training and torch.is_grad_enabled():
                # the "experts" recompute policy: keep the pieces, recompute the experts' activations
                outputs = list(checkpoint(_run_experts, self.experts, *pieces, use_reentrant=False))
            else:
                outputs = self.experts(pieces)
        del pieces  # the experts' saved inputs are the only references left
        out_SD = self.dispatcher.combine(outputs, meta)
        # the last forward's statistics are a snapshot (a recompute writes the same values, and the
        # losses MoE.forward returns must be this call's tensors, not the first forward's)
        self._record(routing)
        return out_SD.reshape(hidden_states.shape)

    @property
    def expert_bias(self) -> Optional[Tensor]:
        """The gate's aux-loss-free selection bias `(E,)` (global expert order), or None."""
        return self.gate._buffers.get("expert_bias")

    @property
    def num_unrouted_tokens(self) -> int:
        """Valid tokens of the last forward that no expert took (0 before the first)."""
        if self._unrouted is None:
            return 0
        if isinstance(self._unrouted, tuple):
            self._unrouted = count_unrouted(*self._unrouted)
        return self._unrouted

    def _record(self, routing: Routing) -> None:
        self.l_aux = routing.l_aux
        self.z_loss = routing.z_loss
        self.seq_aux_loss = routing.seq_aux_loss
        self._unrouted = (routing.token_idx_N, routing.num_tokens, routing.num_valid_tokens,
                          routing.num_dropped == 0 and routing.expert_ids_SK is not None)
        self.exp_counts = routing.exp_counts_E
        self.tokens_per_expert = routing.tokens_per_expert_E
        self.num_routes = routing.num_routes
        self.num_dropped_routes = routing.num_dropped

    def extra_repr(self) -> str:
        return f"ep_group_name={self.ep_group_name!r}, ep_size={self.ep_size}, dispatcher={self.dispatcher!r}"


def _run_experts(experts: ExpertContainer, *pieces: Tensor):
    return tuple(experts(list(pieces)))


@functools.lru_cache(maxsize=None)
def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _class_takes_together(cls) -> bool:
    params = [inspect.signature(getattr(cls, name)).parameters for name in ("dispatch", "saved_inputs")]
    return all("together" in p for p in params)


def _takes_together(dispatcher) -> bool:
    """Whether the dispatcher's ``dispatch`` and ``saved_inputs`` accept the ``together`` hint."""
    return _class_takes_together(type(dispatcher))


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
