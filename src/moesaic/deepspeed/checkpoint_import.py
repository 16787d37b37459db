"""Import a DeepSpeed MoE checkpoint (model states) into moesaic's per-expert layout.

DeepSpeed writes, per tag: ``mp_rank_00_model_states.pt`` holding ``{"module": <non-expert state
dict>, ...}`` and one ``layer_<L>_expert_<G>_mp_rank_00_model_states.pt`` per MoE layer L (MoE
modules numbered in module order) and global expert G, keyed
``<path>.deepspeed_moe.experts.deepspeed_experts.<G>.<rest>``. The router is
``<path>.deepspeed_moe.gate.wg.weight``; a residual MoE adds ``<path>.mlp.*`` and
``<path>.coefficient.*``.

The target is the same architecture built with ``moesaic.MoE`` at the same module paths, with
every expert local (``ep_size=1``); the converted checkpoint then loads under any ``ep_size``.
Expert tensors are matched through the model's :class:`~moesaic.layer.identity.ExpertIndex`
(layer by module path, expert by number, tensor by its name inside the expert), so the import
does not depend on how moesaic's MoE module names its submodules. DeepSpeed's optimizer files
index state by position and are not converted: training resumes with fresh optimizer state.

**What is trusted.** DeepSpeed saves with ``torch.save``, a pickle, and pickles can run code when
loaded. The import reads them with ``torch.load(weights_only=True)``, which rebuilds only tensors
and plain containers and refuses everything else. DeepSpeed's own model-state files load that way
(the expert files always do); the main file may not when the run put arbitrary Python objects in
DeepSpeed's ``client_state`` (DeepSpeed stores it in the same file) or used a DeepSpeed version
that pickles its own classes there. Such a file is refused, and only ``trust_pickle=True``
loads it with full unpickling: pass it only for files you or your own jobs wrote.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..layer.identity import ExpertIndex, ExpertKey
from ..checkpoint.errors import CheckpointError
from ..checkpoint.legacy import upgrade_dense_names
from ..checkpoint.names import check_folder_name, check_tag
from ..checkpoint.store import save

_EXPERT_KEY = re.compile(r"^(?P<path>.*?)\.?deepspeed_moe\.experts\.deepspeed_experts\.(?P<g>\d+)\.(?P<rest>.+)$")


def _resolve_tag(ds_dir: Path, tag: Optional[str]) -> Path:
    if tag is None:
        latest = ds_dir / "latest"
        if not latest.exists():
            raise CheckpointError(f"{ds_dir}: no 'latest' file; pass the DeepSpeed tag (e.g. 'global_step100')")
        tag = latest.read_text().strip()
        check_folder_name(tag, str(latest))
    else:
        check_folder_name(tag, f"{ds_dir}: ds_tag")
    folder = ds_dir / tag
    if not (folder / "mp_rank_00_model_states.pt").exists():
        raise CheckpointError(f"{folder}: no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint)")
    return folder


def _load_pt(path: Path, trust_pickle: bool):
    """``torch.load`` that runs no code unless ``trust_pickle``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: holds Python objects that torch.load(weights_only=True) refuses to rebuild, because "
            f"unpickling them could run arbitrary code ({str(err).splitlines()[0]}). If you trust where this file "
            "came from, pass trust_pickle=True") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


def convert_deepspeed_checkpoint(ds_dir, model: nn.Module, out_dir, *, ds_tag: Optional[str] = None,
                                 tag: str = "from_deepspeed", trust_pickle: bool = False) -> Path:
    """Load DeepSpeed's model states into ``model`` and save them in moesaic's layout.

    Args:
        ds_dir: DeepSpeed's checkpoint folder (the ``save_dir`` given to ``save_checkpoint``).
        model: the same architecture with ``moesaic.MoE`` layers at the same paths, ``ep_size=1``.
        out_dir: where to write the moesaic checkpoint.
        ds_tag: DeepSpeed's tag (default: its ``latest`` file).
        tag: the moesaic tag to write.
        trust_pickle: load DeepSpeed's files with full unpickling, which can run code from the
            file. Default False: only tensors and plain containers are rebuilt, and a file that
            needs more is refused with a CheckpointError saying so.

    Returns:
        The moesaic checkpoint folder. ``model`` holds the imported weights afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(trust_pickle, bool):
        raise TypeError(f"trust_pickle must be a bool, got {type(trust_pickle).__name__}")
    check_tag(tag)
    folder = _resolve_tag(Path(ds_dir), ds_tag)
    index = ExpertIndex.build(model)
    layers = list(index.layers.values())  # module order, as DeepSpeed numbers its MoE layers
    for layer in layers:
        if layer.ep_size != 1:
            raise ValueError(f"convert into a model whose MoE layers have ep_size=1 (all experts local); layer "
                             f"{layer.path!r} has ep_size={layer.ep_size}")
    # 1. read and check everything before touching the model
    main = _load_pt(folder / "mp_rank_00_model_states.pt", trust_pickle)
    if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
        raise CheckpointError(f"{folder / 'mp_rank_00_model_states.pt'}: no 'module' state dict")
    want_dense = index.dense_state_dict(model)
    renames = upgrade_dense_names(main["module"], want_dense)  # a core layer holds its router at <path>.gate
    dense = {renames.get(k, k): v for k, v in main["module"].items()}
    _check(folder, "dense", dense, want_dense)
    experts: Dict[ExpertKey, Dict[str, Tensor]] = {}
    for layer_id, layer in enumerate(layers):
        for g in range(layer.num_experts):
            file = folder / f"layer_{layer_id}_expert_{g}_mp_rank_00_model_states.pt"
            if not file.exists():
                raise CheckpointError(f"{file}: missing (layer {layer.path!r} has {layer.num_experts} experts)")
            tensors = {}
            for key, value in _load_pt(file, trust_pickle).items():
                m = _EXPERT_KEY.match(key)
                if m is None or m.group("path") != layer.path or int(m.group("g")) != g:
                    raise CheckpointError(f"{file}: unexpected key {key!r} for layer {layer.path!r} expert {g}")
                tensors[m.group("rest")] = value
            key = ExpertKey(layer.name, g)
            _check(file, f"expert {key}", tensors, index.expert_state_dict(key))
            experts[key] = tensors
    # 2. copy in, then save
    model.load_state_dict({**dense, **{k: v for k, v in model.state_dict().items() if k not in dense}}, strict=True)
    for key, tensors in experts.items():
        index.load_expert_state_dict(key, tensors)
    return save(out_dir, model, tag=tag, model_config={"imported_from": str(folder)}, index=index)


def _check(where: Path, what: str, got: Dict[str, Tensor], want: Dict[str, Tensor]) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"{where}: the DeepSpeed checkpoint's {what} does not match the model (missing "
                              f"{missing[:4]}, unexpected {extra[:4]})")
    for k, v in got.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{where}: {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{where}: {k!r} has shape {tuple(v.shape)} in DeepSpeed's checkpoint but "
                                  f"{tuple(want[k].shape)} in the model")
