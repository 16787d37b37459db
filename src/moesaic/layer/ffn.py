"""Built-in expert modules of the standard shapes: a two-layer FFN and a gated FFN (GLU).

Any ``nn.Module`` mapping `(T, D)` to `(T, D)` can be an expert; these are the shapes today's
models use, named as Hugging Face names them (so a converter maps weights by name) and understood
by :class:`~moesaic.layer.stacked.StackedExperts`, which stores many of them as stacked tensors:

* :class:`FFNExpert`: ``fc2(act(fc1(x)))`` (GPT-2, Switch, DeepSpeed's examples);
* :class:`GLUExpert`: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU: Mixtral, Qwen-MoE,
  OLMoE, DeepSeek-V3), and with ``swiglu_limit`` GPT-OSS's clamped variant with biases:
  ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``,
  ``down_proj((u + 1) * g * sigmoid(alpha * g))``.

The activation is named, not passed as a module, so that the stacked container computes exactly
the same function (:func:`activation_fn`, :func:`glu`).

Shape legend: T = tokens, D = model dim, F = expert hidden.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, check_number

ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise activation called ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def glu(gate: Tensor, up: Tensor, activation: str, swiglu_limit: Optional[float], swiglu_alpha: float) -> Tensor:
    """The gated unit: ``act(gate) * up``, or GPT-OSS's clamped SwiGLU when ``swiglu_limit`` is set."""
    if swiglu_limit is None:
        return activation_fn(activation)(gate) * up
    gate = gate.clamp(max=swiglu_limit)
    up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
    return (up + 1) * (gate * torch.sigmoid(gate * swiglu_alpha))


class FFNExpert(nn.Module):
    """A two-layer feed-forward expert: ``fc2(act(fc1(x)))``.

    Args:
        hidden_size: D.
        ffn_hidden_size: F.
        activation: one of ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"``.
        bias: whether both layers have a bias.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        check_int(hidden_size, "hidden_size", 1)
        check_int(ffn_hidden_size, "ffn_hidden_size", 1)
        activation_fn(activation)
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(activation_fn(self.activation)(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class GLUExpert(nn.Module):
    """A gated feed-forward expert: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU with "silu").

    Args:
        hidden_size: D.
        ffn_hidden_size: F.
        activation: the gate's activation, one of ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"``.
        bias: whether the three projections have biases (GPT-OSS: yes; the others: no).
        swiglu_limit: GPT-OSS's clamp (``7.0`` there); None for the plain gated unit. Needs
            ``activation="silu"`` (the clamped form's gate is ``g * sigmoid(alpha * g)``).
        swiglu_alpha: GPT-OSS's ``alpha`` (1.702), used with ``swiglu_limit`` only.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "silu", bias: bool = False, *,
                 swiglu_limit: Optional[float] = None, swiglu_alpha: float = 1.702) -> None:
        super().__init__()
        check_int(hidden_size, "hidden_size", 1)
        check_int(ffn_hidden_size, "ffn_hidden_size", 1)
        activation_fn(activation)
        swiglu_limit = check_number(swiglu_limit, "swiglu_limit", 0.0, lo_open=True, allow_none=True)
        swiglu_alpha = check_number(swiglu_alpha, "swiglu_alpha", 0.0, lo_open=True)
        if swiglu_limit is not None and activation != "silu":
            raise ValueError(f"swiglu_limit={swiglu_limit} is GPT-OSS's clamped SwiGLU and needs activation='silu', "
                             f"got activation={activation!r}")
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        self.activation = activation
        self.swiglu_limit = swiglu_limit
        self.swiglu_alpha = swiglu_alpha

    def forward(self, x: Tensor) -> Tensor:
        h = glu(self.gate_proj(x), self.up_proj(x), self.activation, self.swiglu_limit, self.swiglu_alpha)
        return self.down_proj(h)

    def extra_repr(self) -> str:
        clamp = f", swiglu_limit={self.swiglu_limit}, swiglu_alpha={self.swiglu_alpha}" if self.swiglu_limit else ""
        return f"activation={self.activation!r}{clamp}"
