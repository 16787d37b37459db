"""``MoE``: a drop-in for ``deepspeed.moe.layer.MoE`` with index-based dispatch.

Same constructor arguments (plus keyword-only extras), same ``(output, l_aux, exp_counts)``
result, the same numbers for deterministic settings. Differences, all deliberate:

* ``expert_group_name`` is an argument (default ``f"ep_size_{ep_size}"``, DeepSpeed's name), and
  every expert parameter also carries its global ``expert_number``;
* tokens move by index, never through ``[S, E, C]`` one-hot tensors or padded ``[E, C, D]``
  buffers (except across ranks in capacity mode, where fixed-size all-to-all needs them);
* randomness (random token selection, noisy gates, 2nd-expert sampling) acts in training only,
  so evaluation is deterministic;
* ``used_token`` masks tokens for every k (DeepSpeed honours it for k=1 only);
* ``exp_counts`` is always int64; with fewer tokens than ``min_capacity`` top-1 still works.

Shape legend: S = tokens, E = experts, N = kept routes, D = model dim.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import combine, permute, regather_saved_pieces
from .experts import Experts
from .gating import Routing, TopKGate, _check_int

_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


class MoE(nn.Module):
    """A Mixture-of-Experts layer.

    Args:
        hidden_size: D, the input and output size of every expert.
        expert: the expert module, deep-copied once per local expert.
        num_experts: E, experts in the layer (over all expert-parallel ranks).
        ep_size: expert-parallel ranks the experts are spread over.
        k: experts per token.
        capacity_factor / eval_capacity_factor: slots per expert are
            ``max(ceil(S / E * factor * k), min_capacity)`` in train / eval mode.
        min_capacity: lower bound on slots per expert.
        use_residual: Residual MoE (PR-MoE): mix the MoE output with a dense ``expert`` by a
            learned 2-way softmax coefficient.
        noisy_gate_policy: None, "None", "Jitter" or "RSample".
        drop_tokens: False for dropless routing (no capacity).
        use_rts: random token selection for k=1.
        use_tutel: accepted for compatibility; ignored with a one-time warning.
        enable_expert_tensor_parallelism: accepted for compatibility; moesaic has no tensor
            parallelism, so it must be False.
        top2_2nd_expert_sampling: sample the 2nd expert (k=2) with the Gumbel-max trick.
        expert_group_name: the layer's name on its parameters (default ``f"ep_size_{ep_size}"``).
        drop_policy: keyword-only; None (DeepSpeed's default for k), "position" or "probs".
        z_loss_coef: keyword-only; ST-MoE router z-loss coefficient. The scaled loss is exposed as
            ``self.z_loss`` after each forward and is *not* folded into ``l_aux``.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, expert_group_name: Optional[str] = None, *,
                 drop_policy: Optional[str] = None, z_loss_coef: float = 0.0) -> None:
        super().__init__()
        if not isinstance(expert, nn.Module):
            raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
        _check_int("num_experts", num_experts, 1)
        _check_int("ep_size", ep_size, 1)
        if num_experts % ep_size != 0:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel size "
                             f"ep_size ({ep_size}); pick num_experts as a multiple of {ep_size}")
        if expert_group_name is None:
            expert_group_name = f"ep_size_{ep_size}"
        if not isinstance(expert_group_name, str) or not expert_group_name:
            raise ValueError(f"expert_group_name must be a non-empty str or None, got {expert_group_name!r}")
        if enable_expert_tensor_parallelism:
            raise ValueError("enable_expert_tensor_parallelism=True is not supported: moesaic has no tensor "
                             "parallelism; leave it False")
        if use_tutel:
            _warn_once("use_tutel", "MoE(use_tutel=True): moesaic always dispatches by index; use_tutel is ignored")

        self.gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                             noisy_gate_policy, drop_tokens, use_rts, top2_2nd_expert_sampling,
                             drop_policy=drop_policy, z_loss_coef=z_loss_coef)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.k = k
        self.expert_group_name = expert_group_name
        self.use_residual = bool(use_residual)
        self.use_tutel = bool(use_tutel)
        self.enable_expert_tensor_parallelism = False
        self.experts = Experts(expert, self.num_local_experts, expert_group_name)
        if self.use_residual:
            self.mlp = expert
            # coefficient of the weighted sum of the MoE output and the dense mlp output
            self.coefficient = nn.Linear(hidden_size, 2)
        self.ep_group = None  # set by set_deepspeed_parallelism / moesaic.setup_expert_parallel
        self.parallel_groups = None
        self._dispatcher = None
        # routing statistics of the last forward, for telemetry (not state: never checkpointed)
        self.l_aux: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None
        self.exp_counts: Optional[Tensor] = None
        self.tokens_per_expert: Optional[Tensor] = None
        self.num_dropped_routes: int = 0
        self.num_routes: int = 0

    # --- expert parallelism ---------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Join the expert-parallel groups for this layer's ``ep_size`` (DeepSpeed's name).

        Creates the groups on first use (collectively: call it on every rank in the same order),
        renumbers the local experts to their global numbers and installs the all-to-all dispatcher.
        """
        from ..parallel.groups import get_expert_parallel_groups
        from .ep_dispatch import ExpertParallelDispatcher

        groups = get_expert_parallel_groups(self.ep_size, use_data_before_expert_parallel_)
        self.parallel_groups = groups
        self.ep_group = groups.ep_group
        self.experts.tag(self.expert_group_name, groups.ep_rank)
        if self.ep_size > 1:
            g = self.gate
            signature = (f"E={self.num_experts} ep_size={self.ep_size} k={self.k} hidden={self.hidden_size} "
                         f"drop_tokens={g.drop_tokens} capacity_factor={g.capacity_factor}/{g.eval_capacity_factor} "
                         f"min_capacity={g.min_capacity} drop_policy={g.drop_policy}")
            self._dispatcher = ExpertParallelDispatcher(groups, self.num_experts, self.hidden_size, g.drop_tokens,
                                                        signature)

    # --- naming ---------------------------------------------------------------------------------
    def set_expert_group_name(self, name: str) -> None:
        """Rename the layer; every expert parameter's ``group_name`` follows."""
        self.experts.tag(name, self.experts.ep_rank)
        self.expert_group_name = name

    @property
    def dropped_fraction(self) -> float:
        """Fraction of routes the capacity limit removed in the last forward."""
        return self.num_dropped_routes / self.num_routes if self.num_routes else 0.0

    # --- forward --------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Route, run the experts, combine.

        Args:
            hidden_states: `(..., D)` tokens.
            used_token: optional 0/1 mask over the tokens (shape ``hidden_states.shape[:-1]`` or
                `(S,)`); masked tokens use no expert and get a zero MoE output.

        Returns:
            ``(output, l_aux, exp_counts)``: output of the input's shape, the fp32 load-balancing
            loss, and the `(E,)` int64 routes chosen per expert before capacity.
        """
        if not isinstance(hidden_states, Tensor):
            raise TypeError(f"hidden_states must be a Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have last dimension hidden_size={self.hidden_size}, "
                             f"got shape {tuple(hidden_states.shape)}")
        x_SD = hidden_states.reshape(-1, self.hidden_size)
        S = x_SD.shape[0]
        if used_token is not None:
            used_token = self._check_used_token(used_token, hidden_states, S)

        routing = self.gate(x_SD, used_token)
        if self._dispatcher is None and self.ep_size == 1:
            sizes = routing.tokens_per_expert_E.tolist()
            pieces = permute(x_SD, routing, sizes)
            with regather_saved_pieces(x_SD, routing, sizes, pieces):
                ys = self.experts(pieces)
            del pieces
            out_SD = combine(ys, routing, S)
        else:
            out_SD = self._forward_expert_parallel(x_SD, routing)
        self._record(routing)

        output = out_SD.reshape(hidden_states.shape)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, routing.l_aux, routing.exp_counts_E

    def _forward_expert_parallel(self, x_SD: Tensor, routing: Routing) -> Tensor:
        dispatcher = self._dispatcher
        if dispatcher is None:
            raise RuntimeError(f"MoE layer {self.expert_group_name!r} has ep_size={self.ep_size} but no "
                               "expert-parallel process group; call moesaic.setup_expert_parallel(model) or "
                               "moe.set_deepspeed_parallelism() after torch.distributed.init_process_group()")
        return dispatcher(x_SD, routing, self.experts)

    def _record(self, routing: Routing) -> None:
        self.l_aux = routing.l_aux
        self.z_loss = routing.z_loss
        self.exp_counts = routing.exp_counts_E
        self.tokens_per_expert = routing.tokens_per_expert_E
        self.num_routes = routing.num_routes
        self.num_dropped_routes = routing.num_dropped

    @staticmethod
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

    def extra_repr(self) -> str:
        return (f"name={self.expert_group_name!r}, num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"k={self.k}, drop_tokens={self.gate.drop_tokens}")


def iter_moe_modules(model: nn.Module):
    """``(module path, layer)`` for every MoE layer of ``model``, in module order (names may repeat)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for path, module in model.named_modules():
        if isinstance(module, MoE):
            yield path, module


def moe_layers(model: nn.Module) -> Dict[str, Tuple[str, "MoE"]]:
    """``{expert_group_name: (module path, layer)}`` of every MoE layer, in module order.

    The one walk over a model's modules that looks for MoE layers; everything else asks
    :class:`moesaic.layer.identity.ExpertIndex`. Two layers with the same name are an error:
    identity (optimizer groups, checkpoints, telemetry) is keyed by layer name.
    """
    out: Dict[str, Tuple[str, MoE]] = {}
    for path, module in iter_moe_modules(model):
        name = module.expert_group_name
        if name in out:
            raise ValueError(f"MoE layers {out[name][0] or '<root>'!r} and {path or '<root>'!r} are both named "
                             f"{name!r}; identity is keyed by layer name: call moesaic.name_moe_layers(model)")
        out[name] = (path, module)
    return out


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


def setup_expert_parallel(model: nn.Module, use_data_before_expert_parallel_: bool = False) -> dict:
    """Put every MoE layer of ``model`` on its expert-parallel groups (one call per model).

    Layers are visited in module order, so every rank creates the same groups in the same order;
    layers sharing an ``ep_size`` share its groups whatever their names. Returns
    ``{expert_group_name: ExpertParallelGroups}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = {}
    for _, module in iter_moe_modules(model):
        module.set_deepspeed_parallelism(use_data_before_expert_parallel_)
        out[module.expert_group_name] = module.parallel_groups
    return out
