"""Router losses as pure functions: DeepSpeed's load-balancing ``l_aux`` and the ST-MoE z-loss.

``l_aux`` keeps DeepSpeed 0.19.8's three definitions (``top1gating``, ``top2gating``,
``topkgating`` in ``deepspeed/moe/sharded_moe.py``), with ``me_E`` the mean router probability
of each expert over all S tokens and ``ce_E`` a fraction of tokens:

* k=1: ``E * sum_e me_e * ce_e``, ``ce_e`` = share of tokens whose choice is e;
* k=2: ``E^2 * mean_e me_e * ce_e``, ``ce_e`` from the first choices only;
* k>2: ``E^2 / k * mean_e me_e * ce_e``, ``ce_e`` = routes chosen for e / S.

Counts are taken before the capacity limit drops anything; masked tokens (``used_token``) count
in S but choose no expert.

Shape legend: S = tokens, E = experts, K = top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs_SE: Tensor, expert_ids_SK: Tensor, exp_counts_E: Tensor, k: int) -> Tensor:
    """DeepSpeed's auxiliary load-balancing loss (fp32 scalar).

    Args:
        probs_SE: `(S, E)` router probabilities.
        expert_ids_SK: `(S, K)` chosen experts in choice order (``E`` for a masked token).
        exp_counts_E: `(E,)` routes chosen per expert (all K choices, before capacity).
        k: experts per token.
    """
    S, E = probs_SE.shape
    me_E = torch.mean(probs_SE, dim=0)
    if k <= 2:
        # the first choices only, as DeepSpeed's top-1 and top-2 gates count their mask1
        ce_E = torch.bincount(expert_ids_SK[:, 0], minlength=E + 1)[:E].float() / S
        if k == 1:
            return torch.sum(me_E * ce_E) * E
        return torch.mean(me_E * ce_E) * E * E
    ce_E = exp_counts_E.float() / S
    return torch.mean(me_E * ce_E) * E * E / k


def router_z_loss(logits_SE: Tensor, coef: float) -> Tensor:
    """``coef * mean_s logsumexp(logits_s)^2`` (ST-MoE); an exact 0 when ``coef`` is 0."""
    if not coef:
        return logits_SE.new_zeros(())
    return coef * torch.mean(torch.logsumexp(logits_SE, dim=1) ** 2)
