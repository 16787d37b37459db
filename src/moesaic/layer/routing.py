"""The routing record and the pure steps that build it: choose experts, order, apply capacity, weigh.

A :class:`Routing` names each kept (token, expert) route by index, already in expert order, so a
dispatcher gathers tokens with one row gather and the combine scatter-adds them back. No
``[tokens, experts, capacity]`` tensor is built anywhere.

Which routes survive the capacity limit follows DeepSpeed 0.19.8 (``deepspeed/moe/sharded_moe.py``):

* k=1: random token selection (``use_rts``) or, without it, the first ``capacity`` tokens in
  token order (DeepSpeed keeps whichever ties ``torch.topk`` returns; we keep the earliest);
* k=2: position order with every first choice ahead of every second choice;
* k>2: the highest gate probabilities per expert (``drop_policy="probs"``, DeepSpeed's default)
  or token order (``drop_policy="position"``).

The options of the models trained today (sigmoid scores, an expert bias for selection only,
group-limited top-k, top-k weights renormalised and scaled) are steps of their own here
(:func:`score_tokens`, :func:`select_topk`, :func:`topk_weights`); the default path (DeepSpeed's)
does not pass through them, so it stays exactly what it was.

Every tensor made here is made on the logits' device.

Shape legend: S = tokens, E = experts, K = top-k, G = expert groups, R = routes asked for (S*K),
N = kept routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .config import MoEConfig



@dataclass(frozen=True)
class Routing:
    """What the router decided for one batch of tokens; read by dispatchers, the layer and telemetry.

    Attributes:
        probs_SE: `(S, E)` fp32 router probabilities: the softmax of the logits, or with
            ``score_func="sigmoid"`` the sigmoid scores normalised to sum to 1 over the experts
            (what the balance losses read).
        expert_ids_SK: `(S, K)` int64 chosen experts in choice order; a masked token's entries
            are ``E`` (no expert). None under expert-choice routing, where a token has no fixed
            number of experts.
        token_idx_N: `(N,)` int64 source token of each kept route, sorted by expert (stable).
        expert_idx_N: `(N,)` int64 global expert of each kept route (non-decreasing).
        slot_N: `(N,)` int64 position of the route inside its expert's block.
        weight_N: `(N,)` fp32 combine weight of each route (carries the router's gradient).
        tokens_per_expert_E: `(E,)` int64 routes kept per expert (after capacity).
        exp_counts_E: `(E,)` int64 routes chosen per expert before capacity (DeepSpeed's
            ``exp_counts``).
        capacity: slots per expert, or None when dropless.
        num_routes: routes that asked for an expert (valid tokens x k).
        l_aux: fp32 scalar load-balancing loss with DeepSpeed's definition.
        z_loss: fp32 scalar router z-loss times its coefficient (0 when disabled).
        config: the router options that produced this routing.
        seq_aux_loss: fp32 scalar sequence-level balance loss times its coefficient (0 when
            disabled).
        num_tokens: S.
        num_valid_tokens: tokens not masked by ``used_token``.
        peer_counts: under expert parallelism, the routes every peer sends to each local expert
            as a first forward's header exchange found them; set only on a recompute's routing,
            so the all-to-all dispatcher moves the same rows without exchanging counts again.
    """

    probs_SE: Tensor
    expert_ids_SK: Tensor
    token_idx_N: Tensor
    expert_idx_N: Tensor
    slot_N: Tensor
    weight_N: Tensor
    tokens_per_expert_E: Tensor
    exp_counts_E: Tensor
    capacity: Optional[int]
    num_routes: int
    l_aux: Tensor
    z_loss: Tensor
    config: MoEConfig
    seq_aux_loss: Optional[Tensor] = None
    num_tokens: int = 0
    num_valid_tokens: int = 0
    peer_counts: Optional[Tuple[Tuple[int, ...], ...]] = None

    @property
    def num_dropped(self) -> int:
        """Routes removed by the capacity limit."""
        return self.num_routes - int(self.token_idx_N.numel())

    def num_unrouted_tokens(self) -> int:
        """Valid tokens that reach no expert (every route dropped, or, under expert choice, picked by none).

        Computed on demand (one bincount and a device sync), so telemetry pays for it only when
        it asks.
        """
        return count_unrouted(self.token_idx_N, self.num_tokens, self.num_valid_tokens,
                              nothing_dropped=self.num_dropped == 0 and self.expert_ids_SK is not None)


def count_unrouted(token_idx_N: Tensor, num_tokens: int, num_valid_tokens: int, nothing_dropped: bool) -> int:
    """Valid tokens that appear in no kept route (0 without computing when token choice dropped nothing)."""
    if nothing_dropped or num_valid_tokens == 0:
        return 0
    routed = int((torch.bincount(token_idx_N, minlength=num_tokens) > 0).sum())
    return num_valid_tokens - routed


def multiplicative_jitter(x: Tensor, epsilon: float = 1e-2) -> Tensor:
    """Multiply by noise drawn uniformly from ``[1 - epsilon, 1 + epsilon]`` (Switch Transformer)."""
    if epsilon == 0:
        return x
    noise = torch.empty_like(x).uniform_(1.0 - epsilon, 1.0 + epsilon)
    return x * noise


def gumbel_noise(shape, device, dtype=torch.float32) -> Tensor:
    """Standard Gumbel(0, 1) samples, for noisy top-k selection."""
    u = torch.rand(shape, device=device, dtype=dtype)
    # -log(-log(u)) with u kept inside (0, 1) so neither log sees 0
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - torch.finfo(dtype).eps)))


def select_experts(probs_SE: Tensor, logits_SE: Tensor, k: int, *, rsample: bool,
                   second_expert_sampling: bool) -> Tensor:
    """Pick k experts per token; returns expert ids `(S, K)` in choice order."""
    if rsample:
        # RSample: choose by noisy logits, weight by the clean probabilities (as DeepSpeed top-1)
        noisy_SE = logits_SE.detach() + gumbel_noise(logits_SE.shape, logits_SE.device)
        if k == 1:
            return noisy_SE.argmax(dim=1, keepdim=True)
        return noisy_SE.topk(k, dim=1).indices
    if k == 1:
        return probs_SE.argmax(dim=1, keepdim=True)
    if k == 2:
        first_S = probs_SE.argmax(dim=1)
        scores_SE = logits_SE.detach()
        if second_expert_sampling:
            # Gumbel-max trick: the 2nd expert is sampled from softmax(logits) minus the 1st
            scores_SE = scores_SE + gumbel_noise(scores_SE.shape, scores_SE.device)
        scores_SE = scores_SE.scatter(1, first_S[:, None], float("-inf"))
        second_S = scores_SE.argmax(dim=1)
        return torch.stack([first_S, second_S], dim=1)
    # detached: a choice carries no gradient, and autograd would save the indices for nothing
    # (which a recompute that reuses the choices would not save: activation checkpointing
    # compares the counts)
    return probs_SE.detach().topk(k, dim=1).indices


def mask_unused_tokens(expert_ids_SK: Tensor, used_token_S: Tensor, num_experts: int) -> Tensor:
    """Point every route of a masked token at ``num_experts`` (no expert); they sort last."""
    valid_S = used_token_S.reshape(expert_ids_SK.shape[0]) != 0
    return torch.where(valid_S[:, None], expert_ids_SK, torch.full_like(expert_ids_SK, num_experts))


def count_routes(expert_ids_SK: Tensor, num_experts: int) -> Tensor:
    """`(E,)` int64 routes chosen per expert (masked routes, id E, not counted)."""
    return torch.bincount(expert_ids_SK.reshape(-1), minlength=num_experts + 1)[:num_experts]


def route_priority(probs_SE: Tensor, expert_ids_SK: Tensor, capacity: Optional[int], drop_policy: str,
                   use_rts: bool) -> Optional[Tensor]:
    """Flat routes ``r = t * K + j`` in priority order (best first), or None when token order is it."""
    S, K = expert_ids_SK.shape
    E = probs_SE.shape[1]
    R = S * K
    if capacity is None or (K == 1 and not use_rts and drop_policy == "position"):
        return None  # nothing is dropped, or token order already is the priority order
    if K == 1 and use_rts:
        return torch.rand(R, device=probs_SE.device).argsort(descending=True)
    if drop_policy == "probs":
        route_probs_R = probs_SE.detach().gather(1, expert_ids_SK.clamp(max=E - 1)).reshape(-1)
        return route_probs_R.argsort(descending=True, stable=True)
    if K == 2:
        # DeepSpeed's top-2 places every first choice ahead of every second choice
        return torch.arange(R, device=probs_SE.device).view(S, K).t().reshape(-1)
    return None


class Placement(NamedTuple):
    """Kept routes in expert order (see :class:`Routing` for the fields); ``route_N`` is each
    kept route's flat index ``t * K + j`` into the `(S, K)` choices."""

    token_idx_N: Tensor
    expert_idx_N: Tensor
    slot_N: Tensor
    tokens_per_expert_E: Tensor
    num_routes: int
    route_N: Tensor


def place_routes(expert_ids_SK: Tensor, exp_counts_E: Tensor, capacity: Optional[int],
                 priority_R: Optional[Tensor]) -> Placement:
    """Sort routes by expert (ties by priority), number them inside each expert, keep ``capacity``."""
    K = expert_ids_SK.shape[1]
    flat_expert_R = expert_ids_SK.reshape(-1)
    # a stable sort by expert keeps the priority order inside each expert's block
    if priority_R is None:
        by_expert = torch.sort(flat_expert_R, stable=True)
        route_R = by_expert.indices
    else:
        by_expert = torch.sort(flat_expert_R[priority_R], stable=True)
        route_R = priority_R[by_expert.indices]
    sorted_expert_R = by_expert.values

    # position of every route inside its expert's block; masked routes (id E) sorted last: cut them
    num_valid = int(exp_counts_E.sum())
    route_R = route_R[:num_valid]
    sorted_expert_R = sorted_expert_R[:num_valid]
    starts_E = torch.cumsum(exp_counts_E, 0) - exp_counts_E
    slot_R = torch.arange(num_valid, device=flat_expert_R.device) - starts_E[sorted_expert_R]
    if capacity is not None and num_valid and int(exp_counts_E.max()) > capacity:
        keep_R = slot_R < capacity
        route_N, expert_N, slot_N = route_R[keep_R], sorted_expert_R[keep_R], slot_R[keep_R]
        tokens_per_expert_E = exp_counts_E.clamp(max=capacity)
    else:
        route_N, expert_N, slot_N = route_R, sorted_expert_R, slot_R
        tokens_per_expert_E = exp_counts_E.clone()
    token_N = torch.div(route_N, K, rounding_mode="floor")
    return Placement(token_N, expert_N, slot_N, tokens_per_expert_E, num_valid, route_N)


def combine_weights(probs_SE: Tensor, token_N: Tensor, expert_N: Tensor, k: int) -> Tensor:
    """The raw probability for k=1; for k >= 2 renormalised over each token's kept routes."""
    weight_N = probs_SE[token_N, expert_N]
    if k > 1:
        denom_S = probs_SE.new_zeros(probs_SE.shape[0]).index_add(0, token_N, weight_N)
        denom_S = torch.clamp(denom_S, min=torch.finfo(probs_SE.dtype).eps)
        weight_N = weight_N / denom_S[token_N]
    return weight_N


# --- the options of today's models (not on DeepSpeed's path) ---------------------------------------

def score_tokens(logits_SE: Tensor, score_func: str) -> Tensor:
    """Router scores: ``softmax`` over the experts, or an independent ``sigmoid`` per expert."""
    if score_func == "sigmoid":
        return torch.sigmoid(logits_SE)
    return torch.softmax(logits_SE, dim=1)


def normalised_scores(scores_SE: Tensor, score_func: str) -> Tensor:
    """Scores as a distribution over experts (``s / sum_e s``) for the balance losses; softmax already is one."""
    if score_func == "sigmoid":
        return scores_SE / scores_SE.sum(dim=1, keepdim=True)
    return scores_SE


def group_limit(choice_SE: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Group-limited (node-limited) routing, DeepSeek-V3's rule: experts fall into ``n_group``
    contiguous groups; a group's score is the sum of its two best choice scores (its one score
    when a group holds a single expert); only the ``topk_group`` best groups stay eligible.

    Returns ``choice_SE`` with the experts of every other group set to ``-inf``.
    """
    S, E = choice_SE.shape
    size = E // n_group
    grouped_SGX = choice_SE.view(S, n_group, size)
    group_score_SG = grouped_SGX.topk(min(2, size), dim=-1).values.sum(dim=-1)
    keep_SG = torch.zeros_like(group_score_SG, dtype=torch.bool)
    keep_SG.scatter_(1, group_score_SG.topk(topk_group, dim=1).indices, True)
    return grouped_SGX.masked_fill(~keep_SG[:, :, None], float("-inf")).view(S, E)


def select_topk(scores_SE: Tensor, k: int, *, expert_bias_E: Optional[Tensor], n_group: Optional[int],
                topk_group: Optional[int]) -> Tensor:
    """The k experts with the best *choice* scores: the scores plus the expert bias (which steers
    selection only), limited to the best groups. Returns expert ids `(S, K)`, best first."""
    choice_SE = scores_SE.detach()
    if expert_bias_E is not None:
        choice_SE = choice_SE + expert_bias_E
    if n_group is not None:
        choice_SE = group_limit(choice_SE, n_group, topk_group)
    return choice_SE.topk(k, dim=1).indices


def topk_weights(scores_SE: Tensor, logits_SE: Tensor, expert_ids_SK: Tensor, route_N: Tensor, *,
                 norm_topk_prob: bool, softmax_after_topk: bool, scale: float) -> Tensor:
    """Combine weights of the kept routes from each token's chosen k (computed before capacity).

    * ``softmax_after_topk``: softmax over the token's k chosen *logits* (Mixtral's and GPT-OSS's
      order: top-k first, then softmax);
    * ``norm_topk_prob``: the chosen scores divided by their sum (``+ 1e-20``, as DeepSeek-V3);
    * otherwise the raw scores.

    A route dropped by the capacity limit keeps no weight and the others are not renormalised
    (Megatron-Core's and torchtitan's rule). Then everything is multiplied by ``scale``
    (DeepSeek-V3's routed scaling factor).
    """
    E = scores_SE.shape[1]
    ids_SK = expert_ids_SK.clamp(max=E - 1)  # a masked token's routes are cut below anyway
    if softmax_after_topk:
        w_SK = torch.softmax(logits_SE.gather(1, ids_SK), dim=1)
    else:
        w_SK = scores_SE.gather(1, ids_SK)
        if norm_topk_prob:
            w_SK = w_SK / (w_SK.sum(dim=1, keepdim=True) + 1e-20)
    weight_N = w_SK.reshape(-1)[route_N]
    return weight_N * scale if scale != 1.0 else weight_N
