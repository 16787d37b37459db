"""Import a DeepSpeed MoE checkpoint (model states) into moesaic's per-expert layout.

DeepSpeed writes, per tag: ``mp_rank_00_model_states.pt`` holding ``{"module": <non-expert state
dict>, ...}`` and one ``layer_<L>_expert_<G>_mp_rank_00_model_states.pt`` per MoE layer L (MoE
modules numbered in ``named_modules`` order) and global expert G, keyed
``<path>.deepspeed_moe.experts.deepspeed_experts.<G>.<rest>``. The router is
``<path>.deepspeed_moe.gate.wg.weight``; a residual MoE adds ``<path>.mlp.*`` and
``<path>.coefficient.*``.

The target is the same architecture built with ``moesaic.MoE`` at the same module paths, with
every expert local (``ep_size=1``); moesaic's ``MoE`` has DeepSpeed's module structure, so every
key is taken as it is. The converted checkpoint then loads under any ``ep_size``.
DeepSpeed's optimizer files index state by position and are not converted: training resumes with
fresh optimizer state.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..layer.moe import moe_layers
from .store import CheckpointError, save

_EXPERT_KEY = re.compile(r"^(?P<path>.*?)\.?deepspeed_moe\.experts\.deepspeed_experts\.(?P<g>\d+)\.(?P<rest>.+)$")


def _resolve_tag(ds_dir: Path, tag: Optional[str]) -> Path:
    if tag is None:
        latest = ds_dir / "latest"
        if not latest.exists():
            raise CheckpointError(f"{ds_dir}: no 'latest' file; pass the DeepSpeed tag (e.g. 'global_step100')")
        tag = latest.read_text().strip()
    folder = ds_dir / tag
    if not (folder / "mp_rank_00_model_states.pt").exists():
        raise CheckpointError(f"{folder}: no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint)")
    return folder


def convert_deepspeed_checkpoint(ds_dir, model: nn.Module, out_dir, *, ds_tag: Optional[str] = None,
                                 tag: str = "from_deepspeed") -> Path:
    """Load DeepSpeed's model states into ``model`` and save them in moesaic's layout.

    Args:
        ds_dir: DeepSpeed's checkpoint folder (the ``save_dir`` given to ``save_checkpoint``).
        model: the same architecture with ``moesaic.MoE`` layers at the same paths, ``ep_size=1``.
        out_dir: where to write the moesaic checkpoint.
        ds_tag: DeepSpeed's tag (default: its ``latest`` file).
        tag: the moesaic tag to write.

    Returns:
        The moesaic checkpoint folder. ``model`` holds the imported weights afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    folder = _resolve_tag(Path(ds_dir), ds_tag)
    layers = list(moe_layers(model).values())  # (path, layer) in named_modules order, like DeepSpeed
    for path, layer in layers:
        if layer.ep_size != 1:
            raise ValueError(f"convert into a model whose MoE layers have ep_size=1 (all experts local); layer "
                             f"{path!r} has ep_size={layer.ep_size}")
    dense = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    state: Dict[str, torch.Tensor] = dict(dense)  # moesaic's MoE has DeepSpeed's module structure: same keys
    for layer_id, (path, layer) in enumerate(layers):
        for g in range(layer.num_experts):
            file = folder / f"layer_{layer_id}_expert_{g}_mp_rank_00_model_states.pt"
            if not file.exists():
                raise CheckpointError(f"{file}: missing (layer {path!r} has {layer.num_experts} experts)")
            for key, value in torch.load(file, map_location="cpu", weights_only=False).items():
                m = _EXPERT_KEY.match(key)
                if m is None or m.group("path") != path or int(m.group("g")) != g:
                    raise CheckpointError(f"{file}: unexpected key {key!r} for layer {path!r} expert {g}")
                state[key] = value  # with ep_size=1, global number g is local expert g
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise CheckpointError(f"{folder}: the DeepSpeed checkpoint does not match the model (missing {missing[:4]}, "
                              f"unexpected {extra[:4]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{folder}: {k!r} has shape {tuple(v.shape)} in DeepSpeed's checkpoint but "
                                  f"{tuple(want[k].shape)} in the model")
    model.load_state_dict(state, strict=True)
    return save(out_dir, model, tag=tag, model_config={"imported_from": str(folder)})
