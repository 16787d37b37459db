"""Where an MoE layer's router and experts sit in its ``state_dict``, and the upgrade of other spellings.

Two layouts of the same tensors exist, relative to the layer's own prefix:

* moesaic's core layer (:class:`~moesaic.layer.moe.MixtureOfExperts`, :data:`CORE_LAYOUT`):
  ``gate.*`` (``gate.wg.weight``, ``gate.expert_bias``), ``experts.local_experts.<i>.*`` for
  per-module experts, ``experts.<projection>.*`` for stacked ones. moesaic's layer used these
  names before it took DeepSpeed's, so its oldest checkpoints have them too;
* DeepSpeed 0.19.8's nesting (:data:`NESTED_LAYOUT`): ``deepspeed_moe.gate.*``,
  ``deepspeed_moe.experts.deepspeed_experts.<i>.*``, ``deepspeed_moe.experts.<projection>.*``.
  ``moesaic.MoE`` (the DeepSpeed bridge) has it, and moesaic's core layer had it until issue 23
  (commit 45dc1af), so state dicts, checkpoints and ``moesaic train`` runs of that time use it.

:func:`respell_key` is the one upgrade: a key written under either layout, read by a layer of the
other. The layers' load hook (:func:`upgrade_layer_keys`) and the checkpoint store's dense-name
upgrade (:func:`moesaic.checkpoint.legacy.upgrade_dense_names`) both call it. Everything after the
prefix (``"...weight::exp_avg"`` too) is kept, so a tensor reads back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, MutableMapping

from torch import nn

from .identity import iter_moe_modules


@dataclass(frozen=True)
class KeyLayout:
    """The key prefixes of an MoE layer's parts, relative to the layer (each ends with ``"."``).

    Attributes:
        gate: the router (``wg.weight``, ``expert_bias`` follow).
        experts: the experts' container (a stacked container's tensors follow).
        expert_list: per-module experts (``<i>.<name inside the expert>`` follows).
    """

    gate: str
    experts: str
    expert_list: str


CORE_LAYOUT = KeyLayout("gate.", "experts.", "experts.local_experts.")
NESTED_LAYOUT = KeyLayout("deepspeed_moe.gate.", "deepspeed_moe.experts.", "deepspeed_moe.experts.deepspeed_experts.")
LAYOUTS = (CORE_LAYOUT, NESTED_LAYOUT)


def respell_key(key: str, to: KeyLayout) -> str:
    """``key`` (relative to an MoE layer) spelled in layout ``to``; a key of ``to`` or of no part unchanged.

    ``respell_key("deepspeed_moe.experts.deepspeed_experts.3.0.weight", CORE_LAYOUT)`` is
    ``"experts.local_experts.3.0.weight"``; ``respell_key("gate.wg.weight", NESTED_LAYOUT)`` is
    ``"deepspeed_moe.gate.wg.weight"``; ``"mlp.0.weight"`` (a residual MoE's MLP) stays.
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not isinstance(to, KeyLayout):
        raise TypeError(f"to must be a KeyLayout, got {type(to).__name__}")
    for layout in LAYOUTS:
        if layout == to:
            continue
        # the expert list first: it lies inside the experts' prefix
        for old, new in ((layout.expert_list, to.expert_list), (layout.experts, to.experts), (layout.gate, to.gate)):
            if key.startswith(old):
                return new + key[len(old):]
    return key


def upgrade_layer_keys(state: MutableMapping[str, object], prefix: str, to: KeyLayout) -> None:
    """Rename, in place, the keys of the MoE layer at ``prefix`` written under another layout than ``to``.

    The load hook of :class:`~moesaic.layer.moe.MixtureOfExperts` (so ``load_state_dict`` takes a
    state dict of either layout). Keys outside ``prefix`` are left alone.
    """
    for key in [k for k in state if k.startswith(prefix)]:
        new = prefix + respell_key(key[len(prefix):], to)
        if new != key:
            state[new] = state.pop(key)


def upgrade_legacy_keys(state: Dict[str, object], model: nn.Module) -> Dict[str, object]:
    """``state`` with the keys of ``model``'s MoE layers spelled as each layer spells them.

    A key under an MoE layer's path written in the other layout is renamed (``"ffn.gate.wg.weight"``
    -> ``"ffn.deepspeed_moe.gate.wg.weight"`` for a ``moesaic.MoE``, the reverse for the core
    layer); every other key passes unchanged. Returns a new dict.
    """
    out = dict(state)
    for path, layer in iter_moe_modules(model):
        upgrade_layer_keys(out, f"{path}." if path else "", layer.KEY_LAYOUT)
    return out
