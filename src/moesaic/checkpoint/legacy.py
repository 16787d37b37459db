"""Reading what earlier layouts wrote: format 1 checkpoints and the pre-DeepSpeed module names.

**Format 1** (moesaic up to the commit that introduced format 2) differs from format 2 in four
ways, all handled on load without a conversion step:

* the RNG and client state of rank r are in ``rank<r>.state.pt``, a torch pickle. It is read
  with ``torch.load(weights_only=True)``, which rebuilds only tensors and plain containers and
  never runs code; a format-1 file whose ``client_state`` held other objects is refused with a
  message (nothing else can be trusted to load it safely);
* a tensor file's checksum covered its tensors' names and bytes, not the whole file, and no
  dtypes or shapes were recorded; they are checked against the model instead;
* optimizer state is in ``dense.optim.safetensors`` (keys ``"<name>::<field>"``) and
  ``experts/<layer>/<n>.optim.safetensors`` (keys ``"<name inside the expert>::<field>"``);
* the manifest carried no checksum of its own.

**Module names.** An MoE layer's router sits at ``<path>.gate.*`` in moesaic's core layer (and in
moesaic's layer before it took DeepSpeed's nesting) and at ``<path>.deepspeed_moe.gate.*`` in
DeepSpeed's nesting (``moesaic.MoE``, and the core layer until issue 23). A dense tensor (and its
optimizer state) saved under one spelling loads into the other when the model has that one and not
the saved one (:func:`upgrade_dense_names`, over :func:`moesaic.layer.keys.respell_key`). Expert
tensors are stored by their name inside the expert, which no layout changed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Dict, Iterable, Tuple

import torch
from torch import Tensor

from ..layer.identity import ParamRef
from ..layer.keys import LAYOUTS, respell_key
from .errors import CheckpointError


def upgrade_dense_names(saved: Iterable[str], model: Iterable[str]) -> Dict[str, str]:
    """``{saved name: model name}`` for saved dense names that the model spells in the other MoE nesting.

    ``"blocks.0.ffn.gate.wg.weight"`` maps to ``"blocks.0.ffn.deepspeed_moe.gate.wg.weight"`` when
    the model has the second and not the first, and the reverse; every other name maps to itself
    (not listed). A model name already claimed (saved under its own name, or by an earlier
    rename) is never the target of a rename.
    """
    saved, model = list(saved), set(model)
    taken = set(saved)
    renames = {}
    for name in saved:
        if name in model:
            continue
        for candidate in _respellings(name):
            if candidate in model and candidate not in taken:
                renames[name] = candidate
                taken.add(candidate)
                break
    return renames


def _respellings(name: str):
    """``name`` with the part after each dot (an MoE layer's prefix ends there) spelled in each layout."""
    starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
    for start in starts:
        for layout in LAYOUTS:
            rest = respell_key(name[start:], layout)
            if rest != name[start:]:
                yield name[:start] + rest


def v1_expert_file(layer: str, number: int, optim: bool = False) -> str:
    return f"experts/{layer}/{number}{'.optim' if optim else ''}.safetensors"


def v1_optimizer_source(ref: ParamRef) -> Tuple[str, str]:
    """``(file, name in the file)`` of a tensor's optimizer state in a format-1 checkpoint."""
    if ref.expert is None:
        return "dense.optim.safetensors", ref.name
    return v1_expert_file(ref.expert.layer, ref.expert.number, optim=True), ref.name[len(f"{ref.expert}/"):]


def read_v1_rank_state(data: bytes, path: Path) -> Tuple[Dict[str, Any], Dict[str, Tensor], Any]:
    """``(rng json part, rng tensors, client_state)`` from a format-1 ``rank<r>.state.pt``, without running code."""
    try:
        state = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: this format-1 state file holds objects other than tensors and plain "
                              f"containers (in its client_state), which moesaic no longer unpickles because "
                              f"unpickling can run arbitrary code. Details: {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    rng = state.get("rng") if isinstance(state, dict) else None
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), Tensor)):
        raise CheckpointError(f"{path}: not a moesaic format-1 rank state (expected {{'rng', 'client_state'}})")
    python = rng.get("python")
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple)):
        raise CheckpointError(f"{path}: Python's RNG state is malformed")
    cuda = list(rng.get("cuda") or [])
    tensors = {"rng/torch": rng["torch"], **{f"rng/cuda/{i}": t for i, t in enumerate(cuda)}}
    part = {"python": [python[0], list(python[1]), python[2]], "cuda_devices": len(cuda)}
    return part, tensors, state.get("client_state", {})
