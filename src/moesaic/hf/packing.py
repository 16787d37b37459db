"""Packed rows for a converted model: several documents in one row, each attending only to itself.

A packed row holds documents back to back; ``position_ids`` restart at 0 at each document, and
that is all ``transformers`` 5 needs for most families: with ``attention_mask=None`` and no cache,
its mask builders (``masking_utils.create_causal_mask`` and the sliding-window one) detect the
restarts and build a block-diagonal causal mask for eager and SDPA attention, and the flash
kernels on CUDA take the same restarts as varlen boundaries. GPT-OSS's model does not hand
``position_ids`` to its mask builders, so for it :func:`packed_forward_kwargs` builds the
per-layer-type masks itself with the same ``transformers`` functions (full and sliding window)
and passes them as the model's prepared ``{layer type: mask}`` mapping.

Pads at the end of a row are a document of their own (positions restart there too), are never a
target, and are kept from the experts by ``token_mask`` (:func:`moesaic.hf.block.install_token_mask`).
``use_cache=False`` is part of the inputs: a cache switches packing detection off.

Checked in ``tests/unit/test_hf_packing.py``: the logits of every document in a packed row equal
those of the document run alone, within 1e-5 in fp32, for the six families.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from .families import family_of

# families whose model builds its attention masks without position_ids (no packing detection)
_MASKS_WITHOUT_POSITIONS = ("gpt_oss",)


def packed_forward_kwargs(model: nn.Module, position_ids: Tensor) -> Dict[str, object]:
    """The model's keyword arguments (besides ``input_ids``) that make each document attend only to itself.

    Args:
        model: a model converted by :func:`moesaic.hf.load` (or any ``transformers`` model of a
            supported family).
        position_ids: `(batch, seq)` int64, restarting at 0 at every document of a row.

    Returns:
        ``{"position_ids", "use_cache": False}`` plus, for GPT-OSS, ``attention_mask`` as its
        ``{"full_attention": mask, "sliding_attention": mask}`` mapping.
    """
    if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or position_ids.dtype != torch.long:
        raise ValueError("position_ids must be a (batch, seq) int64 tensor restarting at 0 at each document, got "
                         f"{getattr(position_ids, 'shape', type(position_ids).__name__)}")
    config = model.config
    out: Dict[str, object] = {"position_ids": position_ids, "use_cache": False}
    if family_of(config).model_type in _MASKS_WITHOUT_POSITIONS:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        dtype = next(model.parameters()).dtype
        shape = (position_ids.shape[0], position_ids.shape[1], 0)  # the builders read batch, length, dtype, device
        kwargs = dict(config=config, inputs_embeds=torch.empty(shape, dtype=dtype, device=position_ids.device),
                      attention_mask=None, cache=None, position_ids=position_ids)
        out["attention_mask"] = {"full_attention": create_causal_mask(**kwargs),
                                 "sliding_attention": create_sliding_window_causal_mask(**kwargs)}
    return out
