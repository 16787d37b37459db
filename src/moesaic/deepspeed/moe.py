"""``MoE``: DeepSpeed's ``deepspeed.moe.layer.MoE`` constructor over moesaic's layer.

``from moesaic import MoE`` takes DeepSpeed 0.19.8's arguments in DeepSpeed's order and gives
DeepSpeed's behaviour: its defaults, its ``(output, l_aux, exp_counts)`` result, its module
nesting and ``state_dict`` keys (``deepspeed_moe.gate.wg.weight``,
``deepspeed_moe.experts.deepspeed_experts.<i>.*``, ``mlp.*`` / ``coefficient.*``), and its
default layer name ``ep_size_<N>``. What is DeepSpeed's only is here: the positional arguments
read into one :class:`~moesaic.layer.config.MoEConfig`, ``use_tutel`` (accepted, ignored with a
warning), ``enable_expert_tensor_parallelism`` (refused: moesaic has no tensor parallelism) and
the default name. The layer itself is :class:`~moesaic.layer.moe.MixtureOfExperts`, which the
model, the engine, identity, checkpoints and telemetry see.
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from ..layer.config import MoEConfig
from ..layer.moe import MixtureOfExperts


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

