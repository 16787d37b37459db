"""The MoE layer: :class:`MixtureOfExperts`, built from one :class:`~moesaic.layer.config.MoEConfig`.

Its direct parts are the router (``gate``, a :class:`~moesaic.layer.gate.TopKGate`), the
dispatcher (``dispatcher``, chosen when the layer joins its process groups) and the experts
(``experts``, an :class:`~moesaic.layer.experts.ExpertContainer`), plus the optional shared expert
and residual MLP. ``state_dict`` keys are the layer's own (:data:`~moesaic.layer.keys.CORE_LAYOUT`:
``gate.wg.weight``, ``experts.local_experts.<i>.*``, ``mlp.*`` / ``coefficient.*`` for a residual
MoE, ``shared_expert.*``). DeepSpeed's constructor and its module nesting (``deepspeed_moe``,
``deepspeed_experts``) are :class:`moesaic.MoE` in :mod:`moesaic.deepspeed.moe`, a subclass that
places the same parts elsewhere (:meth:`MixtureOfExperts._place_parts`). State dicts of either
nesting load into either class: a load hook respells them (:mod:`moesaic.layer.keys`).

Differences from DeepSpeed's layer, all deliberate:

* every expert parameter carries its layer name and its global ``expert_number``;
* tokens move by index, never through ``[S, E, C]`` one-hot tensors or padded ``[E, C, D]``
  buffers (except across ranks in capacity mode, where fixed-size all-to-all needs them);
* randomness (random token selection, noisy gates, 2nd-expert sampling) acts in training only,
  so evaluation is deterministic;
* ``used_token`` masks tokens for every k (DeepSpeed honours it for k=1 only);
* ``exp_counts`` is always int64; with fewer tokens than ``min_capacity`` top-1 still works.

Routing statistics of the last forward (``l_aux``, ``exp_counts``, ...) stay on the layer for
telemetry; they are not state and are never checkpointed. (The aux-loss-free ``expert_bias`` is
state: it lives on the gate as a buffer, and the layer only shows it.) A *sequence*, for the
sequence-level balance loss, is a row of a `(batch, seq, D)` input (batch first; more leading
dims are all batch); a 2-D `(S, D)` input is one sequence of S tokens.

Shape legend: S = tokens, E = experts, D = model dim.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._checks import check_int
from ..parallel.dtensor import is_dtensor
from ..parallel.groups import GroupRegistry, default_registry
from . import recompute
from .all_to_all import AllToAllDispatcher
from .config import MoEConfig
from .dispatch import Dispatcher, LocalDispatcher
from .experts import ExpertContainer, Experts, check_expert_width
from .identity import MoELayerBase, iter_moe_modules, moe_layers
from .keys import CORE_LAYOUT, KeyLayout, upgrade_layer_keys
from .gate import TopKGate
from .routing import Routing, count_unrouted
from .stacked import StackedExperts

class MixtureOfExperts(MoELayerBase):
    """A Mixture-of-Experts layer built from its config.

    Args:
        hidden_size: D, the input and output size of every expert.
        expert: the expert module, deep-copied once per local expert (a standard FFN/GLU shape
            when ``config.stacked_experts``); with ``config.use_residual`` also the dense MLP.
        config: every option of the layer (:class:`~moesaic.layer.config.MoEConfig`).
        ep_size: expert-parallel ranks the experts are spread over (where the experts live, not
            what the layer computes).
        expert_group_name: the layer's name on its parameters (``name_moe_layers`` renames it).
        shared_expert: the dense module every token passes through when ``config.shared_experts``
            is >= 1 (its parameters are dense: ``shared_expert.*``, reduced over the world).

    Attributes set by ``forward`` (the last forward's routing statistics): ``l_aux``, ``z_loss``,
    ``seq_aux_loss``, ``exp_counts``, ``tokens_per_expert``, ``num_routes``,
    ``num_dropped_routes``; ``num_unrouted_tokens`` (valid tokens no expert took) is computed when
    read.
    """

    #: where the router and experts sit in the state dict (:mod:`moesaic.layer.keys`)
    KEY_LAYOUT: KeyLayout = CORE_LAYOUT
    #: the container of per-module experts
    EXPERTS_CLASS = Experts

    def __init__(self, hidden_size: int, expert: nn.Module, config: MoEConfig, *, ep_size: int = 1,
                 expert_group_name: str = "moe", shared_expert: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not isinstance(expert, nn.Module):
            raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a moesaic MoEConfig, got {type(config).__name__}")
        check_int(hidden_size, "hidden_size", 1)
        check_int(ep_size, "ep_size", 1)
        num_experts = config.num_experts
        if num_experts % ep_size != 0:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel size "
                             f"ep_size ({ep_size}); pick num_experts as a multiple of {ep_size}")
        if not isinstance(expert_group_name, str) or not expert_group_name:
            raise ValueError(f"expert_group_name must be a non-empty str, got {expert_group_name!r}")
        if shared_expert is not None and not isinstance(shared_expert, nn.Module):
            raise TypeError(f"shared_expert must be a torch.nn.Module or None, got {type(shared_expert).__name__}")
        if (shared_expert is not None) != (config.shared_experts > 0):
            raise ValueError(f"shared_experts={config.shared_experts} and shared_expert="
                             f"{type(shared_expert).__name__ if shared_expert is not None else None} disagree: pass "
                             "the shared expert's module exactly when shared_experts >= 1")
        if shared_expert is not None:  # (the experts' containers check the expert's widths)
            check_expert_width(shared_expert, hidden_size, "shared_expert", expert_group_name)
        local = num_experts // ep_size
        container = StackedExperts if config.stacked_experts else self.EXPERTS_CLASS
        experts: ExpertContainer = container(expert, local, expert_group_name, hidden_size=hidden_size)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = local
        self.k = config.k
        self.expert_group_name = expert_group_name
        self.use_residual = config.use_residual
        # registered first, so state_dict keys come in DeepSpeed's order (router, experts, then the rest)
        self._place_parts(TopKGate(hidden_size, config=config), experts)
        if self.use_residual:
            self.mlp = expert
            # coefficient of the weighted sum of the MoE output and the dense mlp output
            self.coefficient = nn.Linear(hidden_size, 2)
        self.shared_expert = shared_expert  # registered as a child module (or None: no key)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if config.shared_expert_gate else None
        self.ep_group = None  # set by set_expert_parallel_groups / moesaic.setup_expert_parallel
        self.parallel_groups = None
        self.dispatcher: Optional[Dispatcher] = LocalDispatcher(local) if ep_size == 1 else None
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
        self.register_load_state_dict_pre_hook(_upgrade_keys_hook)

    def _place_parts(self, gate: TopKGate, experts: ExpertContainer) -> None:
        """Register the router and the experts (here: ``gate`` and ``experts``; a subclass may nest them)."""
        self.gate = gate
        self.experts = experts

    @property
    def config(self) -> MoEConfig:
        """The layer's options (the gate's config)."""
        return self.gate.config

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

    @property
    def dropped_fraction(self) -> float:
        """Fraction of routes the capacity limit removed in the last forward."""
        return self.num_dropped_routes / self.num_routes if self.num_routes else 0.0

    # --- expert parallelism ----------------------------------------------------------------------
    def set_expert_parallel_groups(self, use_data_before_expert_parallel: bool = False, *,
                                   registry: Optional[GroupRegistry] = None) -> None:
        """Put the layer on the expert-parallel groups of its ``ep_size``.

        Creates the groups on first use (collectively: call it on every rank in the same order),
        renumbers the local experts to their global numbers and installs the dispatcher for them
        (local when ``ep_size == 1``, all-to-all otherwise). :func:`setup_expert_parallel` does this
        for every MoE layer of a model; DeepSpeed's name for it is ``moesaic.MoE.set_deepspeed_parallelism``.

        Args:
            use_data_before_expert_parallel: the alternative rank layout (data-parallel ranks first,
                DeepSpeed's ``use_data_before_expert_parallel_``; engine key
                ``use_data_before_expert_parallelism``).
            registry: where groups are created and cached (default: the process-wide registry).
        """
        groups = (registry if registry is not None else default_registry()).get(
            self.ep_size, use_data_before_expert_parallel)
        self.parallel_groups = groups
        self.ep_group = groups.ep_group
        self.experts.tag(self.expert_group_name, groups.ep_rank)
        if groups.ep_size == 1:
            self.set_dispatcher(LocalDispatcher(self.num_experts))
        else:
            self.set_dispatcher(AllToAllDispatcher(groups, self.num_experts))

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, *,
                                  registry: Optional[GroupRegistry] = None) -> None:
        """Deprecated on the core layer: :meth:`set_expert_parallel_groups` (DeepSpeed's name stays on
        ``moesaic.MoE``)."""
        warnings.warn("MixtureOfExperts.set_deepspeed_parallelism is deprecated: call set_expert_parallel_groups("
                      "use_data_before_expert_parallel, registry=...) (the same groups); DeepSpeed's name stays on "
                      "moesaic.MoE", DeprecationWarning, stacklevel=2)
        self.set_expert_parallel_groups(use_data_before_expert_parallel_, registry=registry)

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Install the dispatcher that moves this layer's tokens (chosen for its process groups)."""
        if not isinstance(dispatcher, Dispatcher):
            raise TypeError(f"dispatcher must be a moesaic Dispatcher, got {type(dispatcher).__name__}")
        if dispatcher.num_local_experts != self.num_local_experts:
            raise ValueError(f"the dispatcher feeds {dispatcher.num_local_experts} local experts, this layer holds "
                             f"{self.num_local_experts}")
        self.dispatcher = dispatcher

    # --- naming ----------------------------------------------------------------------------------
    def set_expert_group_name(self, name: str) -> None:
        """Rename the layer; every expert parameter's ``group_name`` follows."""
        self.experts.tag(name, self.experts.ep_rank)
        self.expert_group_name = name

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Route, run the experts, combine (and mix in the dense ``mlp`` for a residual MoE).

        Args:
            hidden_states: `(..., D)` tokens.
            used_token: optional 0/1 mask over the tokens (shape ``hidden_states.shape[:-1]`` or
                `(S,)`); masked tokens use no expert and get a zero MoE output.

        Returns:
            ``(output, l_aux, exp_counts)``: output of the input's shape, the fp32 load-balancing
            loss, and the `(E,)` int64 routes chosen per expert before capacity.

        A shared expert's output is added to every token's routed output (a masked token's MoE
        output stays zero).
        """
        output = self._routed(hidden_states, used_token)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden_states)
            if isinstance(shared, tuple):
                shared = shared[0]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            if used_token is not None:
                shared = shared * (used_token.reshape(hidden_states.shape[:-1]) != 0).unsqueeze(-1).to(shared.dtype)
            output = output + shared
        return output, self.l_aux, self.exp_counts

    def _routed(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> Tensor:
        """The routed part: route, dispatch, compute, combine; the combined output, shaped like the input."""
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
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the MoE layer "
                            f"{self.expert_group_name!r} holds {weight.dtype} experts and takes floating-point tokens; "
                            f"cast the input (x.to({weight.dtype})), or embed token ids first")
        # sharded experts (FSDP2, moesaic.shard_model) hold fp32 masters and compute in their policy's dtype
        if (hidden_states.dtype != weight.dtype and not torch.is_autocast_enabled(hidden_states.device.type)
                and not is_dtensor(weight)):
            # else torch's matmul error names neither the layer nor what to do
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the MoE layer "
                            f"{self.expert_group_name!r} holds {weight.dtype} experts; cast the input "
                            f"(x.to({weight.dtype})) or the layer, or run under torch.autocast")
        if self.dispatcher is None:
            raise RuntimeError(f"MoE layer {self.expert_group_name!r} has ep_size={self.ep_size} but no "
                               "expert-parallel process group; call moesaic.setup_expert_parallel(model) or "
                               "moe.set_expert_parallel_groups() after torch.distributed.init_process_group()")
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
        # experts that take their pieces as one batch (stacked) get them as row blocks of one tensor
        together = bool(getattr(self.experts, "pieces_together", False))
        pieces, meta = self.dispatcher.dispatch(x_SD, routing, together=together)
        if call is not None and call.sinks and decision is None:
            made = recompute.Decision.of(routing)
            counts = getattr(getattr(meta, "blocks", None), "counts", None)
            for sink in call.sinks:
                sink.decision, sink.peer_counts = made, counts
        with self.dispatcher.saved_inputs(pieces, meta, together=together):
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
        return (f"name={self.expert_group_name!r}, num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"k={self.k}, drop_tokens={self.gate.drop_tokens}"
                f"{', stacked' if isinstance(self.experts, StackedExperts) else ''}, dispatcher={self.dispatcher!r}")


def _run_experts(experts: ExpertContainer, *pieces: Tensor):
    return tuple(experts(list(pieces)))


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


def _upgrade_keys_hook(module, state_dict, prefix, *args) -> None:
    # a key of this layer written in the other nesting (an old moesaic checkpoint, a DeepSpeed state dict)
    upgrade_layer_keys(state_dict, prefix, module.KEY_LAYOUT)


def name_moe_layers(model: nn.Module, prefix: str = "") -> dict:
    """Name every MoE layer of ``model`` after its module path (e.g. ``"layers.3.mlp"``).

    Sets ``expert_group_name`` (and every expert parameter's ``group_name``) so logs, optimizer
    groups and checkpoints say which layer they mean. Returns ``{name: layer}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    named = {}
    for path, module in iter_moe_modules(model):
        name = prefix + (path or "moe")
        module.set_expert_group_name(name)
        named[name] = module
    return named


def setup_expert_parallel(model: nn.Module, use_data_before_expert_parallel_: bool = False, *,
                          registry: Optional[GroupRegistry] = None) -> dict:
    """Put every MoE layer of ``model`` on its expert-parallel groups (one call per model).

    Layers are visited in module order, so every rank creates the same groups in the same order;
    layers sharing an ``ep_size`` share its groups whatever their names (several layers may still
    carry DeepSpeed's default name here, so this walk does not ask :func:`moe_layers`). Returns
    ``{expert_group_name: ExpertParallelGroups}``.

    Args:
        model: the model.
        use_data_before_expert_parallel_: DeepSpeed's alternative rank layout.
        registry: where groups are created and cached (default: the process-wide registry).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = {}
    for _, module in iter_moe_modules(model):
        module.set_expert_parallel_groups(use_data_before_expert_parallel_, registry=registry)
        out[module.expert_group_name] = module.parallel_groups
    return out
