"""Router: scores every token, picks its experts, applies capacity, and says where each route goes.

The result is a :class:`Routing` that names each kept (token, expert) route by index, already in
expert order, so the dispatcher can gather tokens with one ``index_select`` and the combine can
scatter-add them back. No ``[tokens, experts, capacity]`` tensor is built anywhere.

The numbers follow DeepSpeed 0.19.8's ``top1gating`` / ``top2gating`` / ``topkgating``
(``deepspeed/moe/sharded_moe.py``): the same softmax in fp32, the same capacity formula
(computed with the same float32 arithmetic), the same ``l_aux`` expressions, the same
``exp_counts`` (counted before dropping) and the same choice of which routes survive the
capacity limit:

* k=1: random token selection (``use_rts``) or, without it, the first ``capacity`` tokens in
  token order (DeepSpeed keeps whichever ties ``torch.topk`` returns; we keep the earliest);
* k=2: position order with every first choice ahead of every second choice;
* k>2: the highest gate probabilities per expert (``drop_policy="probs"``, DeepSpeed's default)
  or token order (``drop_policy="position"``).

Shape legend: S = tokens, E = experts, K = top-k, N = kept routes, D = model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
DROP_POLICIES = (None, "position", "probs")


@dataclass(frozen=True)
class Routing:
    """Where each kept route goes, in expert order.

    Attributes:
        token_idx_N: `(N,)` int64 source token of each kept route, sorted by expert (stable).
        expert_idx_N: `(N,)` int64 global expert of each kept route (non-decreasing).
        slot_N: `(N,)` int64 position of the route inside its expert's block.
        weight_N: `(N,)` fp32 combine weight of each route (carries the router's gradient).
        tokens_per_expert_E: `(E,)` int64 routes kept per expert (after capacity).
        exp_counts_E: `(E,)` int64 routes chosen per expert before capacity (DeepSpeed's
            ``exp_counts``).
        l_aux: fp32 scalar load-balancing loss with DeepSpeed's definition.
        z_loss: fp32 scalar router z-loss times its coefficient (0 when disabled).
        capacity: slots per expert, or None when dropless.
        num_routes: routes that asked for an expert (valid tokens x k).
    """

    token_idx_N: Tensor
    expert_idx_N: Tensor
    slot_N: Tensor
    weight_N: Tensor
    tokens_per_expert_E: Tensor
    exp_counts_E: Tensor
    l_aux: Tensor
    z_loss: Tensor
    capacity: Optional[int]
    num_routes: int

    @property
    def num_dropped(self) -> int:
        """Routes removed by the capacity limit."""
        return self.num_routes - int(self.token_idx_N.numel())


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """Slots per expert: ``max(ceil(S / E * capacity_factor * k), min_capacity)``.

    Evaluated exactly as DeepSpeed does, with ``capacity_factor * k`` held in a float32 tensor,
    so that the rounding (and therefore the capacity) agrees to the last slot.
    """
    factor = torch.tensor(capacity_factor * k)  # float32, as in DeepSpeed's _capacity
    capacity = int(torch.ceil((num_tokens / num_experts) * factor).item())
    return max(capacity, int(min_capacity))


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


def _select_experts(gates_SE: Tensor, logits_SE: Tensor, k: int, rsample: bool,
                    second_expert_sampling: bool) -> Tensor:
    """Pick k experts per token; returns expert ids `(S, K)` in choice order."""
    if rsample:
        # RSample: choose by noisy logits, weight by the clean probabilities (as DeepSpeed top-1)
        noisy_SE = logits_SE.detach() + gumbel_noise(logits_SE.shape, logits_SE.device)
        if k == 1:
            return noisy_SE.argmax(dim=1, keepdim=True)
        return noisy_SE.topk(k, dim=1).indices
    if k == 1:
        return gates_SE.argmax(dim=1, keepdim=True)
    if k == 2:
        first_S = gates_SE.argmax(dim=1)
        scores_SE = logits_SE.detach()
        if second_expert_sampling:
            # Gumbel-max trick: the 2nd expert is sampled from softmax(logits) minus the 1st
            scores_SE = scores_SE + gumbel_noise(scores_SE.shape, scores_SE.device)
        scores_SE = scores_SE.scatter(1, first_S[:, None], float("-inf"))
        second_S = scores_SE.argmax(dim=1)
        return torch.stack([first_S, second_S], dim=1)
    return gates_SE.topk(k, dim=1).indices


def compute_routing(logits_SE: Tensor, *, k: int, capacity: Optional[int], drop_policy: str,
                    use_rts: bool, used_token_S: Optional[Tensor] = None, rsample: bool = False,
                    second_expert_sampling: bool = False, z_loss_coef: float = 0.0) -> Routing:
    """Turn fp32 router logits into a :class:`Routing`.

    Args:
        logits_SE: `(S, E)` fp32 router logits.
        k: experts per token.
        capacity: slots per expert, or None for dropless routing.
        drop_policy: "position" or "probs": which routes survive an over-full expert.
        use_rts: random token selection (k=1 only, as DeepSpeed) instead of the policy.
        used_token_S: `(S,)` 0/1 mask; masked tokens route nowhere and output zero.
        rsample: choose experts by Gumbel-perturbed logits.
        second_expert_sampling: sample the 2nd expert (k=2) with the Gumbel-max trick.
        z_loss_coef: coefficient of the ST-MoE router z-loss.

    Returns:
        The routing, its l_aux and z-loss.
    """
    # 1. probabilities and choices  2. counts and l_aux  3. order routes by expert, then by
    # priority  4. apply capacity  5. combine weights
    S, E = logits_SE.shape
    gates_SE = F.softmax(logits_SE, dim=1)
    expert_SK = _select_experts(gates_SE, logits_SE, k, rsample, second_expert_sampling)

    # 2. counts before dropping, and the load-balancing loss (DeepSpeed's formulas verbatim)
    if used_token_S is not None:
        valid_S = used_token_S.reshape(S) != 0
        expert_SK = torch.where(valid_S[:, None], expert_SK, torch.full_like(expert_SK, E))
    exp_counts_E = torch.bincount(expert_SK.reshape(-1), minlength=E + 1)[:E]
    me_E = torch.mean(gates_SE, dim=0)
    if k <= 2:
        ce_E = torch.bincount(expert_SK[:, 0], minlength=E + 1)[:E].float() / S
        if k == 1:
            l_aux = torch.sum(me_E * ce_E) * E
        else:
            l_aux = torch.mean(me_E * ce_E) * E * E
    else:
        ce_E = exp_counts_E.float() / S
        l_aux = torch.mean(me_E * ce_E) * E * E / k
    if z_loss_coef:
        z_loss = z_loss_coef * torch.mean(torch.logsumexp(logits_SE, dim=1) ** 2)
    else:
        z_loss = logits_SE.new_zeros(())

    # 3. a flat route r = t * K + j; order0 lists routes in priority order (best first)
    flat_expert_R = expert_SK.reshape(-1)
    R = flat_expert_R.numel()
    if capacity is None or (k == 1 and not use_rts and drop_policy == "position"):
        order0_R = None  # token order is already the priority order
    elif k == 1 and use_rts:
        order0_R = torch.rand(R, device=logits_SE.device).argsort(descending=True)
    elif drop_policy == "probs":
        route_gates_R = gates_SE.detach().gather(1, expert_SK.clamp(max=E - 1)).reshape(-1)
        order0_R = route_gates_R.argsort(descending=True, stable=True)
    elif k == 2:
        # DeepSpeed's top-2 places every first choice ahead of every second choice
        order0_R = torch.arange(R, device=logits_SE.device).view(S, k).t().reshape(-1)
    else:
        order0_R = None
    if order0_R is None:
        by_expert = torch.sort(flat_expert_R, stable=True)
        route_R = by_expert.indices
        sorted_expert_R = by_expert.values
    else:
        by_expert = torch.sort(flat_expert_R[order0_R], stable=True)
        route_R = order0_R[by_expert.indices]
        sorted_expert_R = by_expert.values

    # 4. position of every route inside its expert's block; keep the first `capacity`
    starts_E = torch.cumsum(exp_counts_E, 0) - exp_counts_E
    num_valid = int(exp_counts_E.sum())
    route_R = route_R[:num_valid]  # masked tokens (expert id E) sort last
    sorted_expert_R = sorted_expert_R[:num_valid]
    slot_R = torch.arange(num_valid, device=logits_SE.device) - starts_E[sorted_expert_R]
    if capacity is not None and num_valid and int(exp_counts_E.max()) > capacity:
        keep_R = slot_R < capacity
        route_N, expert_N, slot_N = route_R[keep_R], sorted_expert_R[keep_R], slot_R[keep_R]
        tokens_per_expert_E = exp_counts_E.clamp(max=capacity)
    else:
        route_N, expert_N, slot_N = route_R, sorted_expert_R, slot_R
        tokens_per_expert_E = exp_counts_E.clone()
    token_N = torch.div(route_N, k, rounding_mode="floor")

    # 5. combine weights: the raw probability for k=1; renormalised over kept routes for k>=2
    weight_N = gates_SE[token_N, expert_N]
    if k > 1:
        denom_S = torch.zeros(S, dtype=gates_SE.dtype, device=gates_SE.device).index_add(0, token_N, weight_N)
        denom_S = torch.clamp(denom_S, min=torch.finfo(gates_SE.dtype).eps)
        weight_N = weight_N / denom_S[token_N]
    return Routing(token_idx_N=token_N, expert_idx_N=expert_N, slot_N=slot_N, weight_N=weight_N,
                   tokens_per_expert_E=tokens_per_expert_E, exp_counts_E=exp_counts_E, l_aux=l_aux,
                   z_loss=z_loss, capacity=capacity, num_routes=num_valid)


class TopKGate(nn.Module):
    """The router of an MoE layer: ``wg`` scores tokens in fp32; ``forward`` returns a Routing.

    Args:
        model_dim: size of each token vector.
        num_experts: experts the router chooses among (global count).
        k: experts per token.
        capacity_factor / eval_capacity_factor: capacity multiplier in train / eval mode.
        min_capacity: lower bound on slots per expert.
        noisy_gate_policy: None, "None", "Jitter" (multiplicative input noise) or "RSample"
            (Gumbel-perturbed choice); both act in training only.
        drop_tokens: False routes every token (dropless).
        use_rts: random token selection for k=1 when an expert overflows.
        top2_2nd_expert_sampling: sample the 2nd expert (k=2) in training.
        drop_policy: None (DeepSpeed's default for k: position for k<=2, probs for k>2),
            "position" or "probs".
        z_loss_coef: coefficient of the router z-loss (0 disables it).
    """

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True, use_rts: bool = True,
                 top2_2nd_expert_sampling: bool = True, drop_policy: Optional[str] = None,
                 z_loss_coef: float = 0.0) -> None:
        super().__init__()
        validate_gate_args(model_dim=model_dim, num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                           eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                           noisy_gate_policy=noisy_gate_policy, drop_policy=drop_policy, z_loss_coef=z_loss_coef)
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.model_dim = model_dim
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = float(capacity_factor)
        self.eval_capacity_factor = float(eval_capacity_factor)
        self.min_capacity = int(min_capacity)
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens = bool(drop_tokens)
        self.use_rts = bool(use_rts)
        self.top2_2nd_expert_sampling = bool(top2_2nd_expert_sampling)
        self.drop_policy = drop_policy if drop_policy is not None else ("position" if k <= 2 else "probs")
        self.z_loss_coef = float(z_loss_coef)

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert for ``num_tokens`` tokens in the current mode (None when dropless)."""
        if not self.drop_tokens:
            return None
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, factor, self.k, self.min_capacity)

    def logits(self, x_SD: Tensor) -> Tensor:
        """Router logits in fp32 (jittered in training under the "Jitter" policy)."""
        x_fp32 = x_SD.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x_fp32 = multiplicative_jitter(x_fp32)
        return F.linear(x_fp32, self.wg.weight.float())

    def forward(self, x_SD: Tensor, used_token: Optional[Tensor] = None) -> Routing:
        """Route the tokens of ``x_SD`` (`(S, D)`)."""
        logits_SE = self.logits(x_SD)
        return compute_routing(
            logits_SE, k=self.k, capacity=self.capacity(x_SD.shape[0]), drop_policy=self.drop_policy,
            use_rts=self.use_rts and self.k == 1 and self.training, used_token_S=used_token,
            rsample=self.noisy_gate_policy == "RSample" and self.training,
            second_expert_sampling=self.top2_2nd_expert_sampling and self.training,
            z_loss_coef=self.z_loss_coef)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def _check_positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value}")


def validate_gate_args(*, model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                       noisy_gate_policy, drop_policy, z_loss_coef) -> None:
    """Raise a ValueError/TypeError naming the first bad router argument."""
    _check_int("hidden_size", model_dim, 1)
    _check_int("num_experts", num_experts, 1)
    _check_int("k", k, 1)
    if k > num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got k={k}")
    _check_positive_float("capacity_factor", capacity_factor)
    _check_positive_float("eval_capacity_factor", eval_capacity_factor)
    _check_int("min_capacity", min_capacity, 0)
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(f"Unknown noisy_gate_policy {noisy_gate_policy!r}; choose one of {list(NOISY_GATE_POLICIES)}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"Unknown drop_policy {drop_policy!r}; choose one of {list(DROP_POLICIES)}")
    if isinstance(z_loss_coef, bool) or not isinstance(z_loss_coef, (int, float)):
        raise TypeError(f"z_loss_coef must be a number, got {type(z_loss_coef).__name__} {z_loss_coef!r}")
    if not math.isfinite(z_loss_coef) or z_loss_coef < 0:
        raise ValueError(f"z_loss_coef must be a finite number >= 0, got z_loss_coef={z_loss_coef}")
