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

from typing import Mapping, Optional

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


def _balance_loss(module: nn.Module, router_logits, token_mask) -> Optional[Tensor]:
    """``transformers``' own balance loss of the family over the collected logits, pads left out."""
    import sys

    if not router_logits:
        return None
    family = family_of(module.config)
    formula = getattr(sys.modules[type(module).__module__], "load_balancing_loss_func")
    E = getattr(module.config, family.experts_key)
    return formula(tuple(router_logits), E, module.config.num_experts_per_tok, token_mask.long())


def answer_loss(model, batch: Mapping, *, denominator: float, scale: float = 1.0):
    """The loss of one micro-batch of fine-tuning rows, normalised by the target tokens of the whole step.

    ``moesaic.train.packing.collate`` makes the batch: ``input_ids``, ``position_ids``,
    ``shift_labels`` (-100 where nothing is learned), ``token_mask`` (real tokens) and ``packed``.
    Packed rows attend per document (:func:`moesaic.hf.packing.packed_forward_kwargs`); unpacked rows
    are right-padded and run with ``attention_mask = token_mask``. Pads never reach an expert.

    Args:
        model: the converted model or its engine.
        batch: the micro-batch.
        denominator: target tokens of the whole optimizer step (every micro-batch, every process).
        scale: ``gradient_accumulation_steps * world size`` under the engine, whose backward divides
            by the one and averages over the other; 1 for a plain ``loss.backward()``.

    Returns:
        ``(loss, ce_sum, aux)``: the loss to back-propagate, ``scale * ce_sum / denominator +
        router_aux_loss_coef * aux`` + the layers' z / sequence losses; ``ce_sum`` the summed
        cross-entropy of this micro-batch's targets (detached) and ``aux`` the balance loss (or None).
        So the step's gradient is that of ``sum of every target's cross-entropy / denominator``
        whatever the split into micro-batches and processes (the balance loss, a statistic of each
        micro-batch as in ``transformers``, is averaged over them).
    """
    import torch.nn.functional as F

    from .block import collect_router_logits
    from .packing import packed_forward_kwargs

    module = getattr(model, "module", model)
    if not isinstance(denominator, (int, float)) or not denominator > 0:
        raise ValueError(f"denominator must be the step's number of target tokens (> 0), got {denominator!r}")
    mask = batch["token_mask"]
    kwargs = (packed_forward_kwargs(module, batch["position_ids"]) if batch.get("packed", True)
              else {"attention_mask": mask.long(), "use_cache": False})
    coef = router_aux_loss_coef(module)
    with collect_router_logits() as logits:
        out = model(input_ids=batch["input_ids"], token_mask=mask, **kwargs)
    V = out.logits.shape[-1]
    ce_sum = F.cross_entropy(out.logits.float().reshape(-1, V), batch["shift_labels"].reshape(-1),
                             ignore_index=-100, reduction="sum")
    loss = ce_sum * (scale / denominator)
    aux = _balance_loss(module, logits, mask) if coef > 0 else None
    if aux is not None:
        loss = loss + coef * aux.to(loss.dtype)
    for layer in converted_layers(module).values():
        for extra in (layer.z_loss, layer.seq_aux_loss):
            if extra is not None:
                loss = loss + extra.to(loss.dtype)
    return loss, ce_sum.detach(), None if aux is None else aux.detach()
