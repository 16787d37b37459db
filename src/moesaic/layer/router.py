"""The router: ``RouterConfig`` (every routing option, validated once) and ``TopKGate`` (its weights).

``TopKGate`` scores tokens with ``wg`` in fp32 and hands the logits to :func:`compute_routing`,
which returns a frozen :class:`~moesaic.layer.routing.Routing` record. Everything a router option
changes happens here or in :mod:`moesaic.layer.routing`; dispatchers and ``parallel/`` only see the
record, and the expert-parallel agreement check fingerprints the whole :class:`RouterConfig`
(:func:`config_fingerprint`), so a new option needs no change there.

The numbers follow DeepSpeed 0.19.8's ``TopKGate`` (``deepspeed/moe/sharded_moe.py``): fp32
softmax, the capacity formula evaluated in float32, DeepSpeed's ``l_aux`` and ``exp_counts``.

Shape legend: S = tokens, E = experts, D = model dim.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, check_number
from .losses import load_balancing_loss, router_z_loss
from .routing import (Routing, combine_weights, count_routes, mask_unused_tokens, multiplicative_jitter,
                      place_routes, route_priority, select_experts)

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
DROP_POLICIES = (None, "position", "probs")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """Slots per expert: ``max(ceil(S / E * capacity_factor * k), min_capacity)``.

    Evaluated exactly as DeepSpeed does, with ``capacity_factor * k`` held in a float32 tensor,
    so that the rounding (and therefore the capacity) agrees to the last slot. This is host
    arithmetic on Python numbers, so the scalar lives on the CPU whatever the model's device.
    """
    factor = torch.tensor(capacity_factor * k, dtype=torch.float32, device="cpu")
    capacity = int(torch.ceil((num_tokens / num_experts) * factor).item())
    return max(capacity, int(min_capacity))


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
                    used_token_S: Optional[Tensor] = None) -> Routing:
    """Turn fp32 router logits into a :class:`Routing` (choices, capacity, slots, weights, losses).

    Args:
        logits_SE: `(S, E)` fp32 router logits.
        config: the router's options.
        training: training mode (capacity factor, and whether RTS / noise / sampling act).
        used_token_S: `(S,)` 0/1 mask; masked tokens route nowhere and output zero.

    Returns:
        The routing record.
    """
    # 1. probabilities and choices  2. counts before dropping and the losses  3. priority order,
    # capacity and slots  4. combine weights
    S, E = logits_SE.shape
    if E != config.num_experts:
        raise ValueError(f"logits_SE has {E} experts but config.num_experts={config.num_experts}")
    k = config.k
    capacity = config.capacity(S, training)
    probs_SE = F.softmax(logits_SE, dim=1)
    expert_ids_SK = select_experts(probs_SE, logits_SE, k,
                                   rsample=training and config.noisy_gate_policy == "RSample",
                                   second_expert_sampling=training and config.top2_2nd_expert_sampling)
    if used_token_S is not None:
        expert_ids_SK = mask_unused_tokens(expert_ids_SK, used_token_S, E)

    # 2. DeepSpeed counts (and balances) the routes chosen, before any are dropped
    exp_counts_E = count_routes(expert_ids_SK, E)
    l_aux = load_balancing_loss(probs_SE, expert_ids_SK, exp_counts_E, k)
    z_loss = router_z_loss(logits_SE, config.z_loss_coef)

    # 3. which routes survive an over-full expert, and where each kept route sits in its expert
    priority_R = route_priority(probs_SE, expert_ids_SK, capacity, config.drop_policy,
                                use_rts=config.use_rts and k == 1 and training)
    placed = place_routes(expert_ids_SK, exp_counts_E, capacity, priority_R)

    # 4. combine weights
    weight_N = combine_weights(probs_SE, placed.token_idx_N, placed.expert_idx_N, k)
    return Routing(probs_SE=probs_SE, expert_ids_SK=expert_ids_SK, token_idx_N=placed.token_idx_N,
                   expert_idx_N=placed.expert_idx_N, slot_N=placed.slot_N, weight_N=weight_N,
                   tokens_per_expert_E=placed.tokens_per_expert_E, exp_counts_E=exp_counts_E, capacity=capacity,
                   num_routes=placed.num_routes, l_aux=l_aux, z_loss=z_loss, config=config)


class TopKGate(nn.Module):
    """The router of an MoE layer (DeepSpeed's name): ``wg`` scores tokens, ``forward`` routes them.

    Args:
        model_dim: D, size of each token vector.
        num_experts ... z_loss_coef: the fields of :class:`RouterConfig`, same names and defaults.

    ``gate.config`` holds the options; DeepSpeed's attribute names (``gate.k``,
    ``gate.capacity_factor``, ...) read them. Build from a config with :meth:`from_config`.
    """

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True, use_rts: bool = True,
                 top2_2nd_expert_sampling: bool = True, drop_policy: Optional[str] = None,
                 z_loss_coef: float = 0.0) -> None:
        super().__init__()
        check_int(model_dim, "model_dim", 1)
        config = RouterConfig(num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                              eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                              noisy_gate_policy=noisy_gate_policy, drop_tokens=drop_tokens, use_rts=use_rts,
                              top2_2nd_expert_sampling=top2_2nd_expert_sampling, drop_policy=drop_policy,
                              z_loss_coef=z_loss_coef)
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
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
        if "wg" in self._modules and value.num_experts != self.wg.out_features:
            raise ValueError(f"config.num_experts ({value.num_experts}) must equal the router's "
                             f"{self.wg.out_features} outputs; build a new gate to change the expert count")
        self._config = value

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert for ``num_tokens`` tokens in the current mode (None when dropless)."""
        return self.config.capacity(num_tokens, self.training)

    def logits(self, x_SD: Tensor) -> Tensor:
        """Router logits in fp32 (jittered in training under the "Jitter" policy)."""
        x_fp32 = x_SD.float()
        if self.config.noisy_gate_policy == "Jitter" and self.training:
            x_fp32 = multiplicative_jitter(x_fp32)
        return F.linear(x_fp32, self.wg.weight.float())

    def forward(self, x_SD: Tensor, used_token: Optional[Tensor] = None) -> Routing:
        """Route the tokens of ``x_SD`` (`(S, D)`); ``used_token`` is an optional `(S,)` 0/1 mask."""
        return compute_routing(self.logits(x_SD), self.config, training=self.training, used_token_S=used_token)

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
