"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Token choice asks every token for its k best experts; expert choice turns the score matrix round:
every expert takes the ``C`` tokens that score it highest, so each expert receives exactly ``C``
tokens (balanced by construction, nothing to drop) while a token may be taken by several
experts or by none (its MoE output is then zero; a residual connection carries it).

* scores: ``softmax`` over the experts (the paper) or ``sigmoid``; the combine weight of a route
  is the token's score for that expert (times ``routed_scaling_factor``), not renormalised;
* capacity: ``C = max(ceil(S / E * capacity_factor * k), min_capacity)`` (DeepSpeed's formula,
  so ``capacity_factor * k`` is the paper's average number of experts per token), at most the
  number of unmasked tokens;
* masked tokens (``used_token``) are never picked;
* ``l_aux`` is 0 (there is no imbalance to penalise); the z-loss applies as usual.

The result is an ordinary :class:`~moesaic.layer.routing.Routing` in expert order with ``slot_N``
the rank of the token inside its expert's pick and ``capacity = C``, so the local and all-to-all
dispatchers (capacity mode) move it unchanged. Under expert parallelism each rank's experts pick
from that rank's tokens (as a 1-process run on that rank's batch would). Note that an expert's
pick looks at every token of the batch, the later positions of a sequence included: a causal
language model leaks information through it at training time, as the paper says.

Shape legend: S = tokens, E = experts, C = tokens per expert, N = routes (E * C).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import MoEConfig
from .losses import router_z_loss
from .routing import Routing, normalised_scores, score_tokens



def expert_choice_routing(logits_SE: Tensor, config: MoEConfig, *, training: bool,
                          used_token_S: Optional[Tensor] = None) -> Routing:
    """Every expert picks its ``C`` best tokens (see module docstring).

    Args:
        logits_SE: `(S, E)` fp32 router logits.
        config: the router options (``routing_type == "expert_choice"``).
        training: selects ``capacity_factor`` or ``eval_capacity_factor``.
        used_token_S: optional `(S,)` 0/1 mask of the tokens that may be picked.

    Returns:
        The routing record (``expert_ids_SK`` is None: a token has no fixed number of experts).
    """
    S, E = logits_SE.shape
    scores_SE = score_tokens(logits_SE, config.score_func)
    probs_SE = normalised_scores(scores_SE, config.score_func)
    capacity = config.capacity(S, training)
    pick_SE = scores_SE.detach()
    if used_token_S is None:
        num_valid = S
    else:
        valid_S = used_token_S.reshape(S) != 0
        num_valid = int(valid_S.sum())
        pick_SE = pick_SE.masked_fill(~valid_S[:, None], float("-inf"))
    C = min(capacity, num_valid)
    # each expert's C best tokens, best first: the rank inside the pick is the slot
    token_EC = pick_SE.t().topk(C, dim=1).indices if C else pick_SE.new_zeros(E, 0, dtype=torch.int64)
    token_idx_N = token_EC.reshape(-1)
    expert_idx_N = torch.arange(E, device=logits_SE.device).repeat_interleave(C)
    slot_N = torch.arange(C, device=logits_SE.device).repeat(E)
    weight_N = scores_SE[token_idx_N, expert_idx_N]
    if config.routed_scaling_factor != 1.0:
        weight_N = weight_N * config.routed_scaling_factor
    tokens_per_expert_E = torch.full((E,), C, dtype=torch.int64, device=logits_SE.device)
    return Routing(probs_SE=probs_SE, expert_ids_SK=None, token_idx_N=token_idx_N, expert_idx_N=expert_idx_N,
                   slot_N=slot_N, weight_N=weight_N, tokens_per_expert_E=tokens_per_expert_E,
                   exp_counts_E=tokens_per_expert_E.clone(), capacity=capacity, num_routes=E * C,
                   l_aux=logits_SE.new_zeros(()), z_loss=router_z_loss(logits_SE, config.z_loss_coef), config=config,
                   seq_aux_loss=logits_SE.new_zeros(()), num_tokens=S, num_valid_tokens=num_valid)
