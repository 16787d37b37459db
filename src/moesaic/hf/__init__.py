"""Hugging Face models in and out of moesaic (``transformers`` is an optional extra: ``pip install moesaic[hf]``).

* :func:`load`: a ``transformers`` MoE model (a local folder or a built model) whose sparse
  blocks are moesaic layers holding the same weights, named by module path;
* :func:`save`: back to a Hugging Face folder with the checkpoint's tensor names and layout;
* :func:`upcycle`: a dense Llama/Qwen-style model into an MoE whose experts copy its MLP;
* :func:`answer_loss`: the fine-tuning loss of packed or padded rows, normalised by the step's targets;
* :func:`causal_lm_loss`: the training loss (causal-LM loss + the config's router loss + the
  layers' own losses).

Supported families: :data:`SUPPORTED` (docs/hf-bridge.md). Importing this package does not import
``transformers``; calling its functions does.
"""

from .families import DENSE_FAMILIES, SUPPORTED
from .convert import TRAINING_OPTIONS, converted_layers, load, save
from .block import HFMoEBlock
from .loss import answer_loss, causal_lm_loss, router_aux_loss_coef
from .packing import packed_forward_kwargs
from .upcycle import upcycle

__all__ = ["DENSE_FAMILIES", "HFMoEBlock", "SUPPORTED", "TRAINING_OPTIONS", "answer_loss", "causal_lm_loss",
           "converted_layers", "load", "packed_forward_kwargs", "router_aux_loss_coef", "save", "upcycle"]
