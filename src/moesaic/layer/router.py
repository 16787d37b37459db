"""The router: ``RouterConfig`` (every routing option, validated once) and ``TopKGate`` (its weights).

``TopKGate`` scores tokens with ``wg`` in fp32 and hands the logits to :func:`compute_routing`,
which returns a frozen :class:`~moesaic.layer.routing.Routing` record. Everything a router option
changes happens here or in :mod:`moesaic.layer.routing`; dispatchers and ``parallel/`` only see the
record, and the expert-parallel agreement check fingerprints the whole :class:`RouterConfig`
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
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, check_number
from .expert_choice import expert_choice_routing
from .losses import load_balancing_loss, router_z_loss, sequence_balance_loss
from .routing import (Routing, combine_weights, count_routes, mask_unused_tokens, multiplicative_jitter,
                      normalised_scores, place_routes, route_priority, score_tokens, select_experts, select_topk,
                      topk_weights)

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
DROP_POLICIES = (None, "position", "probs")
SCORE_FUNCS = ("softmax", "sigmoid")
ROUTING_TYPES = ("token_choice", "expert_choice")
DEFAULT_BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's bias update speed (Megatron-Core's default too)


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """Slots per expert: ``max(ceil(S / E * capacity_factor * k), min_capacity)``.

    Evaluated exactly as DeepSpeed does, in float32: DeepSpeed multiplies ``S / E`` (a Python
    float, which torch rounds to float32) by ``capacity_factor * k`` held in a float32 tensor, so
    both factors are rounded to float32 and so is their product. Here the same roundings are done
    on Python floats (:func:`_to_float32`; the product of two float32 values is exact in a double,
    so rounding it once gives float32's product), and the capacity agrees to the last slot
    (``tests/unit/test_layer_compile.py`` checks it against the tensor form). Pure Python, with no
    tensor and no ``.item()``: under ``torch.compile`` a static token count gives a constant
    capacity, not a graph break.
    """
    product = _to_float32(_to_float32(num_tokens / num_experts) * _to_float32(capacity_factor * k))
    return max(math.ceil(product), int(min_capacity))


def _to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), as ``torch.tensor(x, dtype=torch.float32)`` does.

    For the normal float32 range (capacities are far inside it): the 24 significant bits of the
    mantissa are kept, with Python's round() breaking ties to even.
    """
    if x == 0.0 or not math.isfinite(x):
        return x
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return math.ldexp(round(mantissa * 2.0 ** 24), exponent - 24)


@dataclass(frozen=True)
class RouterConfig:
    """Every option of a top-k router; validated on construction, immutable afterwards.

    Attributes:
        num_experts: E, experts the router chooses among (global count).
        k: experts per token, in ``[1, num_experts]``.
        capacity_factor / eval_capacity_factor: capacity multiplier in train / eval mode.
        min_capacity: lower bound on slots per expert.
        noisy_gate_policy: None, "None", "Jitter" (multiplicative input noise) or "RSample"
            (Gumbel-perturbed choice); both act in training only.
        drop_tokens: False routes every token (dropless: no capacity).
        use_rts: random token selection for k=1 when an expert overflows (training only).
        top2_2nd_expert_sampling: sample the 2nd expert (k=2) with the Gumbel-max trick (training only).
        drop_policy: which routes survive an over-full expert: "position" or "probs". None picks
            DeepSpeed's default for k (position for k <= 2, probs above) and is stored resolved.
        z_loss_coef: coefficient of the ST-MoE router z-loss (0 disables it).
        score_func: "softmax" (DeepSpeed) or "sigmoid" (DeepSeek-V3: one independent score per
            expert).
        softmax_after_topk: choose the top-k logits first, then weight by a softmax over those k
            only (Mixtral's and GPT-OSS's order); softmax scores only.
        router_bias: the router's linear layer has a bias (GPT-OSS); ``wg.bias`` in the state dict.
        norm_topk_prob: None keeps DeepSpeed's weights (k=1: the raw probability; k>=2:
            renormalised over the routes that survive capacity); True divides each token's k
            chosen scores by their sum; False uses the raw scores.
        routed_scaling_factor: multiplies every combine weight (DeepSeek-V3).
        n_group / topk_group: group-limited top-k (DeepSeek-V2/V3): the experts form ``n_group``
            groups, and only the ``topk_group`` best groups (by the sum of their two best scores)
            are eligible. Both None: off.
        enable_expert_bias: aux-loss-free balancing (DeepSeek-V3): a per-expert bias (buffer
            ``gate.expert_bias``) is added to the scores for selection only.
        bias_update_rate: the bias step per optimizer step (``moesaic.update_expert_bias``); None
            resolves to 1e-3 when the bias is on (0 keeps it fixed, e.g. a converted checkpoint's).
        seq_aux_loss_coef: coefficient of DeepSeek-V3's sequence-wise balance loss (0 disables it).
        routing_type: "token_choice" (each token picks k experts) or "expert_choice" (Zhou et al.
            2022: each expert picks its ``capacity`` best tokens).

    To change an option of a built router, replace its config:
    ``gate.config = dataclasses.replace(gate.config, capacity_factor=2.0)``.
    """

    num_experts: int
    k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    noisy_gate_policy: Optional[str] = None
    drop_tokens: bool = True
    use_rts: bool = True
    top2_2nd_expert_sampling: bool = True
    drop_policy: Optional[str] = None
    z_loss_coef: float = 0.0
    score_func: str = "softmax"
    softmax_after_topk: bool = False
    router_bias: bool = False
    norm_topk_prob: Optional[bool] = None
    routed_scaling_factor: float = 1.0
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    enable_expert_bias: bool = False
    bias_update_rate: Optional[float] = None
    seq_aux_loss_coef: float = 0.0
    routing_type: str = "token_choice"

    def __post_init__(self) -> None:
        check_int(self.num_experts, "num_experts", 1)
        check_int(self.k, "k", 1, self.num_experts, hi_text=f"num_experts={self.num_experts}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            object.__setattr__(self, name, check_number(getattr(self, name), name, 0.0, lo_open=True))
        check_int(self.min_capacity, "min_capacity", 0)
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ValueError(f"Unknown noisy_gate_policy {self.noisy_gate_policy!r}; choose one of "
                             f"{list(NOISY_GATE_POLICIES)}")
        for name in ("drop_tokens", "use_rts", "top2_2nd_expert_sampling"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"Unknown drop_policy {self.drop_policy!r}; choose one of {list(DROP_POLICIES)}")
        if self.drop_policy is None:
            object.__setattr__(self, "drop_policy", "position" if self.k <= 2 else "probs")
        object.__setattr__(self, "z_loss_coef", check_number(self.z_loss_coef, "z_loss_coef", 0.0))
        self._check_modern_options()

    def _check_modern_options(self) -> None:
        E, k = self.num_experts, self.k
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"Unknown score_func {self.score_func!r}; choose one of {list(SCORE_FUNCS)}")
        if self.routing_type not in ROUTING_TYPES:
            raise ValueError(f"Unknown routing_type {self.routing_type!r}; choose one of {list(ROUTING_TYPES)}")
        for name in ("softmax_after_topk", "router_bias", "enable_expert_bias"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            raise TypeError(f"norm_topk_prob must be None or a bool, got {type(self.norm_topk_prob).__name__}: "
                            f"{self.norm_topk_prob!r}")
        object.__setattr__(self, "routed_scaling_factor",
                           check_number(self.routed_scaling_factor, "routed_scaling_factor", 0.0, lo_open=True))
        object.__setattr__(self, "seq_aux_loss_coef", check_number(self.seq_aux_loss_coef, "seq_aux_loss_coef", 0.0))
        if self.softmax_after_topk:
            if self.score_func != "softmax":
                raise ValueError(f"softmax_after_topk=True needs score_func='softmax', got score_func="
                                 f"{self.score_func!r}")
            if self.norm_topk_prob is not None:
                raise ValueError(f"softmax_after_topk=True already normalises each token's k weights; leave "
                                 f"norm_topk_prob=None, got norm_topk_prob={self.norm_topk_prob!r}")
        # group-limited top-k
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(f"n_group and topk_group go together (both None: no group limit), got n_group="
                             f"{self.n_group!r}, topk_group={self.topk_group!r}")
        if self.n_group is not None:
            check_int(self.n_group, "n_group", 1, E, hi_text=f"num_experts={E}")
            if E % self.n_group:
                raise ValueError(f"n_group must divide num_experts={E} (experts are split into equal groups), got "
                                 f"n_group={self.n_group}; pick one of {[g for g in range(1, E + 1) if E % g == 0]}")
            check_int(self.topk_group, "topk_group", 1, self.n_group, hi_text=f"n_group={self.n_group}")
            eligible = self.topk_group * (E // self.n_group)
            if k > eligible:
                raise ValueError(f"k must be at most the experts eligible under the group limit, topk_group x "
                                 f"num_experts / n_group = {self.topk_group} x {E // self.n_group} = {eligible}, "
                                 f"got k={k}")
        # aux-loss-free bias
        if self.bias_update_rate is not None:
            rate = check_number(self.bias_update_rate, "bias_update_rate", 0.0)
            if not self.enable_expert_bias:
                raise ValueError(f"bias_update_rate={rate!r} needs enable_expert_bias=True (there is no expert "
                                 "bias to update otherwise)")
            object.__setattr__(self, "bias_update_rate", rate)
        elif self.enable_expert_bias:
            object.__setattr__(self, "bias_update_rate", DEFAULT_BIAS_UPDATE_RATE)
        # the noisy policies of DeepSpeed's softmax gate draw from softmax(logits); they cannot honour
        # a selection changed by sigmoid scores, an expert bias or a group limit
        changed = [f"{n}={getattr(self, n)!r}" for n, off in
                   (("score_func", "softmax"), ("enable_expert_bias", False), ("n_group", None))
                   if getattr(self, n) != off]
        if changed and self.routing_type == "token_choice":
            if self.noisy_gate_policy == "RSample":
                raise ValueError(f"noisy_gate_policy='RSample' samples from softmax(logits) and cannot be combined "
                                 f"with {', '.join(changed)}; use None or 'Jitter'")
            if k == 2 and self.top2_2nd_expert_sampling:
                raise ValueError(f"top2_2nd_expert_sampling=True (DeepSpeed's default) samples the 2nd expert from "
                                 f"softmax(logits) and cannot be combined with {', '.join(changed)}; pass "
                                 "top2_2nd_expert_sampling=False")
        if self.routing_type == "expert_choice":
            refused = [f"{n}={getattr(self, n)!r}" for n, off in
                       (("drop_tokens", True), ("n_group", None), ("enable_expert_bias", False),
                        ("seq_aux_loss_coef", 0.0), ("norm_topk_prob", None), ("softmax_after_topk", False))
                       if getattr(self, n) != off]
            if self.noisy_gate_policy == "RSample":
                refused.append("noisy_gate_policy='RSample'")
            if refused:
                raise ValueError(f"routing_type='expert_choice' cannot honour {', '.join(refused)}: each expert picks "
                                 "its capacity of tokens (always capacity-bound, balanced by construction, a token "
                                 "has no fixed k). Allowed with it: score_func, router_bias, routed_scaling_factor, "
                                 "capacity_factor/eval_capacity_factor/min_capacity (with k: slots per expert = "
                                 "ceil(S / E * capacity_factor * k)), z_loss_coef, noisy_gate_policy None or 'Jitter'")

    @property
    def default_selection(self) -> bool:
        """True when experts are chosen exactly as DeepSpeed's gate chooses them."""
        return self.score_func == "softmax" and not self.enable_expert_bias and self.n_group is None

    @property
    def default_weights(self) -> bool:
        """True when combine weights are DeepSpeed's (raw for k=1, renormalised over kept routes for k>=2)."""
        return self.norm_topk_prob is None and not self.softmax_after_topk and self.routed_scaling_factor == 1.0

    def capacity(self, num_tokens: int, training: bool) -> Optional[int]:
        """Slots per expert for ``num_tokens`` tokens (None when dropless)."""
        if not self.drop_tokens:
            return None
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, factor, self.k, self.min_capacity)


def config_fingerprint(config: RouterConfig, hidden_size: int, dtype: torch.dtype) -> int:
    """A 31-bit number every rank of an expert-parallel group must agree on.

    It covers every field of the config (its ``repr`` lists them all, so a new option is covered
    without listing it here), the token width and dtype. CRC-32 rather than ``hash()``: Python
    salts string hashes per process.
    """
    text = f"{config!r} hidden_size={hidden_size} dtype={dtype}"
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def compute_routing(logits_SE: Tensor, config: RouterConfig, *, training: bool,
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


def _scores(logits_SE: Tensor, config: RouterConfig):
    """``(scores_SE, probs_SE)``: the scores routes are weighted by, and the distribution the losses read."""
    if config.score_func == "softmax":
        probs_SE = scores_SE = F.softmax(logits_SE, dim=1)
    else:
        scores_SE = score_tokens(logits_SE, config.score_func)
        probs_SE = normalised_scores(scores_SE, config.score_func)
    return scores_SE, probs_SE


def _losses(logits_SE, probs_SE, expert_ids_SK, exp_counts_E, config: RouterConfig, used_token_S, num_sequences):
    S = logits_SE.shape[0]
    l_aux = load_balancing_loss(probs_SE, expert_ids_SK, exp_counts_E, config.k)
    z_loss = router_z_loss(logits_SE, config.z_loss_coef)
    seq_aux_loss = sequence_balance_loss(
        probs_SE, expert_ids_SK, num_sequences, config.seq_aux_loss_coef,
        None if used_token_S is None or not config.seq_aux_loss_coef else used_token_S.reshape(S) != 0)
    return l_aux, z_loss, seq_aux_loss


def _weights(scores_SE, logits_SE, expert_ids_SK, token_idx_N, expert_idx_N, route_N, config: RouterConfig) -> Tensor:
    if config.default_weights:
        return combine_weights(scores_SE, token_idx_N, expert_idx_N, config.k)
    if config.norm_topk_prob is None and not config.softmax_after_topk:  # DeepSpeed's rule, then scaled
        return combine_weights(scores_SE, token_idx_N, expert_idx_N, config.k) * config.routed_scaling_factor
    return topk_weights(scores_SE, logits_SE, expert_ids_SK, route_N, norm_topk_prob=bool(config.norm_topk_prob),
                        softmax_after_topk=config.softmax_after_topk, scale=config.routed_scaling_factor)


def route_with_decision(logits_SE: Tensor, config: RouterConfig, decision, *, used_token_S: Optional[Tensor] = None,
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


class TopKGate(nn.Module):
    """The router of an MoE layer (DeepSpeed's name): ``wg`` scores tokens, ``forward`` routes them.

    Args:
        model_dim: D, size of each token vector.
        num_experts ... z_loss_coef: DeepSpeed's options, fields of :class:`RouterConfig` with the
            same names and defaults.
        **options: the other fields of :class:`RouterConfig` (``score_func``, ``n_group``, ...),
            keyword-only.

    ``gate.config`` holds the options; DeepSpeed's attribute names (``gate.k``,
    ``gate.capacity_factor``, ...) read them. Build from a config with :meth:`from_config`.

    With ``enable_expert_bias`` the gate owns two buffers: ``expert_bias`` `(E,)` fp32, persistent
    (in the state dict, so checkpoints carry it; never a parameter, so no optimizer touches it;
    kept fp32 when the model is cast to bf16/fp16), and ``expert_load`` `(E,)` int64, not
    persistent: the routes chosen per expert by the training forwards since the last
    :func:`moesaic.update_expert_bias`.
    """

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True, use_rts: bool = True,
                 top2_2nd_expert_sampling: bool = True, drop_policy: Optional[str] = None,
                 z_loss_coef: float = 0.0, **options) -> None:
        super().__init__()
        check_int(model_dim, "model_dim", 1)
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(RouterConfig)})
        if unknown:
            raise TypeError(f"TopKGate got unknown options {unknown}; the router's options are the fields of "
                            f"RouterConfig: {[f.name for f in dataclasses.fields(RouterConfig)]}")
        config = RouterConfig(num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                              eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                              noisy_gate_policy=noisy_gate_policy, drop_tokens=drop_tokens, use_rts=use_rts,
                              top2_2nd_expert_sampling=top2_2nd_expert_sampling, drop_policy=drop_policy,
                              z_loss_coef=z_loss_coef, **options)
        self.wg = nn.Linear(model_dim, num_experts, bias=config.router_bias)
        if config.router_bias:
            nn.init.zeros_(self.wg.bias)  # GPT-OSS initialises its router bias at 0
        if config.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.model_dim = model_dim
        self.config = config

    @classmethod
    def from_config(cls, model_dim: int, config: RouterConfig) -> "TopKGate":
        """A gate with ``config``'s options (validated again: a config is never trusted blindly)."""
        if not isinstance(config, RouterConfig):
            raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
        return cls(model_dim, **dataclasses.asdict(config))

    @property
    def config(self) -> RouterConfig:
        """The router's options (frozen; assign a new one to change them)."""
        return self._config

    @config.setter
    def config(self, value: RouterConfig) -> None:
        if not isinstance(value, RouterConfig):
            raise TypeError(f"config must be a RouterConfig, got {type(value).__name__}")
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


def _config_view(name: str) -> property:
    def get(self: TopKGate):
        return getattr(self.config, name)

    def refuse(self: TopKGate, value) -> None:
        raise AttributeError(f"TopKGate.{name} reads gate.config; change it with "
                             f"gate.config = dataclasses.replace(gate.config, {name}={value!r})")

    return property(get, refuse, doc=f"``config.{name}`` (DeepSpeed's attribute name; read-only).")


# DeepSpeed's TopKGate keeps its options as attributes; ours are read-only views of the config
for _name in ("num_experts", "k", "capacity_factor", "eval_capacity_factor", "min_capacity", "noisy_gate_policy",
              "drop_tokens", "use_rts", "top2_2nd_expert_sampling", "drop_policy", "z_loss_coef"):
    setattr(TopKGate, _name, _config_view(_name))
del _name
