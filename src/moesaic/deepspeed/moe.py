"""``MoE``: DeepSpeed's ``deepspeed.moe.layer.MoE`` over moesaic's layer, with DeepSpeed's module tree.

``from moesaic import MoE`` takes DeepSpeed 0.19.8's arguments in DeepSpeed's order and gives
DeepSpeed's behaviour: its defaults, its ``(output, l_aux, exp_counts)`` result, its module
nesting and ``state_dict`` keys, and its default layer name ``ep_size_<N>``. What is DeepSpeed's
only is here:

* the positional arguments read into one :class:`~moesaic.layer.config.MoEConfig`, ``use_tutel``
  (accepted, ignored with a warning), ``enable_expert_tensor_parallelism`` (refused: moesaic has
  no tensor parallelism) and the default name;
* the nesting: the router and the experts sit in ``deepspeed_moe`` (a :class:`MOELayer`, as in
  DeepSpeed), per-module experts in ``deepspeed_experts`` (:class:`Experts`); keys
  ``deepspeed_moe.gate.wg.weight``, ``deepspeed_moe.experts.deepspeed_experts.<i>.*``, ``mlp.*`` /
  ``coefficient.*`` in DeepSpeed's order (:data:`DEEPSPEED_LAYOUT`). ``moe.gate`` and
  ``moe.experts`` are read-only views of ``moe.deepspeed_moe.gate`` / ``.experts``, so the core
  layer's code runs unchanged on them.

Everything else (routing, dispatch, statistics, identity) is the core
:class:`~moesaic.layer.moe.MixtureOfExperts`, which the engine, checkpoints and telemetry see. A
state dict of the core layer's nesting (or of moesaic before it took DeepSpeed's) loads into an
``MoE`` and the reverse: the core's load hook respells the keys (:mod:`moesaic.layer.keys`).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

from torch import Tensor, nn

from ..layer.config import MoEConfig
from ..layer.experts import ExpertContainer
from ..layer.experts import Experts as _CoreExperts
from ..layer.gate import TopKGate
from ..layer.keys import KeyLayout
from ..layer.moe import MixtureOfExperts

#: DeepSpeed 0.19.8's keys of an MoE layer's router and experts, relative to the layer
DEEPSPEED_LAYOUT = KeyLayout("deepspeed_moe.gate.", "deepspeed_moe.experts.",
                             "deepspeed_moe.experts.deepspeed_experts.")


class Experts(_CoreExperts):
    """moesaic's per-module experts under DeepSpeed's attribute name: ``deepspeed_experts.<i>``."""

    EXPERT_LIST = "deepspeed_experts"


class MOELayer(nn.Module):
    """DeepSpeed's ``deepspeed_moe``: holds the router (``gate``) and the experts (``experts``).

    It is the nesting of DeepSpeed's module tree (so keys and ``named_modules`` are DeepSpeed's)
    and carries DeepSpeed's attributes (``ep_group_name``, ``ep_size``, ``num_local_experts``,
    the last forward's ``l_aux`` and ``exp_counts``). The owning :class:`MoE` runs its routed part
    through this module's call, as DeepSpeed's does, so hooks and profiles see
    ``MoE -> deepspeed_moe -> gate / experts``; the computation is the core layer's, so call the
    ``MoE``, not this part.
    """

    def __init__(self, gate: TopKGate, experts: ExpertContainer, ep_group_name: str, ep_size: int,
                 num_local_experts: int) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.ep_group_name = ep_group_name
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts
        self.l_aux: Optional[Tensor] = None
        self.exp_counts: Optional[Tensor] = None

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None, *,
                _routed: Optional[Callable[..., Tensor]] = None) -> Tensor:
        if _routed is None:
            raise RuntimeError(f"MoE layer {self.ep_group_name!r}: deepspeed_moe holds the router and experts of the "
                               "moesaic.MoE that owns it; call that MoE (moe(hidden_states)), which routes through "
                               "them")
        return _routed(hidden_states, used_token)

    def extra_repr(self) -> str:
        return f"ep_group_name={self.ep_group_name!r}, ep_size={self.ep_size}"


class MoE(MixtureOfExperts):
    """A Mixture-of-Experts layer with DeepSpeed's constructor.

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
        shared_expert: keyword-only; a dense module every token passes through, its output added
            to the routed output (Qwen2-MoE, DeepSeek-V3). Several shared experts are one wider
            module. Not combined with ``use_residual``.
        **options: keyword-only, the other fields of :class:`~moesaic.layer.config.MoEConfig`
            (``drop_policy``, ``z_loss_coef``, ``score_func``, ``n_group``, ``enable_expert_bias``,
            ``routing_type``, ``shared_expert_gate``, ``stacked_experts``, ...). Every one defaults
            to off, and with all off the layer, its state dict and its numbers are DeepSpeed's.
    """

    KEY_LAYOUT = DEEPSPEED_LAYOUT
    EXPERTS_CLASS = Experts

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, expert_group_name: Optional[str] = None, *,
                 shared_expert: Optional[nn.Module] = None, **options) -> None:
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
        config = MoEConfig.from_options(dict(num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                                             eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                                             use_residual=use_residual, noisy_gate_policy=noisy_gate_policy,
                                             drop_tokens=drop_tokens, use_rts=use_rts,
                                             top2_2nd_expert_sampling=top2_2nd_expert_sampling, **options),
                                        who="MoE", has_shared_expert=shared_expert is not None)
        super().__init__(hidden_size, expert, config, ep_size=ep_size, expert_group_name=expert_group_name,
                         shared_expert=shared_expert)
        self.use_tutel = bool(use_tutel)
        self.enable_expert_tensor_parallelism = False

    def _place_parts(self, gate: TopKGate, experts: ExpertContainer) -> None:
        # registered before mlp/coefficient, as DeepSpeed does, so keys come in DeepSpeed's order
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, self.ep_size, self.num_local_experts)

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

    def _routed(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> Tensor:
        return self.deepspeed_moe(hidden_states, used_token, _routed=super()._routed)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's call that puts the layer on its expert-parallel groups (the core's
        :meth:`~moesaic.layer.moe.MixtureOfExperts.set_expert_parallel_groups`, default registry)."""
        self.set_expert_parallel_groups(use_data_before_expert_parallel_)

    def set_expert_group_name(self, name: str) -> None:
        super().set_expert_group_name(name)
        self.deepspeed_moe.ep_group_name = name

    def _record(self, routing) -> None:
        super()._record(routing)
        # DeepSpeed's MoE.forward returns deepspeed_moe.l_aux / .exp_counts: they are there too
        self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts = self.l_aux, self.exp_counts
