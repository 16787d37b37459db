"""``MoE``: a drop-in for ``deepspeed.moe.layer.MoE`` with index-based dispatch.

Same constructor arguments (plus keyword-only extras), same ``(output, l_aux, exp_counts)``
result, the same numbers for deterministic settings, and the same module structure, so
``state_dict`` keys are DeepSpeed's (``deepspeed_moe.gate.wg.weight``,
``deepspeed_moe.experts.deepspeed_experts.<i>.*``, and ``mlp.*`` / ``coefficient.*`` for a
residual MoE): state dicts move both ways with plain ``load_state_dict``. Differences, all
deliberate:

* ``expert_group_name`` is an argument (default ``f"ep_size_{ep_size}"``, DeepSpeed's name), and
  every expert parameter also carries its global ``expert_number``;
* tokens move by index, never through ``[S, E, C]`` one-hot tensors or padded ``[E, C, D]``
  buffers (except across ranks in capacity mode, where fixed-size all-to-all needs them);
* randomness (random token selection, noisy gates, 2nd-expert sampling) acts in training only,
  so evaluation is deterministic;
* ``used_token`` masks tokens for every k (DeepSpeed honours it for k=1 only);
* ``exp_counts`` is always int64; with fewer tokens than ``min_capacity`` top-1 still works.

Keyword-only options add what today's MoE models use (docs/modern-layers.md): router options
(``score_func``, ``norm_topk_prob``, ``n_group``, ``enable_expert_bias``, ``routing_type``, ...,
the fields of :class:`~moesaic.layer.router.RouterConfig`), a shared expert
(``shared_expert``, ``shared_expert_gate``) and stacked experts (``stacked_experts``). Every one
defaults to off, and with all off the layer, its state dict and its numbers are DeepSpeed's.

State dicts written by moesaic before it took DeepSpeed's keys (``gate.wg.weight``,
``experts.local_experts.<i>.*``) still load: a load hook renames them
(:func:`upgrade_legacy_keys`).
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..parallel.groups import GroupRegistry, default_registry
from .all_to_all import AllToAllDispatcher
from .dispatch import LocalDispatcher
from .experts import ExpertContainer, Experts, check_expert_width
from .moe_layer import MOELayer
from .router import RouterConfig, TopKGate
from .stacked import StackedExperts

# moesaic's module paths before it took DeepSpeed's, relative to an MoE layer
_LEGACY_PREFIXES = (("gate.", "deepspeed_moe.gate."),
                    ("experts.local_experts.", "deepspeed_moe.experts.deepspeed_experts."))


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
        use_tutel: accepted for compatibility; ignored with a warning.
        enable_expert_tensor_parallelism: accepted for compatibility; moesaic has no tensor
            parallelism, so it must be False.
        top2_2nd_expert_sampling: sample the 2nd expert (k=2) with the Gumbel-max trick.
        expert_group_name: the layer's name on its parameters (default ``f"ep_size_{ep_size}"``).
        drop_policy: keyword-only; None (DeepSpeed's default for k), "position" or "probs".
        z_loss_coef: keyword-only; ST-MoE router z-loss coefficient. The scaled loss is exposed as
            ``self.z_loss`` after each forward and is *not* folded into ``l_aux``.
        score_func, softmax_after_topk, router_bias, norm_topk_prob, routed_scaling_factor, n_group,
        topk_group, enable_expert_bias, bias_update_rate, seq_aux_loss_coef, routing_type:
            keyword-only router options (see :class:`~moesaic.layer.router.RouterConfig`). The
            sequence-level balance loss is exposed as ``self.seq_aux_loss`` (not folded into
            ``l_aux``); a sequence is a row of a `(batch, seq, D)` input, a 2-D input is one sequence.
        shared_expert: keyword-only; a dense module every token passes through, its output added
            to the routed output (Qwen2-MoE, DeepSeek-V3). Its parameters are dense (named
            ``shared_expert.*``, reduced over the world, stored in the dense checkpoint file).
            Several shared experts are one wider module. Not combined with ``use_residual``.
        shared_expert_gate: keyword-only; multiply the shared expert's output by
            ``sigmoid(shared_expert_gate(x))``, a ``Linear(hidden_size, 1, bias=False)`` (Qwen2-MoE).
        stacked_experts: keyword-only; store the local experts as ``[E_local, ...]`` tensors
            (:class:`~moesaic.layer.stacked.StackedExperts`; ``expert`` must be of a standard
            FFN/GLU shape). Identity, optimizer groups, checkpoints and numbers are those of
            per-module experts; CUDA bf16 on compute capability 9.0+ runs grouped matmuls.

    The router options land in one :class:`~moesaic.layer.router.RouterConfig`
    (``moe.gate.config``). ``moe.gate`` and ``moe.experts`` are read-only shortcuts to
    ``moe.deepspeed_moe.gate`` / ``.experts``.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, expert_group_name: Optional[str] = None, *,
                 drop_policy: Optional[str] = None, z_loss_coef: float = 0.0, score_func: str = "softmax",
                 softmax_after_topk: bool = False, router_bias: bool = False, norm_topk_prob: Optional[bool] = None,
                 routed_scaling_factor: float = 1.0, n_group: Optional[int] = None, topk_group: Optional[int] = None,
                 enable_expert_bias: bool = False, bias_update_rate: Optional[float] = None,
                 seq_aux_loss_coef: float = 0.0, routing_type: str = "token_choice",
                 shared_expert: Optional[nn.Module] = None, shared_expert_gate: bool = False,
                 stacked_experts: bool = False) -> None:
        super().__init__()
        if not isinstance(expert, nn.Module):
            raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
        check_int(hidden_size, "hidden_size", 1)
        check_int(num_experts, "num_experts", 1)
        check_int(ep_size, "ep_size", 1)
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
            # the default warnings filter shows this once per calling line
            warnings.warn("MoE(use_tutel=True): moesaic always dispatches by index; use_tutel is ignored",
                          stacklevel=2)
        config = RouterConfig(num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                              eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                              noisy_gate_policy=noisy_gate_policy, drop_tokens=drop_tokens, use_rts=use_rts,
                              top2_2nd_expert_sampling=top2_2nd_expert_sampling, drop_policy=drop_policy,
                              z_loss_coef=z_loss_coef, score_func=score_func, softmax_after_topk=softmax_after_topk,
                              router_bias=router_bias, norm_topk_prob=norm_topk_prob,
                              routed_scaling_factor=routed_scaling_factor, n_group=n_group, topk_group=topk_group,
                              enable_expert_bias=enable_expert_bias, bias_update_rate=bias_update_rate,
                              seq_aux_loss_coef=seq_aux_loss_coef, routing_type=routing_type)
        for name, value in (("shared_expert_gate", shared_expert_gate), ("stacked_experts", stacked_experts)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
        if shared_expert is not None and not isinstance(shared_expert, nn.Module):
            raise TypeError(f"shared_expert must be a torch.nn.Module or None, got {type(shared_expert).__name__}")
        if shared_expert_gate and shared_expert is None:
            raise ValueError("shared_expert_gate=True gates a shared expert; pass shared_expert=<module> too")
        if shared_expert is not None and use_residual:
            raise ValueError("shared_expert cannot be combined with use_residual=True (Residual MoE already mixes in a "
                             "dense expert); pick one")
        if shared_expert is not None:  # (the experts' containers check the expert's widths)
            check_expert_width(shared_expert, hidden_size, "shared_expert", expert_group_name)
        if stacked_experts:
            experts: ExpertContainer = StackedExperts(expert, num_experts // ep_size, expert_group_name,
                                                      hidden_size=hidden_size)
        else:
            experts = Experts(expert, num_experts // ep_size, expert_group_name, hidden_size=hidden_size)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.k = k
        self.expert_group_name = expert_group_name
        self.use_residual = bool(use_residual)
        self.use_tutel = bool(use_tutel)
        self.enable_expert_tensor_parallelism = False
        # registered first, as DeepSpeed does, so state_dict keys come in DeepSpeed's order
        self.deepspeed_moe = MOELayer(TopKGate.from_config(hidden_size, config), experts,
                                      expert_group_name, ep_size, self.num_local_experts)
        if self.use_residual:
            self.mlp = expert
            # coefficient of the weighted sum of the MoE output and the dense mlp output
            self.coefficient = nn.Linear(hidden_size, 2)
        self.shared_expert = shared_expert  # registered as a child module (or None: no key)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.ep_group = None  # set by set_deepspeed_parallelism / moesaic.setup_expert_parallel
        self.parallel_groups = None
        self.register_load_state_dict_pre_hook(_upgrade_legacy_hook)

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


def iter_moe_modules(model: nn.Module):
    """``(module path, layer)`` for every MoE layer of ``model``, in module order (names may repeat)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for path, module in model.named_modules():
        if isinstance(module, MoE):
            yield path, module


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
