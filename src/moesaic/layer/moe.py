"""The MoE layer: :class:`MixtureOfExperts`, built from one :class:`~moesaic.layer.config.MoEConfig`.

Its direct parts are the router (``gate``, a :class:`~moesaic.layer.gate.TopKGate`), the
dispatcher (``deepspeed_moe.dispatcher``, chosen when the layer joins its process groups) and the
experts (``experts``, an :class:`~moesaic.layer.experts.ExpertContainer`), plus the optional
shared expert and residual MLP. The routed part lives in :class:`MOELayer` (``deepspeed_moe``)
because that is where DeepSpeed 0.19.8 stores it: ``state_dict`` keys are DeepSpeed's
(``deepspeed_moe.gate.wg.weight``, ``deepspeed_moe.experts.deepspeed_experts.<i>.*``, ``mlp.*`` /
``coefficient.*`` for a residual MoE), so state dicts and checkpoints move both ways with plain
``load_state_dict``. DeepSpeed's constructor (positional arguments, ``use_tutel``, the
``ep_size_N`` default name) is :class:`moesaic.MoE` in :mod:`moesaic.deepspeed.moe`.

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

State dicts written by moesaic before it took DeepSpeed's keys (``gate.wg.weight``,
``experts.local_experts.<i>.*``) still load: a load hook renames them (:func:`upgrade_legacy_keys`).

Shape legend: S = tokens, E = experts, D = model dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

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
from .gate import TopKGate
from .routing import Routing, count_unrouted
from .stacked import StackedExperts

# moesaic's module paths before it took DeepSpeed's, relative to an MoE layer
_LEGACY_PREFIXES = (("gate.", "deepspeed_moe.gate."),
                    ("experts.local_experts.", "deepspeed_moe.experts.deepspeed_experts."))


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

    ``moe.gate``, ``moe.experts`` and ``moe.config`` are read-only shortcuts to
    ``moe.deepspeed_moe.gate`` / ``.experts`` and the gate's config.
    """

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
        container = StackedExperts if config.stacked_experts else Experts
        experts: ExpertContainer = container(expert, local, expert_group_name, hidden_size=hidden_size)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = local
        self.k = config.k
        self.expert_group_name = expert_group_name
        self.use_residual = config.use_residual
        # registered first, as DeepSpeed does, so state_dict keys come in DeepSpeed's order
        self.deepspeed_moe = MOELayer(TopKGate(hidden_size, config=config), experts, expert_group_name, ep_size, local)
        if self.use_residual:
            self.mlp = expert
            # coefficient of the weighted sum of the MoE output and the dense mlp output
            self.coefficient = nn.Linear(hidden_size, 2)
        self.shared_expert = shared_expert  # registered as a child module (or None: no key)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if config.shared_expert_gate else None
        self.ep_group = None  # set by set_deepspeed_parallelism / moesaic.setup_expert_parallel
        self.parallel_groups = None
        self.register_load_state_dict_pre_hook(_upgrade_legacy_hook)

    @property
    def config(self) -> MoEConfig:
        """The layer's options (the gate's config)."""
        return self.deepspeed_moe.gate.config

    # --- DeepSpeed's structure, short names ------------------------------------------------------
    @property
    def gate(self) -> TopKGate:
        """The router (``deepspeed_moe.gate``)."""
        return self.deepspeed_moe.gate

    @property
    def experts(self) -> ExpertContainer:
        """This rank's experts (``deepspeed_moe.experts``)."""
        return self.deepspeed_moe.experts

    def __setattr__(self, name: str, value) -> None:
        if name in ("gate", "experts"):
            raise AttributeError(f"MoE.{name} is a read-only view of deepspeed_moe.{name}; assign "
                                 f"moe.deepspeed_moe.{name} instead")
        super().__setattr__(name, value)

    # --- routing statistics of the last forward (telemetry) --------------------------------------
    @property
    def l_aux(self) -> Optional[Tensor]:
        return self.deepspeed_moe.l_aux

    @property
    def z_loss(self) -> Optional[Tensor]:
        return self.deepspeed_moe.z_loss

    @property
    def seq_aux_loss(self) -> Optional[Tensor]:
        return self.deepspeed_moe.seq_aux_loss

    @property
    def expert_bias(self) -> Optional[Tensor]:
        """The aux-loss-free selection bias `(E,)` (``gate.expert_bias``), or None."""
        return self.deepspeed_moe.expert_bias

    @property
    def num_unrouted_tokens(self) -> int:
        """Valid tokens of the last forward that no expert took."""
        return self.deepspeed_moe.num_unrouted_tokens

    @property
    def exp_counts(self) -> Optional[Tensor]:
        return self.deepspeed_moe.exp_counts

    @property
    def tokens_per_expert(self) -> Optional[Tensor]:
        return self.deepspeed_moe.tokens_per_expert

    @property
    def num_routes(self) -> int:
        return self.deepspeed_moe.num_routes

    @property
    def num_dropped_routes(self) -> int:
        return self.deepspeed_moe.num_dropped_routes

    @property
    def dropped_fraction(self) -> float:
        """Fraction of routes the capacity limit removed in the last forward."""
        return self.num_dropped_routes / self.num_routes if self.num_routes else 0.0

    # --- expert parallelism ----------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, *,
                                  registry: Optional[GroupRegistry] = None) -> None:
        """Join the expert-parallel groups for this layer's ``ep_size`` (DeepSpeed's name).

        Creates the groups on first use (collectively: call it on every rank in the same order),
        renumbers the local experts to their global numbers and installs the dispatcher for them
        (local when ``ep_size == 1``, all-to-all otherwise).

        Args:
            use_data_before_expert_parallel_: DeepSpeed's alternative rank layout.
            registry: where groups are created and cached (default: the process-wide registry).
        """
        groups = (registry if registry is not None else default_registry()).get(
            self.ep_size, use_data_before_expert_parallel_)
        self.parallel_groups = groups
        self.ep_group = groups.ep_group
        self.experts.tag(self.expert_group_name, groups.ep_rank)
        if groups.ep_size == 1:
            self.deepspeed_moe.set_dispatcher(LocalDispatcher(self.num_experts))
        else:
            self.deepspeed_moe.set_dispatcher(AllToAllDispatcher(groups, self.num_experts))

    # --- naming ----------------------------------------------------------------------------------
    def set_expert_group_name(self, name: str) -> None:
        """Rename the layer; every expert parameter's ``group_name`` follows."""
        self.experts.tag(name, self.experts.ep_rank)
        self.expert_group_name = name
        self.deepspeed_moe.ep_group_name = name

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
        output = self.deepspeed_moe(hidden_states, used_token)
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
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts

    def extra_repr(self) -> str:
        return (f"name={self.expert_group_name!r}, num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"k={self.k}, drop_tokens={self.gate.drop_tokens}"
                f"{', stacked' if isinstance(self.experts, StackedExperts) else ''}")


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
                and not is_dtensor(weight)):
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


def upgrade_legacy_keys(state: Dict[str, object], model: nn.Module) -> Dict[str, object]:
    """``state`` with moesaic's pre-DeepSpeed key names of ``model``'s MoE layers renamed.

    ``<layer>.gate.*`` becomes ``<layer>.deepspeed_moe.gate.*`` and
    ``<layer>.experts.local_experts.<i>.*`` becomes ``<layer>.deepspeed_moe.experts.deepspeed_experts.<i>.*``;
    everything after the prefix (``"...weight::exp_avg"`` too) is kept. Other keys pass unchanged.
    """
    prefixes = [f"{path}." if path else "" for path, _ in iter_moe_modules(model)]
    out = dict(state)
    for prefix in prefixes:
        _rename_legacy(out, prefix)
    return out


def _rename_legacy(state, prefix: str) -> None:
    for old, new in _LEGACY_PREFIXES:
        old = prefix + old
        for key in [k for k in state if k.startswith(old)]:
            state[prefix + new + key[len(old):]] = state.pop(key)


def _upgrade_legacy_hook(module, state_dict, prefix, *args) -> None:
    # an MoE's own children are deepspeed_moe, mlp and coefficient: a key under "<prefix>gate." or
    # "<prefix>experts." can only be an old moesaic name
    _rename_legacy(state_dict, prefix)


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
        module.set_deepspeed_parallelism(use_data_before_expert_parallel_, registry=registry)
        out[module.expert_group_name] = module.parallel_groups
    return out
