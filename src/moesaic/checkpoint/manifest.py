"""The manifest: the one file that says what a checkpoint holds and where.

Format 2 (``manifest.json``)::

    {"format_version": 2, "tag", "sequence", "step", "world_size", "model_config",
     "moe_layers": {layer: {"num_experts", "ep_size"}},
     "dense": {"file": "dense.safetensors", "aliases": {tied name: stored name}},
     "experts": {layer: {"<number>": "experts/<encoded layer>/<number>.safetensors"}},
     "optimizer": null | {"meta": "optimizer.json", "state": {tensor name: file}},
     "ranks": [{"json": "rank0.json", "tensors": "rank0.safetensors"}, ...],
     "engine": null | "engine.json",
     "files": {file: {"bytes", "crc32", "tensors"?: {name: {"dtype", "shape"}}}},
     "manifest_crc32": CRC-32 of the canonical JSON of everything above}

Loading never derives a file name from a layer or tensor name: it looks names up here. Every
path is checked to stay inside the folder, every file is listed in ``files`` with its size and
whole-file CRC-32 (tensor files also with every tensor's dtype and shape), and the manifest
checks itself with ``manifest_crc32``.

Format 3 (saves of FSDP2-sharded models, :mod:`.sharded`) is format 2 with each unit's files
listed (``"dense": {"files": [...]}``, experts and optimizer state as lists of files) and tensor
files' entries saying which rows a piece holds (``"rows": {key: [start, stop, total]}``).

:func:`read_manifest` also reads format 1 and returns it as a :class:`Plan` of the same shape
(see :mod:`.legacy`).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import CheckpointError
from .files import encode_json
from .legacy import v1_expert_file
from .names import check_relative_path
from .safeio import read_small

FORMAT_VERSION = 2  # what saves of unsharded models write
SHARDED_FORMAT_VERSION = 3  # saves of FSDP2-sharded models (stage 3): tensors in row pieces (sharded.py)
_MAX_MANIFEST = 256 << 20


def _canonical(body: Dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def seal(body: Dict[str, Any]) -> bytes:
    """The manifest file's bytes: ``body`` plus its own checksum."""
    return encode_json({**body, "manifest_crc32": zlib.crc32(_canonical(body))})


@dataclass
class Plan:
    """A checkpoint's manifest, checked and in one shape for every format version."""

    folder: Path
    format_version: int
    raw: Dict[str, Any]
    files: Dict[str, Dict[str, Any]]
    world_size: int
    moe_layers: Dict[str, Dict[str, Any]]
    dense_file: str
    dense_aliases: Dict[str, str]
    experts: Dict[Tuple[str, int], str]
    optimizer_meta: Optional[str]
    optimizer_state: Optional[Dict[str, str]]  # format 2: tensor name -> file; format 1: None (by rule)
    ranks: List[Dict[str, str]]
    engine: Optional[str]
    extra: Dict[str, Any] = field(default_factory=dict)
    # every format as lists of files (format 3 stores a tensor in row pieces over several files)
    dense_parts: List[str] = field(default_factory=list)
    expert_parts: Dict[Tuple[str, int], List[str]] = field(default_factory=dict)
    optimizer_parts: Optional[Dict[str, List[str]]] = None
    rows: Dict[str, Dict[str, Tuple[int, int, int]]] = field(default_factory=dict)  # file -> key -> rows

    def __post_init__(self) -> None:
        if not self.dense_parts:
            self.dense_parts = [self.dense_file]
        if not self.expert_parts:
            self.expert_parts = {k: [v] for k, v in self.experts.items()}
        if self.optimizer_parts is None and self.optimizer_state is not None:
            self.optimizer_parts = {k: [v] for k, v in self.optimizer_state.items()}

    def entry(self, rel: str) -> Dict[str, Any]:
        """The ``files`` entry of ``rel``; a CheckpointError when the manifest does not list it."""
        meta = self.files.get(rel)
        if meta is None:
            raise CheckpointError(f"{self.folder / rel}: not in the checkpoint's manifest (missing expert or file)")
        return meta


def read_manifest_plan(folder: Path) -> Plan:
    """Read, verify and normalise ``folder/manifest.json``."""
    path = folder / "manifest.json"
    data = read_small(folder, "manifest.json", _MAX_MANIFEST,
                      missing="missing (not a moesaic checkpoint, or an unfinished save)")
    if len(data) > _MAX_MANIFEST:
        raise CheckpointError(f"{path}: larger than {_MAX_MANIFEST} bytes; not a manifest")
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or corrupted") from None
    if not isinstance(m, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    version = m.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not a positive integer")
    if version > SHARDED_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is newer than this moesaic reads "
                              f"({SHARDED_FORMAT_VERSION}); upgrade moesaic")
    if version >= 2:
        crc = m.pop("manifest_crc32", None)
        if crc != zlib.crc32(_canonical(m)):
            raise CheckpointError(f"{path}: checksum mismatch (manifest_crc32 {crc!r}); the manifest was edited or "
                                  "corrupted")
        return _plan_v2(folder, m)
    return _plan_v1(folder, m)


def _need(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{path}: {what}")


def _common(folder: Path, m: Dict[str, Any]) -> Tuple[Dict, int, Dict]:
    path = folder / "manifest.json"
    files = m.get("files")
    _need(isinstance(files, dict), path, "'files' must be an object")
    for rel, meta in files.items():
        check_relative_path(rel, str(path))
        _need(isinstance(meta, dict) and type(meta.get("bytes")) is int and meta["bytes"] >= 0, path,
              f"file entry {rel!r} has no valid byte size")
    world = m.get("world_size")
    _need(type(world) is int and world >= 1, path, f"world_size {world!r} is not an integer >= 1")
    layers = m.get("moe_layers")
    _need(isinstance(layers, dict) and all(isinstance(v, dict) and type(v.get("num_experts")) is int
                                           for v in layers.values()), path, "'moe_layers' is malformed")
    return files, world, layers


def _plan_v2(folder: Path, m: Dict[str, Any]) -> Plan:
    """Formats 2 and 3 (3: a unit's tensors in a list of files, tensors in row pieces)."""
    path = folder / "manifest.json"
    files, world, layers = _common(folder, m)
    sharded = m["format_version"] >= SHARDED_FORMAT_VERSION

    def rel(value, what):
        check_relative_path(value, f"{path} ({what})")
        _need(value in files, path, f"{what} names {value!r}, which 'files' does not list")
        return value

    def rels(value, what) -> List[str]:
        if not sharded:
            return [rel(value, what)]
        _need(isinstance(value, list) and value and len(set(map(str, value))) == len(value), path,
              f"{what} must list its files (format 3), got {value!r}")
        return [rel(v, what) for v in value]

    rows: Dict[str, Dict[str, Tuple[int, int, int]]] = {}
    for r, meta in files.items():
        _need(type(meta.get("crc32")) is int, path, f"file entry {r!r} has no crc32")
        if r.endswith(".safetensors"):
            _need(isinstance(meta.get("tensors"), dict), path, f"file entry {r!r} does not list its tensors")
        if "rows" in meta:
            _need(sharded and isinstance(meta["rows"], dict), path, f"file entry {r!r}: 'rows' is malformed")
            for key, span in meta["rows"].items():
                shape = meta["tensors"].get(key, {}).get("shape")
                ok = (isinstance(span, list) and len(span) == 3 and all(type(v) is int for v in span)
                      and 0 <= span[0] < span[1] <= span[2] and isinstance(shape, list) and shape
                      and shape[0] == span[1] - span[0])
                _need(ok, path, f"file entry {r!r}: rows of {key!r} must be [start, stop, total] with "
                      f"0 <= start < stop <= total matching the piece's first dimension, got {span!r}")
            rows[r] = {k: tuple(v) for k, v in meta["rows"].items()}
    dense = m.get("dense")
    _need(isinstance(dense, dict) and isinstance(dense.get("aliases"), dict), path, "'dense' is malformed")
    dense_parts = rels(dense.get("files") if sharded else dense.get("file"), "dense tensors")
    experts: Dict[Tuple[str, int], str] = {}
    expert_parts: Dict[Tuple[str, int], List[str]] = {}
    _need(isinstance(m.get("experts"), dict), path, "'experts' is malformed")
    for layer, numbers in m["experts"].items():
        _need(isinstance(numbers, dict), path, f"'experts'[{layer!r}] is malformed")
        for n, r in numbers.items():
            _need(n.isascii() and n.isdigit(), path, f"expert number {n!r} of layer {layer!r} is not a number")
            expert_parts[(layer, int(n))] = rels(r, f"expert {layer}/{n}")
            experts[(layer, int(n))] = expert_parts[(layer, int(n))][0]
    optim = m.get("optimizer")
    meta_rel, state, parts = None, None, None
    if optim is not None:
        _need(isinstance(optim, dict) and isinstance(optim.get("state"), dict), path, "'optimizer' is malformed")
        meta_rel = rel(optim.get("meta"), "optimizer settings")
        parts = {name: rels(r, f"optimizer state of {name!r}") for name, r in optim["state"].items()}
        state = {name: p[0] for name, p in parts.items()}
    ranks = m.get("ranks")
    _need(isinstance(ranks, list) and len(ranks) == world, path, f"'ranks' must list {world} ranks")
    rank_files = []
    for i, r in enumerate(ranks):
        _need(isinstance(r, dict), path, f"'ranks'[{i}] is malformed")
        rank_files.append({"json": rel(r.get("json"), f"rank {i} state"),
                           "tensors": rel(r.get("tensors"), f"rank {i} tensors")})
    engine = m.get("engine")
    return Plan(folder=folder, format_version=m["format_version"], raw=m, files=files, world_size=world,
                moe_layers=layers, dense_file=dense_parts[0], dense_aliases=dict(dense["aliases"]),
                experts=experts, optimizer_meta=meta_rel, optimizer_state=state, ranks=rank_files,
                engine=None if engine is None else rel(engine, "engine state"), dense_parts=dense_parts,
                expert_parts=expert_parts, optimizer_parts=parts, rows=rows)


def _plan_v1(folder: Path, m: Dict[str, Any]) -> Plan:
    path = folder / "manifest.json"
    files, world, layers = _common(folder, m)
    experts = {}
    for layer, info in layers.items():
        for n in range(info["num_experts"]):
            experts[(layer, n)] = check_relative_path(v1_expert_file(layer, n), str(path))
    aliases = m.get("dense_aliases", {})
    _need(isinstance(aliases, dict), path, "'dense_aliases' is malformed")
    has_optim = "dense.optim.safetensors" in files or any(r.endswith(".optim.safetensors") for r in files)
    return Plan(folder=folder, format_version=1, raw=m, files=files, world_size=world, moe_layers=layers,
                dense_file="dense.safetensors", dense_aliases=dict(aliases), experts=experts,
                optimizer_meta="optimizer.json" if "optimizer.json" in files else None,
                optimizer_state=None, ranks=[{"pt": f"rank{r}.state.pt"} for r in range(world)],
                engine="engine.json" if "engine.json" in files else None, extra={"has_optimizer": has_optim})
