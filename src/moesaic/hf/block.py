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
  gradient checkpointing save the same tensors;
* pads that never reach an expert: the model's forward sets each block's ``token_mask`` (a
  `(batch, seq)` 0/1 mask of the real tokens, from the ``token_mask=`` argument or else a 2-D
  ``attention_mask``; :func:`install_token_mask`), and the block routes with it as DeepSpeed's
  ``used_token``: masked tokens use no expert, are not counted in the expert-load statistics, and
  are left out of the layer's own balance losses. The mask stays set until the next forward, so a
  recompute in backward routes exactly as its forward did.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import List, Optional

import torch
from torch import Tensor, nn

from ..layer import recompute
from ..layer.config import MoEConfig
from ..layer.moe import MixtureOfExperts


_OWN_COLLECTOR: contextvars.ContextVar[Optional[List[Tensor]]] = contextvars.ContextVar("moesaic_router_logits",
                                                                                         default=None)


@contextlib.contextmanager
def collect_router_logits():
    """Collect every block's router logits `(tokens, E)` during the forwards run inside, in layer order.

    For losses computed outside ``transformers``' ``ForCausalLM`` (whose own collection needs
    ``output_router_logits=True`` and a 2-D ``attention_mask``). Yields the list being filled.
    """
    collected: List[Tensor] = []
    token = _OWN_COLLECTOR.set(collected)
    try:
        yield collected
    finally:
        _OWN_COLLECTOR.reset(token)


def _router_logits_list():
    """The list router logits are collected into for the running forward (ours or ``transformers``'), or None."""
    own = _OWN_COLLECTOR.get()
    if own is not None:
        return own
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - a transformers without output capturing
        return None
    collected = _active_collector.get()
    if collected is None or "router_logits" not in collected:
        return None
    return collected["router_logits"]


class HFMoEBlock(MixtureOfExperts):
    """A ``moesaic.MoE`` in place of a ``transformers`` sparse MoE block (see module docstring).

    Args:
        hidden_size, **moe_options: :class:`moesaic.MoE`'s arguments.
        returns_router_scores: return ``(output, None)`` (GPT-OSS's decoder layer unpacks two values).
        jitter_noise: Mixtral's ``router_jitter_noise`` (training only).
        logits_fp32: ``transformers``' router computes its logits in fp32 (DeepSeek-V3) rather than
            in the hidden states' dtype.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, *, ep_size: int = 1, expert_group_name: str = "moe",
                 shared_expert: Optional[nn.Module] = None, returns_router_scores: bool = False,
                 jitter_noise: float = 0.0, logits_fp32: bool = False, **options) -> None:
        config = MoEConfig.from_options(options, who="HFMoEBlock", has_shared_expert=shared_expert is not None)
        super().__init__(hidden_size, expert, config, ep_size=ep_size,
                         expert_group_name=expert_group_name, shared_expert=shared_expert)
        self.returns_router_scores = bool(returns_router_scores)
        self.jitter_noise = float(jitter_noise or 0.0)
        self.logits_fp32 = bool(logits_fp32)

    def forward(self, hidden_states: Tensor):  # type: ignore[override]
        """The block's output for `(batch, seq, D)` hidden states (``(output, None)`` for GPT-OSS)."""
        # one recompute call around the jitter too, so a recompute draws the same noise (layer/recompute.py)
        call, token = recompute.begin(self, hidden_states.device)
        try:
            x = hidden_states
            if self.training and self.jitter_noise > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            collect = _router_logits_list()  # None in a recompute: transformers collects in forward only
            captured: list = []
            self._logits_out = captured if collect is not None else None
            try:
                out, _, _ = super().forward(x, self._used_token(x))
            finally:
                self._logits_out = None
            if collect is not None:  # the router's own logits: no second matmul, no extra saved tensor
                logits = captured[0]
                collect.append(logits if self.logits_fp32 else logits.to(x.dtype))
        finally:
            recompute.end(call, token, hidden_states.device)
        return (out, None) if self.returns_router_scores else out

    token_mask: Optional[Tensor] = None  # set by the model's forward (install_token_mask)

    def _used_token(self, x: Tensor) -> Optional[Tensor]:
        """The `(batch, seq)` mask of this forward's real tokens, or None (every token is real)."""
        mask = self.token_mask
        if mask is None or x.dim() != 3:
            return None
        if mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            raise ValueError(f"token mask of shape {tuple(mask.shape)} does not cover the hidden states "
                             f"{tuple(x.shape[:2])} of {self.expert_group_name!r}")
        # generate() with a cache: the mask covers past and new tokens, the block sees the new ones
        return mask[:, mask.shape[1] - x.shape[1]:]

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", jitter_noise={self.jitter_noise}" if self.jitter_noise else "")


def _set_token_mask(model: nn.Module, args, kwargs):
    mask = kwargs.pop("token_mask", None)
    if mask is None:
        attention = kwargs.get("attention_mask")
        if isinstance(attention, Tensor) and attention.dim() == 2:
            mask = attention
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            raise ValueError(f"token_mask must be a (batch, seq) tensor of 0/1, got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        mask = mask != 0
        if bool(mask.all()):
            mask = None  # no pad: route every token (the same numbers, less work)
    for block in model.modules():
        if isinstance(block, HFMoEBlock):
            block.token_mask = mask
    return args, kwargs


def install_token_mask(model: nn.Module) -> None:
    """Make ``model(...)`` route only its real tokens (see module docstring); once per model, idempotent.

    ``model(input_ids, token_mask=m)`` takes the mask explicitly (packed rows pass their
    position_ids and no ``attention_mask``); otherwise a 2-D ``attention_mask`` is the mask.
    """
    if getattr(model, "_moesaic_token_mask_hook", None) is None:
        model._moesaic_token_mask_hook = model.register_forward_pre_hook(_set_token_mask, with_kwargs=True)
