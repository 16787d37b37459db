"""Router losses as pure functions: DeepSpeed's load-balancing ``l_aux`` and the ST-MoE z-loss.

``l_aux`` keeps DeepSpeed 0.19.8's three definitions (``top1gating``, ``top2gating``,
``topkgating`` in ``deepspeed/moe/sharded_moe.py``), with ``me_E`` the mean router probability
of each expert over all S tokens and ``ce_E`` a fraction of tokens:

* k=1: ``E * sum_e me_e * ce_e``, ``ce_e`` = share of tokens whose choice is e;
* k=2: ``E^2 * mean_e me_e * ce_e``, ``ce_e`` from the first choices only;
* k>2: ``E^2 / k * mean_e me_e * ce_e``, ``ce_e`` = routes chosen for e / S.

Counts are taken before the capacity limit drops anything; masked tokens (``used_token``) count
in S but choose no expert.

:func:`sequence_balance_loss` is DeepSeek-V3's complementary sequence-wise balance loss, taken per
sequence and averaged over the sequences (see its docstring).

Shape legend: S = tokens, E = experts, K = top-k, B = sequences, T = tokens per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .recompute import saved_plainly


@saved_plainly
def load_balancing_loss(probs_SE: Tensor, expert_ids_SK: Tensor, exp_counts_E: Tensor, k: int) -> Tensor:
    """DeepSpeed's auxiliary load-balancing loss (fp32 scalar).

    Args:
        probs_SE: `(S, E)` router probabilities.
        expert_ids_SK: `(S, K)` chosen experts in choice order (``E`` for a masked token).
        exp_counts_E: `(E,)` routes chosen per expert (all K choices, before capacity).
        k: experts per token.

    No tokens (an empty batch) give an exact 0 that still reaches the router in backward, where
    the means over tokens would be NaN.
    """
    S, E = probs_SE.shape
    if S == 0:
        return probs_SE.sum() * 0.0
    me_E = torch.mean(probs_SE, dim=0)
    if k <= 2:
        # the first choices only, as DeepSpeed's top-1 and top-2 gates count their mask1
        ce_E = torch.bincount(expert_ids_SK[:, 0], minlength=E + 1)[:E].float() / S
        if k == 1:
            return torch.sum(me_E * ce_E) * E
        return torch.mean(me_E * ce_E) * E * E
    ce_E = exp_counts_E.float() / S
    return torch.mean(me_E * ce_E) * E * E / k


@saved_plainly
def router_z_loss(logits_SE: Tensor, coef: float) -> Tensor:
    """``coef * mean_s logsumexp(logits_s)^2`` (ST-MoE); an exact 0 when ``coef`` is 0."""
    if not coef:
        return logits_SE.new_zeros(())
    if logits_SE.shape[0] == 0:
        return logits_SE.sum() * 0.0  # no tokens: 0, not the NaN of an empty mean
    return coef * torch.mean(torch.logsumexp(logits_SE, dim=1) ** 2)


@saved_plainly
def sequence_balance_loss(probs_SE: Tensor, expert_ids_SK: Tensor, num_sequences: int, coef: float,
                          valid_S: Optional[Tensor] = None) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss: ``coef * mean_b sum_e f_be * P_be``.

    For each sequence b of T tokens, ``f_be = E / (K * T) * (tokens of b that chose e)`` and
    ``P_be = (1 / T) * sum_t p_te``, with ``p`` the router distribution (softmax, or sigmoid
    scores normalised over the experts). A perfectly balanced sequence scores 1 (times ``coef``).
    The gradient flows through ``P`` only. Masked tokens (``valid_S`` false) are left out of
    their sequence's T, and a sequence with no valid token is left out of the mean.

    Args:
        probs_SE: `(S, E)` router distribution, tokens sequence-major (S = B * T).
        expert_ids_SK: `(S, K)` chosen experts (``E`` for a masked token).
        num_sequences: B; must divide S.
        coef: the loss coefficient; 0 returns an exact 0 without computing.
        valid_S: optional `(S,)` bool mask of the tokens that route.

    Returns:
        fp32 scalar.
    """
    if not coef:
        return probs_SE.new_zeros(())
    S, E = probs_SE.shape
    K = expert_ids_SK.shape[1]
    B = num_sequences
    if B < 1 or S % B:
        raise ValueError(f"num_sequences must divide the {S} tokens, got {num_sequences}")
    T = S // B
    # tokens of each sequence that chose each expert (a masked token's id E lands in a dropped column)
    counts_BE = torch.zeros(B, E + 1, dtype=probs_SE.dtype, device=probs_SE.device)
    counts_BE.scatter_add_(1, expert_ids_SK.reshape(B, T * K), torch.ones_like(counts_BE[:, :1]).expand(B, T * K))
    counts_BE = counts_BE[:, :E]
    probs_BTE = probs_SE.view(B, T, E)
    if valid_S is None:
        tokens_B = probs_SE.new_full((B,), float(T))
        sum_probs_BE = probs_BTE.sum(dim=1)
    else:
        valid_BT1 = valid_S.reshape(B, T, 1).to(probs_SE.dtype)
        tokens_B = valid_BT1.sum(dim=(1, 2))
        sum_probs_BE = (probs_BTE * valid_BT1).sum(dim=1)
    t_B = tokens_B.clamp(min=1.0)[:, None]
    f_BE = counts_BE * (E / K) / t_B
    per_sequence_B = (f_BE * (sum_probs_BE / t_B)).sum(dim=1)
    if valid_S is None:
        return coef * per_sequence_B.mean()
    has_tokens_B = tokens_B > 0
    return coef * per_sequence_B[has_tokens_B].sum() / has_tokens_B.sum().clamp(min=1)
