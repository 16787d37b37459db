"""``HFMoEBlock``: a ``moesaic.MoE`` that answers a ``transformers`` decoder layer as its sparse block did.

A decoder layer calls ``self.mlp(hidden_states)`` and expects the block's output tensor (GPT-OSS's
layer unpacks ``(output, router_scores)``). The block subclasses :class:`moesaic.MoE`, so the
engine, identity, checkpoints and telemetry see an ordinary MoE layer, and adds what the
``transformers`` model asks of its block:

* the return convention of the family;
* Mixtral's multiplicative input jitter in training (``router_jitter_noise``; 0 in every released
  config);
* router logits for ``output_router_logits=True``: ``transformers`` collects them with forward
  hooks on its router class, which no longer exists in the converted model, so the block hands
  its router's logits (in the dtype ``transformers``' router returns) to the same collector. The
  model's ``aux_loss`` is then ``transformers``' own formula over moesaic's routers. They are the
  logits the router routed with (no second matmul), so a forward and its recompute under
  gradient checkpointing save the same tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layer import recompute
from ..layer.moe import MoE


def _router_logits_list():
    """The list ``transformers`` is collecting router logits into for the running forward, or None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - a transformers without output capturing
        return None
    collected = _active_collector.get()
    if collected is None or "router_logits" not in collected:
        return None
    return collected["router_logits"]


class HFMoEBlock(MoE):
    """A ``moesaic.MoE`` in place of a ``transformers`` sparse MoE block (see module docstring).

    Args:
        hidden_size, **moe_options: :class:`moesaic.MoE`'s arguments.
        returns_router_scores: return ``(output, None)`` (GPT-OSS's decoder layer unpacks two values).
        jitter_noise: Mixtral's ``router_jitter_noise`` (training only).
        logits_fp32: ``transformers``' router computes its logits in fp32 (DeepSeek-V3) rather than
            in the hidden states' dtype.
    """

    def __init__(self, hidden_size: int, *, returns_router_scores: bool = False, jitter_noise: float = 0.0,
                 logits_fp32: bool = False, **moe_options) -> None:
        super().__init__(hidden_size, **moe_options)
        self.returns_router_scores = bool(returns_router_scores)
        self.jitter_noise = float(jitter_noise or 0.0)
        self.logits_fp32 = bool(logits_fp32)

    def forward(self, hidden_states: Tensor):  # type: ignore[override]
        """The block's output for `(batch, seq, D)` hidden states (``(output, None)`` for GPT-OSS)."""
        # one recompute call around the jitter too, so a recompute draws the same noise (layer/recompute.py)
        layer = self.deepspeed_moe
        call, token = recompute.begin(layer, hidden_states.device)
        try:
            x = hidden_states
            if self.training and self.jitter_noise > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            collect = _router_logits_list()  # None in a recompute: transformers collects in forward only
            captured: list = []
            layer._logits_out = captured if collect is not None else None
            try:
                out, _, _ = super().forward(x)
            finally:
                layer._logits_out = None
            if collect is not None:  # the router's own logits: no second matmul, no extra saved tensor
                logits = captured[0]
                collect.append(logits if self.logits_fp32 else logits.to(x.dtype))
        finally:
            recompute.end(call, token, hidden_states.device)
        return (out, None) if self.returns_router_scores else out

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", jitter_noise={self.jitter_noise}" if self.jitter_noise else "")
