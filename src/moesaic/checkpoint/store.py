"""Checkpoints stored by parameter identity: dense once, each expert by layer name and global number.

Layout of ``<dir>/<tag>/``::

    manifest.json                     format version, step, world/ep sizes, config, file checksums
    dense.safetensors                 every non-expert tensor of the model (written by rank 0)
    dense.optim.safetensors           their optimizer state, keyed "<param name>::<state>"
    experts/<layer>/<number>.safetensors        one expert's tensors (written by its owner)
    experts/<layer>/<number>.optim.safetensors  its optimizer state, keyed "<name>::<state>"
    rank<r>.state.pt                  RNG states and client state (data position) of rank r
    engine.json                       step counters, scheduler, loss scaler, per-group lr

Nothing in a file name or key depends on the world size that wrote it, so a checkpoint written by
ep_size=2 on 2 ranks loads with ep_size=1 on 1 rank or ep_size=4 on 4: each rank reads the files
of the experts it now owns.

Saving is atomic against a killed process: every rank writes into ``<dir>/.tmp-<tag>``; when all have finished, rank 0
writes the manifest (with a CRC-32 per file), renames the folder into place and then replaces
``latest``. A process killed at any moment leaves the previous checkpoint and ``latest`` intact.
Loading verifies checksums and shapes of everything first and only then copies into the model,
so a failed load leaves the model unchanged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file
from torch import Tensor, nn

from ..layer.identity import ExpertIndex, LayerInfo
from ..layer.moe import upgrade_legacy_keys

FORMAT_VERSION = 1
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moesaic-ckpt-crc")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, from a newer format, or does not fit the model."""


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if _dist()[1] > 1:
        dist.barrier()


def _expert_owner_writes(layer: LayerInfo) -> bool:
    """Of the replicas of an expert (its expert-data-parallel group), the first one writes it."""
    groups = layer.groups
    return groups is None or dist.get_rank() == groups.edp_ranks[0]


def _tensors_crc32(tensors: Dict[str, Tensor]) -> int:
    """CRC-32 of the tensors' raw bytes in name order: what the file must give back when loaded."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        crc = zlib.crc32(name.encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)  # zero-copy view of the memory
    return crc


def _write(path: Path, tensors: Dict[str, Tensor], files: Dict[str, Dict], root: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # safetensors writes straight from the tensors (no Python bytes copy). The checksum is taken over
    # the tensors' bytes in memory rather than by reading the file back; loading recomputes it over
    # what the file yields, and a truncated file fails on its size. No fsync: the rename protocol
    # protects against a killed process, as torch.save and DeepSpeed do.
    crc = _POOL.submit(_tensors_crc32, tensors)  # zlib releases the GIL: checksum while safetensors writes
    st_save_file(tensors, str(path))
    files[str(path.relative_to(root))] = {"tensors_crc32": crc.result(), "bytes": path.stat().st_size}


def _read(root: Path, rel: str, manifest: Dict) -> Dict[str, Tensor]:
    meta = manifest["files"].get(rel)
    if meta is None:
        raise CheckpointError(f"{root / rel}: not in the checkpoint's manifest (missing expert or file)")
    path = root / rel
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing from the checkpoint")
    size = path.stat().st_size
    if size != meta["bytes"]:
        raise CheckpointError(f"{path}: checksum mismatch (size {size} vs {meta['bytes']} bytes); the file is "
                              "truncated or corrupted")
    try:
        tensors = st_load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path}: checksum mismatch (unreadable: {err}); the file is corrupted") from err
    if _tensors_crc32(tensors) != meta["tensors_crc32"]:
        raise CheckpointError(f"{path}: checksum mismatch (CRC-32 of its tensors); the file is corrupted")
    return tensors


def _crc32_of_file(path: Path, chunk: int = 16 << 20) -> Tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return crc, size
            crc = zlib.crc32(block, crc)
            size += len(block)


def _expert_rel(layer_name: str, number: int, optim: bool = False) -> str:
    return f"experts/{layer_name}/{number}{'.optim' if optim else ''}.safetensors"


# --- save ---------------------------------------------------------------------------------------

def save(directory, model: nn.Module, *, tag: str, optimizer=None, engine_state: Optional[Dict] = None,
         client_state: Optional[Dict] = None, model_config: Optional[Dict] = None,
         index: Optional[ExpertIndex] = None) -> Path:
    """Write a checkpoint (collectively: every rank calls it). Returns the checkpoint folder.

    ``index`` is the model's :class:`ExpertIndex` (built when None); ``optimizer`` anything with
    the ``state_dict()`` of :class:`~moesaic.optim.mixed_precision.GroupedMixedPrecisionOptimizer`.
    """
    if not isinstance(tag, str) or not tag or "/" in tag or tag.startswith("."):
        raise ValueError(f"tag must be a non-empty name without '/' that does not start with '.', got {tag!r}")
    rank, world = _dist()
    root = Path(directory)
    tmp = root / f".tmp-{tag}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
        tmp.mkdir(parents=True)
    _barrier()
    files: Dict[str, Dict] = {}
    index = index if index is not None else ExpertIndex.build(model)
    layers = index.layers
    optim_state = optimizer.state_dict() if optimizer is not None else None
    # 1. dense tensors and their optimizer state (rank 0; identical on every rank)
    aliases: Dict[str, str] = {}
    if rank == 0:
        dense, aliases = _dedupe(index.dense_state_dict(model))
        _write(tmp / "dense.safetensors", dense, files, tmp)
        if optim_state is not None:
            _write(tmp / "dense.optim.safetensors",
                   _optim_tensors(optim_state, [r.name for r in index.dense()], strip=""), files, tmp)
    # 2. each expert by its owner
    for key in index.experts():
        if not _expert_owner_writes(layers[key.layer]):
            continue
        _write(tmp / _expert_rel(key.layer, key.number), index.expert_state_dict(key), files, tmp)
        if optim_state is not None:
            _write(tmp / _expert_rel(key.layer, key.number, optim=True),
                   _optim_tensors(optim_state, [r.name for r in index.expert_refs(key)], strip=f"{key}/"), files, tmp)
    # 3. this rank's RNG states and client state
    state = {"rng": _rng_state(), "client_state": client_state or {}}
    torch.save(state, tmp / f"rank{rank}.state.pt")
    files[f"rank{rank}.state.pt"] = _file_meta(tmp / f"rank{rank}.state.pt")
    # 4. rank 0 gathers the file list, writes manifest and engine state, publishes atomically
    settings = optim_state["param_groups"] if optim_state is not None else None
    gathered = [(files, settings)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (files, settings))
    groups = [part[1] for part in gathered]
    final = root / tag
    if rank == 0:
        all_files = {k: v for part in gathered for k, v in part[0].items()}
        if engine_state is not None:
            (tmp / "engine.json").write_text(json.dumps(engine_state))
            all_files["engine.json"] = _file_meta(tmp / "engine.json")
        if optim_state is not None:
            # the optimizer type and every group's settings, by group name, from every rank
            by_name = {g["name"]: {k: v for k, v in g.items() if k != "params"} for part in groups for g in part}
            (tmp / "optimizer.json").write_text(json.dumps({"optimizer": optim_state["optimizer"],
                                                            "param_groups": list(by_name.values())}))
            all_files["optimizer.json"] = _file_meta(tmp / "optimizer.json")
        manifest = {"format_version": FORMAT_VERSION, "tag": tag, "world_size": world,
                    "step": (engine_state or {}).get("global_steps"), "model_config": model_config,
                    "moe_layers": {n: {"num_experts": l.num_experts, "ep_size": l.ep_size} for n, l in
                                   layers.items()},
                    "dense_aliases": aliases, "files": all_files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if final.exists():
            trash = root / f".old-{tag}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, root / "latest")  # published last: a crash before this keeps the old one
    _barrier()
    return final


def _dedupe(tensors: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Store tied tensors (e.g. an LM head tied to the embedding) once; ``{alias: stored name}``."""
    seen: Dict[Tuple, str] = {}
    kept, aliases = {}, {}
    for name, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = t
    return kept, aliases


def _file_meta(path: Path) -> Dict:
    crc, size = _crc32_of_file(path)
    return {"crc32": crc, "bytes": size}


def _optim_tensors(optim_state: Dict, names: List[str], strip: str) -> Dict[str, Tensor]:
    """The optimizer state of ``names`` as flat ``"<name>::<field>"`` tensors (``strip`` removed)."""
    out = {}
    for name in names:
        entry = optim_state["state"].get(name)
        if entry is None:
            continue  # not optimised here (frozen)
        for field, v in entry.items():
            out[f"{name[len(strip):]}::{field}"] = v
    return out


def _rng_state() -> Dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


# --- load ---------------------------------------------------------------------------------------

def resolve(directory, tag: Optional[str] = None) -> Path:
    """The checkpoint folder for ``tag`` (or the one ``latest`` names)."""
    root = Path(directory)
    if tag is None:
        latest = root / "latest"
        if not latest.exists():
            raise CheckpointError(f"{root}: no 'latest' file; pass a tag or point at a checkpoint folder")
        tag = latest.read_text().strip()
    folder = root / tag
    if not (folder / "manifest.json").exists():
        raise CheckpointError(f"{folder}: no manifest.json (not a moesaic checkpoint, or an unfinished save)")
    return folder


def read_manifest(folder: Path) -> Dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{folder / 'manifest.json'}: format version {version!r} is newer than this moesaic "
                              f"reads ({FORMAT_VERSION}); upgrade moesaic")
    return manifest


def load(directory, model: nn.Module, *, tag: Optional[str] = None, optimizer=None,
         index: Optional[ExpertIndex] = None) -> Tuple[Path, Dict, Dict]:
    """Load a checkpoint into ``model`` (and ``optimizer``) on every rank.

    Returns:
        ``(folder, client_state, engine_state)``; client_state is this rank's when the world size
        matches the writer's, else rank 0's.
    """
    folder = resolve(directory, tag)
    manifest = read_manifest(folder)
    rank, world = _dist()
    index = index if index is not None else ExpertIndex.build(model)
    # 1. read and check everything before touching the model
    for lname, layer in index.layers.items():  # the layer structure first: the clearest message
        saved = manifest["moe_layers"].get(lname)
        if saved is None:
            raise CheckpointError(f"{folder}: no MoE layer named {lname!r} in the checkpoint "
                                  f"(it has {sorted(manifest['moe_layers'])})")
        if saved["num_experts"] != layer.num_experts:
            raise CheckpointError(f"{folder}: layer {lname!r} has {saved['num_experts']} experts in the checkpoint "
                                  f"but {layer.num_experts} in the model")
    # checkpoints written before the layer took DeepSpeed's module names say "<layer>.gate.*"
    dense = upgrade_legacy_keys(_read(folder, "dense.safetensors", manifest), model)
    for alias, stored in upgrade_legacy_keys(manifest.get("dense_aliases", {}), model).items():
        if stored in dense:
            dense[alias] = dense[stored]
    want = index.dense_state_dict(model)
    _check_tensors("dense.safetensors", dense, want, folder)
    expert_states = {}
    for key in index.experts():
        rel = _expert_rel(key.layer, key.number)
        tensors = _read(folder, rel, manifest)
        _check_tensors(rel, tensors, index.expert_state_dict(key), folder)
        expert_states[key] = tensors
    optim_sd = None
    if optimizer is not None:
        optim_sd = _optimizer_state(folder, manifest, index, optimizer, model)
        try:
            optimizer.check_state_dict(optim_sd)
        except ValueError as err:
            raise CheckpointError(f"{folder}: {err}") from err
    state_file = f"rank{rank}.state.pt" if manifest["world_size"] == world else "rank0.state.pt"
    if state_file not in manifest["files"]:
        raise CheckpointError(f"{folder / state_file}: missing from the manifest")
    rank_state = torch.load(folder / state_file, weights_only=False)
    engine_state = json.loads((folder / "engine.json").read_text()) if "engine.json" in manifest["files"] else {}
    # 2. all checks passed: copy in (the model first: a master weight absent from the state starts from it)
    model.load_state_dict({**dense, **{k: v for k, v in model.state_dict().items() if k not in dense}}, strict=True)
    for key, tensors in expert_states.items():
        index.load_expert_state_dict(key, tensors)
    if optim_sd is not None:
        optimizer.load_state_dict(optim_sd)
    if manifest["world_size"] == world:
        _set_rng_state(rank_state["rng"])
    return folder, rank_state.get("client_state", {}), engine_state


def _optimizer_state(folder: Path, manifest: Dict, index: ExpertIndex, optimizer, model: nn.Module) -> Dict:
    """The optimizer state dict this rank needs, from the dense and per-expert optimizer files."""
    wanted = set(optimizer.state_names())
    flat = {}
    if any(index.ref(n).expert is None for n in wanted):
        flat.update(upgrade_legacy_keys(_read(folder, "dense.optim.safetensors", manifest), model))
    for key in index.experts():
        if any(r.name in wanted for r in index.expert_refs(key)):
            part = _read(folder, _expert_rel(key.layer, key.number, optim=True), manifest)
            flat.update({f"{key}/{k}": v for k, v in part.items()})
    state: Dict[str, Dict[str, Tensor]] = {}
    for k, v in flat.items():
        name, _, field = k.rpartition("::")
        if name in wanted:
            state.setdefault(name, {})[field] = v
    if "optimizer.json" in manifest["files"]:
        meta = json.loads((folder / "optimizer.json").read_text())
    else:  # written before optimizer.json existed: the type is not recorded, the lrs are in engine.json
        engine = json.loads((folder / "engine.json").read_text()) if "engine.json" in manifest["files"] else {}
        meta = {"optimizer": optimizer.kind,
                "param_groups": [{"name": n, "lr": lr} for n, lr in engine.get("group_lr", {}).items()]}
    return {"optimizer": meta["optimizer"], "state": state, "param_groups": meta["param_groups"]}


def _check_tensors(rel: str, got: Dict[str, Tensor], want: Dict[str, Tensor], folder: Path) -> None:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"{folder / rel}: tensors do not match the model (missing {missing[:4]}, "
                              f"unexpected {extra[:4]})")
    for k, v in got.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{folder / rel}: {k!r} has shape {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(want[k].shape)} in the model")


def _set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
