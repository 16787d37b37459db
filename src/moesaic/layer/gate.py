"""The gate (DeepSpeed's name for the router): ``TopKGate`` (its weights) and ``compute_routing`` (its plan).

The options are the layer's :class:`~moesaic.layer.config.MoEConfig` (``config.py``); the record
the plan fills and its pure steps are in ``routing.py``. ``TopKGate`` scores tokens with ``wg`` in fp32 and hands the logits to :func:`compute_routing`,
which returns a frozen :class:`~moesaic.layer.routing.Routing` record. Everything a router option
changes happens here or in :mod:`moesaic.layer.routing`; dispatchers and ``parallel/`` only see the
record, and the expert-parallel agreement check fingerprints the whole :class:`MoEConfig`
(:func:`config_fingerprint`), so a new option needs no change there.

The numbers follow DeepSpeed 0.19.8's ``TopKGate`` (``deepspeed/moe/sharded_moe.py``): fp32
softmax, the capacity formula evaluated in float32, DeepSpeed's ``l_aux`` and ``exp_counts``.
The options of the routers trained today (sigmoid scores, a router bias, top-k softmax,
renormalised and scaled top-k weights, group-limited top-k, the aux-loss-free expert bias, the
sequence-level balance loss, expert-choice routing) all default to off; with every one off the
path through :func:`compute_routing` is DeepSpeed's, unchanged (docs/modern-layers.md has the
formulas).

Shape legend: S = tokens, E = experts, D = model dim, K = top-k.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .config import MoEConfig, RouterConfig, expert_capacity  # noqa: F401  (RouterConfig: the former name)
from .expert_choice import expert_choice_routing
from .losses import load_balancing_loss, router_z_loss, sequence_balance_loss
from .routing import (Routing, combine_weights, count_routes, mask_unused_tokens, multiplicative_jitter,
                      normalised_scores, place_routes, route_priority, score_tokens, select_experts, select_topk,
                      topk_weights)

def config_fingerprint(config: MoEConfig, hidden_size: int, dtype: torch.dtype) -> int:
    """A 31-bit number every rank of an expert-parallel group must agree on.

    It covers every field of the config (its ``repr`` lists them all, so a new option is covered
    without listing it here), the token width and dtype. CRC-32 rather than ``hash()``: Python
    salts string hashes per process.
    """
    text = f"{config!r} hidden_size={hidden_size} dtype={dtype}"
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def compute_routing(logits_SE: Tensor, config: MoEConfig, *, training: bool,
                    used_token_S: Optional[Tensor] = None, expert_bias_E: Optional[Tensor] = None,
                    num_sequences: int = 1) -> Routing:
    """Turn fp32 router logits into a :class:`Routing` (choices, capacity, slots, weights, losses).

    Args:
        logits_SE: `(S, E)` fp32 router logits.
        config: the router's options.
        training: training mode (capacity factor, and whether RTS / noise / sampling act).
        used_token_S: `(S,)` 0/1 mask; masked tokens route nowhere and output zero.
        expert_bias_E: `(E,)` fp32 selection bias (``config.enable_expert_bias``), or None.
        num_sequences: B, the sequences the S tokens form (sequence-major), for the
            sequence-level balance loss.

    Returns:
        The routing record.
    """
    # 1. probabilities and choices  2. counts before dropping and the losses  3. priority order,
    # capacity and slots  4. combine weights
    S, E = logits_SE.shape
    if E != config.num_experts:
        raise ValueError(f"logits_SE has {E} experts but config.num_experts={config.num_experts}")
    if config.routing_type == "expert_choice":  # a rule of its own, into the same record
        return expert_choice_routing(logits_SE, config, training=training, used_token_S=used_token_S)
    if config.enable_expert_bias and expert_bias_E is None:
        raise ValueError("config.enable_expert_bias is set: pass the gate's expert_bias_E")
    k = config.k
    capacity = config.capacity(S, training)
    scores_SE, probs_SE = _scores(logits_SE, config)
    if config.default_selection:
        expert_ids_SK = select_experts(probs_SE, logits_SE, k,
                                       rsample=training and config.noisy_gate_policy == "RSample",
                                       second_expert_sampling=training and config.top2_2nd_expert_sampling)
    else:
        expert_ids_SK = select_topk(scores_SE, k, expert_bias_E=expert_bias_E if config.enable_expert_bias else None,
                                    n_group=config.n_group, topk_group=config.topk_group)
    if used_token_S is not None:
        expert_ids_SK = mask_unused_tokens(expert_ids_SK, used_token_S, E)

    # 2. DeepSpeed counts (and balances) the routes chosen, before any are dropped
    exp_counts_E = count_routes(expert_ids_SK, E)
    l_aux, z_loss, seq_aux_loss = _losses(logits_SE, probs_SE, expert_ids_SK, exp_counts_E, config, used_token_S,
                                          num_sequences)

    # 3. which routes survive an over-full expert, and where each kept route sits in its expert
    priority_R = route_priority(scores_SE, expert_ids_SK, capacity, config.drop_policy,
                                use_rts=config.use_rts and k == 1 and training)
    placed = place_routes(expert_ids_SK, exp_counts_E, capacity, priority_R)

    # 4. combine weights
    weight_N = _weights(scores_SE, logits_SE, expert_ids_SK, placed.token_idx_N, placed.expert_idx_N,
                        placed.route_N, config)
    return Routing(probs_SE=probs_SE, expert_ids_SK=expert_ids_SK, token_idx_N=placed.token_idx_N,
                   expert_idx_N=placed.expert_idx_N, slot_N=placed.slot_N, weight_N=weight_N,
                   tokens_per_expert_E=placed.tokens_per_expert_E, exp_counts_E=exp_counts_E, capacity=capacity,
                   num_routes=placed.num_routes, l_aux=l_aux, z_loss=z_loss, config=config,
                   seq_aux_loss=seq_aux_loss, num_tokens=S, num_valid_tokens=placed.num_routes // k)


def _scores(logits_SE: Tensor, config: MoEConfig):
    """``(scores_SE, probs_SE)``: the scores routes are weighted by, and the distribution the losses read."""
    if config.score_func == "softmax":
        probs_SE = scores_SE = F.softmax(logits_SE, dim=1)
    else:
        scores_SE = score_tokens(logits_SE, config.score_func)
        probs_SE = normalised_scores(scores_SE, config.score_func)
    return scores_SE, probs_SE


def _losses(logits_SE, probs_SE, expert_ids_SK, exp_counts_E, config: MoEConfig, used_token_S, num_sequences):
    S = logits_SE.shape[0]
    l_aux = load_balancing_loss(probs_SE, expert_ids_SK, exp_counts_E, config.k)
    z_loss = router_z_loss(logits_SE, config.z_loss_coef)
    seq_aux_loss = sequence_balance_loss(
        probs_SE, expert_ids_SK, num_sequences, config.seq_aux_loss_coef,
        None if used_token_S is None or not config.seq_aux_loss_coef else used_token_S.reshape(S) != 0)
    return l_aux, z_loss, seq_aux_loss


def _weights(scores_SE, logits_SE, expert_ids_SK, token_idx_N, expert_idx_N, route_N, config: MoEConfig) -> Tensor:
    if config.default_weights:
        return combine_weights(scores_SE, token_idx_N, expert_idx_N, config.k)
    if config.norm_topk_prob is None and not config.softmax_after_topk:  # DeepSpeed's rule, then scaled
        return combine_weights(scores_SE, token_idx_N, expert_idx_N, config.k) * config.routed_scaling_factor
    return topk_weights(scores_SE, logits_SE, expert_ids_SK, route_N, norm_topk_prob=bool(config.norm_topk_prob),
                        softmax_after_topk=config.softmax_after_topk, scale=config.routed_scaling_factor)


def route_with_decision(logits_SE: Tensor, config: MoEConfig, decision, *, used_token_S: Optional[Tensor] = None,
                        num_sequences: int = 1) -> Routing:
    """A :class:`Routing` whose choices, drops and slots are ``decision``'s, with the scores, combine
    weights and losses computed from ``logits_SE`` (so they carry the router's gradient).

    With the logits and decision of a :func:`compute_routing` call, every tensor equals that call's
    bit for bit (the same operations on the same values): what a recompute under activation
    checkpointing runs instead of choosing again (:mod:`moesaic.layer.recompute`).

    Args:
        logits_SE: `(S, E)` fp32 router logits.
        config: the router's options.
        decision: a :class:`moesaic.layer.recompute.Decision`.
        used_token_S: the `(S,)` mask the decision was made with (for the sequence-level loss).
        num_sequences: as for :func:`compute_routing`.
    """
    S, E = logits_SE.shape
    d = decision
    if d.tokens_per_expert_E.numel() != E or (d.expert_ids_SK is not None and d.expert_ids_SK.shape[0] != S):
        raise ValueError(f"the routing decision is for {d.tokens_per_expert_E.numel()} experts and "
                         f"{None if d.expert_ids_SK is None else d.expert_ids_SK.shape[0]} tokens; the logits have "
                         f"shape {tuple(logits_SE.shape)}")
    if config.routing_type == "expert_choice":
        scores_SE = score_tokens(logits_SE, config.score_func)
        probs_SE = normalised_scores(scores_SE, config.score_func)
        weight_N = scores_SE[d.token_idx_N, d.expert_idx_N]
        if config.routed_scaling_factor != 1.0:
            weight_N = weight_N * config.routed_scaling_factor
        l_aux, z_loss, seq_aux_loss = (logits_SE.new_zeros(()), router_z_loss(logits_SE, config.z_loss_coef),
                                       logits_SE.new_zeros(()))
    else:
        scores_SE, probs_SE = _scores(logits_SE, config)
        l_aux, z_loss, seq_aux_loss = _losses(logits_SE, probs_SE, d.expert_ids_SK, d.exp_counts_E, config,
                                              used_token_S, num_sequences)
        route_N = None
        if not config.default_weights and (config.norm_topk_prob is not None or config.softmax_after_topk):
            route_N = route_index(d.expert_ids_SK, d.token_idx_N, d.expert_idx_N)
        weight_N = _weights(scores_SE, logits_SE, d.expert_ids_SK, d.token_idx_N, d.expert_idx_N, route_N, config)
    return Routing(probs_SE=probs_SE, expert_ids_SK=d.expert_ids_SK, token_idx_N=d.token_idx_N,
                   expert_idx_N=d.expert_idx_N, slot_N=d.slot_N, weight_N=weight_N,
                   tokens_per_expert_E=d.tokens_per_expert_E, exp_counts_E=d.exp_counts_E, capacity=d.capacity,
                   num_routes=d.num_routes, l_aux=l_aux, z_loss=z_loss, config=config, seq_aux_loss=seq_aux_loss,
                   num_tokens=S, num_valid_tokens=d.num_valid_tokens)


def route_index(expert_ids_SK: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor) -> Tensor:
    """The flat index ``t * K + j`` into the `(S, K)` choices of each kept route (a token's k experts differ)."""
    K = expert_ids_SK.shape[1]
    j_N = (expert_ids_SK[token_idx_N] == expert_idx_N[:, None]).to(torch.int64).argmax(dim=1)
    return token_idx_N * K + j_N


def _config_view(name: str) -> property:
    def get(self: "TopKGate"):
        return getattr(self.config, name)

    def refuse(self: "TopKGate", value) -> None:
        raise AttributeError(f"TopKGate.{name} reads gate.config; change it with "
                             f"gate.config = dataclasses.replace(gate.config, {name}={value!r})")

    return property(get, refuse, doc=f"``config.{name}`` (DeepSpeed's attribute name; read-only).")


class TopKGate(nn.Module):
    """The router of an MoE layer (DeepSpeed's name): ``wg`` scores tokens, ``forward`` routes them.

    Args:
        model_dim: D, size of each token vector.
        *args: DeepSpeed's positional options, in its order (``num_experts, k, capacity_factor,
            eval_capacity_factor, min_capacity, noisy_gate_policy, drop_tokens, use_rts,
            top2_2nd_expert_sampling``).
        config: a :class:`~moesaic.layer.config.MoEConfig` instead of the options.
        **options: fields of :class:`~moesaic.layer.config.MoEConfig` by name.

    ``gate.config`` holds the options; DeepSpeed's attribute names (``gate.k``,
    ``gate.capacity_factor``, ...) read them.

    With ``enable_expert_bias`` the gate owns two buffers: ``expert_bias`` `(E,)` fp32, persistent
    (in the state dict, so checkpoints carry it; never a parameter, so no optimizer touches it;
    kept fp32 when the model is cast to bf16/fp16), and ``expert_load`` `(E,)` int64, not
    persistent: the routes chosen per expert by the training forwards since the last
    :func:`moesaic.update_expert_bias`.
    """

    def __init__(self, model_dim: int, *args, config: Optional[MoEConfig] = None, **options) -> None:
        super().__init__()
        check_int(model_dim, "model_dim", 1)
        if config is None:
            config = gate_config(args, options)
        elif args or options:
            raise TypeError("TopKGate takes a config or options, not both")
        elif not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a moesaic.MoEConfig, got {type(config).__name__}")
        num_experts = config.num_experts
        self.wg = nn.Linear(model_dim, num_experts, bias=config.router_bias)
        if config.router_bias:
            nn.init.zeros_(self.wg.bias)  # GPT-OSS initialises its router bias at 0
        if config.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.model_dim = model_dim
        self.config = config

    @classmethod
    def from_config(cls, model_dim: int, config: MoEConfig) -> "TopKGate":
        """A gate with ``config``'s options."""
        return cls(model_dim, config=config)

    @property
    def config(self) -> MoEConfig:
        """The router's options (frozen; assign a new one to change them)."""
        return self._config

    @config.setter
    def config(self, value: MoEConfig) -> None:
        if not isinstance(value, MoEConfig):
            raise TypeError(f"config must be a moesaic.MoEConfig, got {type(value).__name__}")
        if "wg" in self._modules:
            if value.num_experts != self.wg.out_features:
                raise ValueError(f"config.num_experts ({value.num_experts}) must equal the router's "
                                 f"{self.wg.out_features} outputs; build a new gate to change the expert count")
            for name, has in (("router_bias", self.wg.bias is not None),
                              ("enable_expert_bias", "expert_bias" in self._buffers)):
                if getattr(value, name) != has:
                    raise ValueError(f"config.{name}={getattr(value, name)!r} does not match this gate, built with "
                                     f"{name}={has!r} (it changes the gate's tensors); build a new gate")
        self._config = value

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert for ``num_tokens`` tokens in the current mode (None when dropless)."""
        return self.config.capacity(num_tokens, self.training)

    def logits(self, x_SD: Tensor) -> Tensor:
        """Router logits in fp32 (jittered in training under the "Jitter" policy)."""
        x_fp32 = x_SD.float()
        if self.config.noisy_gate_policy == "Jitter" and self.training:
            x_fp32 = multiplicative_jitter(x_fp32)
        bias = self.wg.bias
        return F.linear(x_fp32, self.wg.weight.float(), None if bias is None else bias.float())

    def forward(self, x_SD: Tensor, used_token: Optional[Tensor] = None, num_sequences: int = 1, *,
                decision=None, count: bool = True, logits_out: Optional[list] = None) -> Routing:
        """Route the tokens of ``x_SD`` (`(S, D)`, ``num_sequences`` sequences of equal length, sequence-major);
        ``used_token`` is an optional `(S,)` 0/1 mask.

        ``decision`` (a :class:`moesaic.layer.recompute.Decision`): reuse those choices instead of
        choosing (recompute, replay). ``count=False``: leave ``expert_load`` alone (a recompute:
        the first forward counted). ``logits_out``: a list the router logits are appended to.
        """
        bias_E = self.expert_bias if self.config.enable_expert_bias else None
        logits_SE = self.logits(x_SD)
        if logits_out is not None:
            logits_out.append(logits_SE)
        if decision is None:
            routing = compute_routing(logits_SE, self.config, training=self.training, used_token_S=used_token,
                                      expert_bias_E=bias_E, num_sequences=num_sequences)
        else:
            routing = route_with_decision(logits_SE, self.config, decision, used_token_S=used_token,
                                          num_sequences=num_sequences)
        if bias_E is not None and self.training and count:
            # loads for the next bias update: the routes chosen, summed over the step's micro-batches
            self.expert_load += routing.exp_counts_E
        return routing

    def _apply(self, fn, recurse: bool = True):
        # model.to(bf16) must not round the expert bias: its updates (1e-3) are below bf16's resolution
        bias = self._buffers.get("expert_bias")
        out = super()._apply(fn, recurse)
        moved = self._buffers.get("expert_bias")
        if bias is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["expert_bias"] = bias.to(device=moved.device, dtype=torch.float32)
        return out

    def extra_repr(self) -> str:
        return f"model_dim={self.model_dim}, {self.config}"

    # DeepSpeed's TopKGate keeps its options as attributes; these read the config
    num_experts = _config_view("num_experts")
    k = _config_view("k")
    capacity_factor = _config_view("capacity_factor")
    eval_capacity_factor = _config_view("eval_capacity_factor")
    min_capacity = _config_view("min_capacity")
    noisy_gate_policy = _config_view("noisy_gate_policy")
    drop_tokens = _config_view("drop_tokens")
    use_rts = _config_view("use_rts")
    top2_2nd_expert_sampling = _config_view("top2_2nd_expert_sampling")
    drop_policy = _config_view("drop_policy")
    z_loss_coef = _config_view("z_loss_coef")


# DeepSpeed's TopKGate(model_dim, num_experts, k, ...) positional order
GATE_POSITIONAL = ("num_experts", "k", "capacity_factor", "eval_capacity_factor", "min_capacity", "noisy_gate_policy",
                   "drop_tokens", "use_rts", "top2_2nd_expert_sampling")


def gate_config(args: tuple, options: dict) -> MoEConfig:
    """The :class:`MoEConfig` of DeepSpeed's positional options ``args`` plus named ``options``."""
    if len(args) > len(GATE_POSITIONAL):
        raise TypeError(f"TopKGate takes at most {len(GATE_POSITIONAL) + 1} positional arguments (model_dim, "
                        f"{', '.join(GATE_POSITIONAL)}), got {len(args) + 1}")
    both = sorted(set(GATE_POSITIONAL[:len(args)]) & set(options))
    if both:
        raise TypeError(f"TopKGate got {both} both by position and by name")
    return MoEConfig.from_options({**dict(zip(GATE_POSITIONAL, args)), **options}, who="TopKGate")
