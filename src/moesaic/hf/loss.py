"""The training loss of a converted model: what ``transformers`` trains it with, plus moesaic's own layer losses.

``transformers``' ``ForCausalLM`` returns ``loss = cross_entropy + router_aux_loss_coef * aux_loss``
when it is given ``labels`` and ``output_router_logits=True``; ``aux_loss`` is its Switch-style
balance loss over every MoE layer's router logits (one formula over all layers, counting all k
choices), which the converted blocks feed from moesaic's routers (:mod:`moesaic.hf.block`).
DeepSeek-V3's model reports no ``aux_loss``; its balance comes from the correction bias
(``bias_update_rate``) and, if asked, the sequence-wise loss (``seq_aux_loss_coef``).

:func:`causal_lm_loss` adds the losses the moesaic layers computed themselves and that
``transformers`` does not know: the z-loss (``z_loss_coef``) and the sequence-wise balance loss
(``seq_aux_loss_coef``), each already scaled by its coefficient (both 0 unless asked for).
``l_aux``, DeepSpeed's balance loss, is not added: ``aux_loss`` is the model's balance loss.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from .convert import converted_layers
from .families import family_of


def router_aux_loss_coef(model: nn.Module) -> float:
    """The coefficient the model's config puts on ``aux_loss`` (0 where the family reports none)."""
    if not family_of(model.config).aux_loss:
        return 0.0
    return float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)


def causal_lm_loss(model, outputs_or_batch) -> Tensor:
    """The training loss of a model converted by :func:`moesaic.hf.load` (see module docstring).

    Args:
        model: the converted model, or the engine wrapping it (``moesaic.initialize``'s first result).
        outputs_or_batch: either a batch, a mapping with ``input_ids`` (and optionally ``labels``,
            default ``input_ids``; ``attention_mask``, ...), which is run through ``model`` with
            ``output_router_logits`` on where the config has a router loss; or the outputs of such
            a call (which must hold ``loss``, and ``aux_loss`` where the config weights one).

    Returns:
        A scalar: ``outputs.loss`` (cross-entropy + ``router_aux_loss_coef * aux_loss``) + every
        layer's z-loss and sequence-wise balance loss.
    """
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module) or not hasattr(module, "config"):
        raise TypeError(f"model must be a model converted by moesaic.hf.load (or its engine), got "
                        f"{type(model).__name__}")
    layers = converted_layers(module)
    if not layers:
        raise ValueError(f"the {type(module).__name__} has no moesaic MoE layer; convert it with moesaic.hf.load")
    coef = router_aux_loss_coef(module)
    if isinstance(outputs_or_batch, Mapping) and "input_ids" in outputs_or_batch:
        batch = dict(outputs_or_batch)
        batch.setdefault("labels", batch["input_ids"])
        if coef > 0:
            batch.setdefault("output_router_logits", True)
        outputs = model(**batch)
    elif hasattr(outputs_or_batch, "logits"):
        outputs = outputs_or_batch
    else:
        raise TypeError("outputs_or_batch must be a batch (a mapping with 'input_ids') or the model's outputs, got "
                        f"{type(outputs_or_batch).__name__}")
    loss = getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError("the outputs hold no loss: call the model with labels=... (or pass the batch instead)")
    if coef > 0 and getattr(outputs, "aux_loss", None) is None:
        raise ValueError(f"config.router_aux_loss_coef={coef} but the outputs hold no aux_loss, so the balance loss "
                         "would be dropped: call the model with output_router_logits=True (or pass the batch instead)")
    for layer in layers.values():
        for extra in (layer.z_loss, layer.seq_aux_loss):
            if extra is not None:
                loss = loss + extra.to(loss.dtype)
    return loss
