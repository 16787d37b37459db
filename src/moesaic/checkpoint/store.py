"""Saving and loading a checkpoint, collectively, by parameter identity.

Layout of a checkpoint folder (format 2; :mod:`.manifest` describes the manifest)::

    manifest.json                         what is where, every file's size and CRC-32, its own CRC
    dense.safetensors                     every non-expert tensor of the model (rank 0)
    experts/<layer>/<n>.safetensors       expert n of a layer (its first replica); <layer> encoded
    optim/dense-<h>.safetensors           optimizer state of dense tensors, "<name>::<field>"
    experts/<layer>/<n>.optim-<h>.safetensors   optimizer state of expert n's tensors
    rank<r>.json, rank<r>.safetensors     rank r's RNG states and client state (no pickle)
    engine.json                           step counters, scheduler, loss scaler, config
    optimizer.json                        optimizer type and every group's settings

``<h>`` is a hash of the tensor names a file holds: several ranks may each write part of the
optimizer state (ZeRO) without file names that depend on ranks; the manifest maps every tensor
name to its file, so loading never depends on who wrote what. Who writes an optimizer entry is
decided in one place, :func:`writes_optimizer_entry`.

Nothing in a file name or key depends on the world size that wrote it, so a checkpoint written
by ep_size=2 on 2 ranks loads with ep_size=1 on 1 rank or ep_size=4 on 4.

**Saving** (every rank calls :func:`save`): rank 0 removes ``.tmp-*`` debris of killed saves and
creates a staging folder; every rank writes and fsyncs its files there; rank 0 checks that every
optimizer entry was written exactly once, writes the manifest, fsyncs the folders, renames the
staging folder to the tag's folder (``<tag>``, or ``<tag>@<n>`` when the tag exists), fsyncs the
directory, switches ``latest`` atomically, and only then removes superseded saves of the tag and,
with ``keep_last``, the oldest checkpoints. A process killed at any instant leaves ``latest``
naming a complete checkpoint. An error on any rank is raised on every rank.

**Loading** has two phases (:mod:`.staging`). :func:`prepare` reads every file this rank needs
and verifies it (size, whole-file CRC-32, tensor names/dtypes/shapes against the manifest, then
against the model and optimizer; every JSON value by type and range; RNG states), runs the
caller's own checks (the engine's scheduler and loss-scaler state), and the ranks agree that all of
them succeeded; ``StagedLoad.apply()`` then only copies. :func:`load` is both, so a failed load
leaves every rank's model, optimizer and RNG unchanged.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layer.identity import ExpertIndex, ExpertKey, LayerInfo, require_index
from . import durable
from .directory import next_folder, resolve, staging_folder, tidy
from .errors import CheckpointError
from .files import read_json, read_tensors, read_v1_tensors, read_verified_bytes, write_json, write_tensors
from .legacy import read_v1_rank_state, upgrade_dense_names, v1_optimizer_source
from . import sharded as _sharded
from .manifest import FORMAT_VERSION, SHARDED_FORMAT_VERSION, Plan, read_manifest_plan, seal
from .names import POINTER, check_tag, layer_folders
from .rankstate import capture_rng, decode_client_state, encode_client_state, stage_rng
from .staging import StagedLoad, check_engine_state, check_optimizer_entry, check_optimizer_meta

_IO_THREADS = 4  # files written / read at once: enough to overlap checksums, fsyncs and reads


def _dist() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(error: Optional[BaseException], stage: str) -> None:
    """Raise on every rank if any rank failed ``stage`` (its own error where it failed)."""
    rank, world = _dist()
    messages = [None if error is None else f"{type(error).__name__}: {error}"]
    if world > 1:
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise CheckpointError(f"rank {r} failed {stage}: {m}")


def _first_replica(layer: LayerInfo) -> bool:
    """Of an expert's replicas (its expert-data-parallel group), the first one writes it."""
    groups = layer.groups
    return groups is None or dist.get_rank() == groups.edp_ranks[0]


def writes_optimizer_entry(optimizer, index: ExpertIndex, name: str) -> bool:
    """Whether this rank writes the optimizer state of tensor ``name``: the one decision point.

    An optimizer that shards its state (ZeRO) says so with ``optimizer.writes_state(name)``;
    otherwise rank 0 writes dense state and an expert's first replica writes the expert's.
    """
    hook = getattr(optimizer, "writes_state", None)
    if callable(hook):
        return bool(hook(name))
    expert = index.ref(name).expert if name in index else None
    if expert is None:
        return _dist()[0] == 0
    return _first_replica(index.layers[expert.layer])


def _names_hash(names) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8")).hexdigest()[:12]


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


def _json_or_type_error(obj: Any, what: str) -> None:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be plain JSON data (it is stored as JSON): {err}") from None


# --- save ---------------------------------------------------------------------------------------

def save(directory, model: nn.Module, *, tag: str, optimizer=None, engine_state: Optional[Dict] = None,
         client_state: Optional[Dict] = None, model_config: Optional[Dict] = None,
         index: ExpertIndex, keep_last: Optional[int] = None) -> Path:
    """Write a checkpoint (collectively: every rank calls it) and point ``latest`` at it.

    Args:
        directory: the checkpoint directory (created if missing).
        model: the model; its MoE layers' identity comes from ``index``.
        tag: the checkpoint's name, one folder name (not ``latest``, not starting with ``.``).
            Saving an existing tag replaces that checkpoint once the new one is complete.
        optimizer: anything with the ``state_dict()`` of
            :class:`~moesaic.optim.mixed_precision.GroupedMixedPrecisionOptimizer`; optionally
            ``writes_state(name) -> bool`` when it shards its state over ranks.
        engine_state: JSON data (counters, scheduler, loss scaler) for ``engine.json``.
        client_state: this rank's dict of JSON data and tensors (see :mod:`.rankstate`).
        model_config: JSON data recorded in the manifest.
        index: the model's :class:`ExpertIndex` (``ExpertIndex.build(model)``, built once per model).
        keep_last: after publishing, keep only this many newest checkpoints in ``directory``
            (never removing the one ``latest`` names); None keeps all.

    Returns:
        The published checkpoint folder.
    """
    # 0. arguments, on every rank, before anything is written
    check_tag(tag)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None (keep every checkpoint) or an int >= 1, got {keep_last!r}")
    require_index(index, "checkpoint.save(index=...)")
    rank, world = _dist()
    root = Path(directory)
    error: Optional[BaseException] = None
    try:
        client_part, client_tensors = encode_client_state({} if client_state is None else client_state)
        _json_or_type_error(engine_state, "engine_state")
        _json_or_type_error(model_config, "model_config")
    except (TypeError, ValueError) as err:
        error = err
    staging = staging_folder(root, tag)
    final_name, sequence = None, None
    # 1. rank 0 removes debris of killed saves and opens a staging folder
    if rank == 0 and error is None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            durable.remove_transient(root)
            final_name, sequence = next_folder(root, tag)
            staging.mkdir()
            durable.fsync_dir(root)
        except OSError as err:
            error = CheckpointError(f"{root}: cannot prepare the save ({err})")
    _agree(error, f"preparing checkpoint {tag!r}")
    # 2. every rank writes its files
    try:
        report = _write_rank_files(staging, model, index, optimizer, rank, client_part, client_tensors)
    except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        error = _named(err, root, tag)
        report = _Report(error=f"{type(error).__name__}: {error}")
    reports = [report]
    if world > 1:
        reports = [None] * world
        dist.all_gather_object(reports, report)
    if error is not None:
        raise error
    for r, rep in enumerate(reports):
        if rep.error is not None:
            raise CheckpointError(f"rank {r} failed writing checkpoint {tag!r}: {rep.error}")
    # 3. rank 0 completes the folder and publishes it; every rank learns the outcome
    outcome: List[Any] = [None]
    if rank == 0:
        try:
            _publish(root, staging, final_name, sequence, tag, reports, index, model_config, engine_state,
                     optimizer, world, keep_last)
            outcome = [("ok", final_name)]
        except Exception as err:  # noqa: BLE001
            error = _named(err, root, tag)
            outcome = [("error", f"{type(error).__name__}: {error}")]
            if world == 1:
                raise error
    if world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    status, value = outcome[0]
    if status != "ok":
        raise CheckpointError(f"rank 0 failed publishing checkpoint {tag!r}: {value}")
    return root / value


def _named(err: BaseException, root: Path, tag: str) -> BaseException:
    """A file-system error of a save (a full disk) as a CheckpointError naming the checkpoint and the file."""
    if not isinstance(err, OSError):
        return err
    named = CheckpointError(f"saving checkpoint {tag!r} in {root} failed: {err}")
    named.__cause__ = err
    return named


@dataclass
class _Report:
    """What a rank wrote, sent to rank 0 for the manifest."""

    error: Optional[str] = None
    files: Dict[str, Dict] = field(default_factory=dict)  # file -> manifest entry
    optimizer_files: Dict[str, str] = field(default_factory=dict)  # optimizer tensor name -> file
    optimizer_held: List[str] = field(default_factory=list)  # every tensor this rank's optimizer holds state for
    optimizer_settings: Optional[Dict] = None  # {"optimizer", "param_groups"} without params
    dense_aliases: Optional[Dict[str, str]] = None  # rank 0: tied tensors stored once
    sharded: bool = False  # format 3: the files below, tensors in row pieces (sharded.py)
    dense_files: List[str] = field(default_factory=list)
    expert_files: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)  # layer -> number -> files


def _write_rank_files(staging: Path, model: nn.Module, index: ExpertIndex, optimizer, rank: int,
                      client_part: Dict, client_tensors: Dict[str, Tensor]) -> _Report:
    """Write this rank's share of the checkpoint into ``staging``."""
    folders = layer_folders(index.layers)
    jobs: List[Tuple[str, Callable[[Path], Dict]]] = []

    def tensors_job(rel: str, tensors: Dict[str, Tensor]):
        jobs.append((rel, lambda path: write_tensors(path, tensors)))

    if _sharded.is_sharded(model):
        return _write_sharded_rank_files(staging, model, index, optimizer, rank, client_part, client_tensors)
    aliases: Optional[Dict[str, str]] = None
    if rank == 0:
        dense, aliases = _dedupe(index.dense_state_dict(model))
        tensors_job("dense.safetensors", dense)
    for key in index.experts():
        if _first_replica(index.layers[key.layer]):
            tensors_job(f"experts/{folders[key.layer]}/{key.number}.safetensors", index.expert_state_dict(key))
    optim_files: Dict[str, str] = {}
    held: List[str] = []
    settings = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        held = sorted(sd["state"])
        settings = {"optimizer": sd["optimizer"], "param_groups": [
            {k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}
        buckets: Dict[Optional[ExpertKey], Dict[str, Dict[str, Tensor]]] = {}
        for name, entry in sd["state"].items():
            if writes_optimizer_entry(optimizer, index, name):
                expert = index.ref(name).expert if name in index else None
                buckets.setdefault(expert, {})[name] = entry
        for expert, entries in sorted(buckets.items(), key=lambda kv: (kv[0] is not None, str(kv[0]))):
            h = _names_hash(entries)
            rel = (f"optim/dense-{h}.safetensors" if expert is None
                   else f"experts/{folders[expert.layer]}/{expert.number}.optim-{h}.safetensors")
            tensors_job(rel, {f"{name}::{field}": v for name, entry in entries.items() for field, v in entry.items()})
            optim_files.update({name: rel for name in entries})
    files = _write_jobs(staging, jobs, rank, client_part, client_tensors)
    return _Report(files=files, optimizer_files=optim_files, optimizer_held=held, optimizer_settings=settings,
                   dense_aliases=aliases)


def _write_jobs(staging: Path, jobs: List[Tuple[str, Callable[[Path], Dict]]], rank: int, client_part: Dict,
                client_tensors: Dict[str, Tensor]) -> Dict[str, Dict]:
    """Write ``jobs`` and this rank's RNG and client state, in parallel; ``{file: manifest entry}``."""
    jobs = list(jobs)
    rng_part, rng_tensors = capture_rng()
    rank_tensors = {**rng_tensors, **client_tensors}
    jobs.append((f"rank{rank}.safetensors", lambda path: write_tensors(path, rank_tensors)))
    rank_json = {"rng": rng_part, "client_state": client_part}
    jobs.append((f"rank{rank}.json", lambda path: write_json(path, rank_json)))
    for parent in sorted({(staging / rel).parent for rel, _ in jobs}):
        durable.make_dirs(parent, staging)
    files: Dict[str, Dict] = {}
    with ThreadPoolExecutor(max_workers=min(_IO_THREADS, len(jobs)), thread_name_prefix="moesaic-ckpt") as pool:
        results = {rel: pool.submit(fn, staging / rel) for rel, fn in jobs}
        for rel, fut in results.items():
            files[rel] = fut.result()
    return files


def _write_sharded_rank_files(staging: Path, model: nn.Module, index: ExpertIndex, optimizer, rank: int,
                              client_part: Dict, client_tensors: Dict[str, Tensor]) -> _Report:
    """Format 3: this rank's rows of every sharded tensor, nothing gathered (see :mod:`.sharded`)."""
    folders = layer_folders(index.layers)
    jobs: List[Tuple[str, Callable[[Path], Dict]]] = []
    rows: Dict[str, Dict[str, List[int]]] = {}

    def unit_job(rel: str, unit) -> None:
        tensors = unit.tensors
        jobs.append((rel, lambda path: write_tensors(path, tensors)))
        if unit.rows:
            rows[rel] = unit.rows

    dense, experts, aliases = _sharded.model_units(model, index, rank,
                                                   lambda layer: _first_replica(index.layers[layer]))
    report = _Report(sharded=True, dense_aliases=aliases)
    if dense.tensors:
        rel = f"dense-{dense.hash()}.safetensors"
        unit_job(rel, dense)
        report.dense_files.append(rel)
    for key, unit in experts.items():
        base = f"experts/{folders[key.layer]}/{key.number}"
        rel = f"{base}.safetensors" if not unit.rows else f"{base}.part-{unit.hash()}.safetensors"
        unit_job(rel, unit)
        report.expert_files.setdefault(key.layer, {}).setdefault(str(key.number), []).append(rel)
    if optimizer is not None:
        units, report.optimizer_held = _sharded.optimizer_units(optimizer, index)
        report.optimizer_settings = {"optimizer": optimizer.kind, "param_groups": optimizer.portable_groups()}
        for expert, unit in units.items():
            if not unit.tensors:
                continue
            rel = (f"optim/dense-{unit.hash()}.safetensors" if expert is None
                   else f"experts/{folders[expert.layer]}/{expert.number}.optim-{unit.hash()}.safetensors")
            unit_job(rel, unit)
            for k in unit.tensors:
                files_of = report.optimizer_files.setdefault(k.rpartition("::")[0], [])
                if rel not in files_of:
                    files_of.append(rel)
    report.files = _write_jobs(staging, jobs, rank, client_part, client_tensors)
    for rel, r in rows.items():
        report.files[rel]["rows"] = r
    return report


def _sharded_manifest(manifest: Dict[str, Any], reports, files: Dict[str, Dict], staging: Path,
                      optim_state: Dict[str, List[str]]) -> None:
    """Format 3's lists of files per unit, each unit's pieces checked to tile every tensor exactly once."""
    dense = sorted(rel for rep in reports for rel in rep.dense_files)
    manifest["dense"] = {"files": dense, "aliases": manifest["dense"]["aliases"] or {}}
    units: List[Tuple[str, List[str], Optional[str]]] = [("dense tensors", dense, None)]
    for layer, numbers in manifest["experts"].items():
        for n in list(numbers):
            parts = sorted(rel for rep in reports for rel in rep.expert_files.get(layer, {}).get(n, []))
            if not parts:
                raise CheckpointError(f"{staging}: no rank wrote expert {layer}/{n}")
            numbers[n] = parts
            units.append((f"expert {layer}/{n}", parts, None))
    for name, parts in optim_state.items():
        parts.sort()
        units.append((f"optimizer state of {name}", parts, f"{name}::"))
    for what, parts, prefix in units:
        spans: Dict[str, List[Tuple[int, int, int]]] = {}
        for rel in parts:
            file_rows = files[rel].get("rows", {})
            for key, meta in files[rel]["tensors"].items():
                if prefix is not None and not key.startswith(prefix):
                    continue
                spans.setdefault(key, []).append(tuple(file_rows.get(key, (0, meta["shape"][0] if meta["shape"]
                                                                          else 1, -1))))
        for key, ss in spans.items():
            whole = [s for s in ss if s[2] == -1]
            ss = sorted(ss)
            tiles = all(a == (ss[i - 1][1] if i else 0) and n == ss[0][2] for i, (a, _, n) in enumerate(ss))
            if (whole and len(ss) > 1) or (not whole and (not tiles or ss[-1][1] != ss[0][2])):
                raise CheckpointError(f"{staging}: the rows written of {key!r} ({what}) do not cover it exactly "
                                      f"once: {ss}")


def _publish(root: Path, staging: Path, final_name: str, sequence: int, tag: str, reports, index: ExpertIndex,
             model_config, engine_state, optimizer, world: int, keep_last: Optional[int]) -> None:
    """Rank 0: check the ranks' reports, write the shared files and manifest, publish, switch ``latest``."""
    files: Dict[str, Dict] = {}
    optim_state: Dict[str, Any] = {}
    sharded = reports[0].sharded
    for rep in reports:
        for rel, meta in rep.files.items():
            if rel in files:
                raise CheckpointError(f"{staging / rel}: written by two ranks")
            files[rel] = meta
        if sharded:  # format 3: a tensor's state in pieces from several ranks (tiling checked below)
            for name, rels in rep.optimizer_files.items():
                optim_state.setdefault(name, []).extend(rels)
            continue
        for name, rel in rep.optimizer_files.items():
            if name in optim_state:
                raise CheckpointError(f"the optimizer state of {name!r} was written by two ranks; writes_state(name) "
                                      "must be true on exactly one rank")
            optim_state[name] = rel
    manifest: Dict[str, Any] = {
        "format_version": SHARDED_FORMAT_VERSION if sharded else FORMAT_VERSION, "tag": tag, "sequence": sequence, "world_size": world,
        "step": (engine_state or {}).get("global_steps"), "model_config": model_config,
        "moe_layers": {n: {"num_experts": l.num_experts, "ep_size": l.ep_size} for n, l in index.layers.items()},
        "dense": {"file": "dense.safetensors", "aliases": reports[0].dense_aliases},
        "experts": {}, "optimizer": None, "engine": None,
        "ranks": [{"json": f"rank{r}.json", "tensors": f"rank{r}.safetensors"} for r in range(world)],
    }
    folders = layer_folders(index.layers)
    for name, layer in index.layers.items():
        manifest["experts"][name] = {str(n): f"experts/{folders[name]}/{n}.safetensors"
                                     for n in range(layer.num_experts)}
    if sharded:
        _sharded_manifest(manifest, reports, files, staging, optim_state)
    if optimizer is not None:
        held = set().union(*(rep.optimizer_held for rep in reports))
        missing = sorted(held - set(optim_state))
        if missing:
            raise CheckpointError(f"no rank wrote the optimizer state of {missing[:4]}; writes_state(name) must be "
                                  "true on exactly one rank")
        kinds = {rep.optimizer_settings["optimizer"] for rep in reports}
        if len(kinds) != 1:
            raise CheckpointError(f"the ranks hold different optimizer types {sorted(kinds)}")
        # every group's settings by group name, from every rank (a rank holds only its experts' groups)
        by_name = {g["name"]: g for rep in reports for g in rep.optimizer_settings["param_groups"]}
        files["optimizer.json"] = write_json(staging / "optimizer.json", {
            "optimizer": kinds.pop(), "param_groups": list(by_name.values())})
        manifest["optimizer"] = {"meta": "optimizer.json", "state": optim_state}
    if engine_state is not None:
        files["engine.json"] = write_json(staging / "engine.json", engine_state)
        manifest["engine"] = "engine.json"
    for rel in [f"rank{r}.json" for r in range(world)] + [f"rank{r}.safetensors" for r in range(world)]:
        if rel not in files:
            raise CheckpointError(f"{staging / rel}: no rank wrote it")
    for layer, numbers in manifest["experts"].items():
        for n, rel in numbers.items():
            for r in (rel if isinstance(rel, list) else [rel]):
                if r not in files:
                    raise CheckpointError(f"{staging / r}: no rank wrote expert {layer}/{n}")
    manifest["files"] = dict(sorted(files.items()))
    durable.write_file(staging / "manifest.json", [seal(manifest)])
    durable.fsync_tree(staging)
    durable.rename_into_place(staging, root / final_name)
    durable.replace_file(root / POINTER, final_name)
    tidy(root, keep_last)


# --- load ---------------------------------------------------------------------------------------

def read_manifest(folder) -> Dict:
    """The verified manifest of a checkpoint folder, as a dict (format 1 or 2)."""
    return read_manifest_plan(Path(folder)).raw


def prepare(directory, model: nn.Module, *, tag: Optional[str] = None, optimizer=None,
            index: ExpertIndex, check: Optional[Callable[[StagedLoad], Any]] = None) -> StagedLoad:
    """Read and check a checkpoint for ``model`` (and ``optimizer``) on every rank; apply nothing.

    Every file this rank needs is read and verified, every tensor checked against the model and
    the optimizer, every JSON value by type and range; then ``check(staged)`` runs (the engine's
    checks of its scheduler and loss-scaler state; its result is kept as ``staged.extra``); then
    the ranks agree that all of them succeeded. Nothing live has changed until the caller calls
    ``staged.apply()``.

    ``index`` is the model's :class:`ExpertIndex` (``ExpertIndex.build(model)``, built once per model).

    Raises:
        CheckpointError: on every rank when any rank's checks failed, naming the file and the key.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if check is not None and not callable(check):
        raise TypeError(f"check must be None or a callable taking the staged load, got {type(check).__name__}")
    require_index(index, "checkpoint.prepare(index=...)")
    rank, world = _dist()
    error, staged = None, None
    try:
        folder = resolve(directory, tag)
        staged = _read_and_check(read_manifest_plan(folder), model, index, optimizer, rank, world)
        if check is not None:
            staged.extra = check(staged)
    except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others would copy in alone
        error = err
    _agree(error, "loading the checkpoint")
    return staged


def load(directory, model: nn.Module, *, tag: Optional[str] = None, optimizer=None,
         index: ExpertIndex) -> Tuple[Path, Dict, Dict]:
    """Load a checkpoint into ``model`` (and ``optimizer``) on every rank: :func:`prepare`, then apply.

    Everything this rank needs is read and verified first; the ranks agree that all of them
    succeeded; only then is anything copied, so a failed load changes nothing anywhere.

    Returns:
        ``(folder, client_state, engine_state)``; client_state is this rank's when the world size
        matches the writer's, else rank 0's (and the RNG states are then left as they are).
    """
    staged = prepare(directory, model, tag=tag, optimizer=optimizer, index=index)
    staged.apply()
    return staged.folder, staged.client_state, staged.engine_state


class _Reader:
    """Reads a plan's files (verified, in parallel) once each."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.cache: Dict[str, Any] = {}

    def _read_one(self, rel: str):
        folder, entry = self.plan.folder, self.plan.entry(rel)
        if rel.endswith(".safetensors"):
            read = read_v1_tensors if self.plan.format_version == 1 else read_tensors
            return read(folder, rel, entry)
        if rel.endswith(".json"):
            return read_json(folder, rel, entry)
        return read_verified_bytes(folder, rel, entry)  # format 1's rank<r>.state.pt: parsed by the caller

    def read(self, rels: List[str]) -> None:
        todo = [r for r in dict.fromkeys(rels) if r not in self.cache]
        for r in todo:
            self.plan.entry(r)  # a file missing from the manifest fails before any read
        if len(todo) <= 1:
            for r in todo:
                self.cache[r] = self._read_one(r)
            return
        with ThreadPoolExecutor(max_workers=min(_IO_THREADS, len(todo)), thread_name_prefix="moesaic-ckpt") as pool:
            futures = {r: pool.submit(self._read_one, r) for r in todo}
            for r, fut in futures.items():
                self.cache[r] = fut.result()

    def __getitem__(self, rel: str):
        self.read([rel])
        return self.cache[rel]


def _read_and_check(plan: Plan, model: nn.Module, index: ExpertIndex, optimizer, rank: int, world: int):
    """Read and verify everything this rank loads; returns what to copy in (nothing applied)."""
    folder = plan.folder
    # 1. the layer structure first: the clearest message
    for lname, layer in index.layers.items():
        saved = plan.moe_layers.get(lname)
        if saved is None:
            raise CheckpointError(f"{folder}: no MoE layer named {lname!r} in the checkpoint "
                                  f"(it has {sorted(plan.moe_layers)})")
        if saved["num_experts"] != layer.num_experts:
            raise CheckpointError(f"{folder}: layer {lname!r} has {saved['num_experts']} experts in the checkpoint "
                                  f"but {layer.num_experts} in the model")
    # 2. which files: dense, this rank's experts, optimizer state, rank state, engine; read at once
    shard = _sharded.is_sharded(model)  # a sharded model (stage 3) reads only its own rows of each tensor
    expert_rels = {}
    for key in index.experts():
        parts = plan.expert_parts.get((key.layer, key.number))
        if parts is None:
            raise CheckpointError(f"{folder / 'manifest.json'}: lists no file for expert {key}")
        expert_rels[key] = parts
    want = _sharded.dense_targets(model, index) if shard else index.dense_state_dict(model)
    renames = {}
    if plan.format_version >= 2:  # the manifest lists the dense names: renames are known before reading
        saved_names = [k for rel in plan.dense_parts for k in plan.entry(rel)["tensors"]]
        renames = upgrade_dense_names(list(dict.fromkeys(saved_names)) + list(plan.dense_aliases), want)
    wanted = list(optimizer.state_names()) if optimizer is not None else []
    if optimizer is not None and plan.format_version >= 2 and plan.optimizer_state is None:
        raise CheckpointError(f"{folder}: the checkpoint holds no optimizer state (it was saved without an "
                              "optimizer); load it without one")
    optim_rels = _optimizer_files(plan, index, wanted, renames)
    same_world = plan.world_size == world
    state_rank = rank if same_world else 0
    meta_rels = [r for r in (plan.engine, plan.optimizer_meta if optimizer is not None else None) if r is not None]
    reader = _Reader(plan)
    reader.read([*plan.dense_parts, *(r for parts in expert_rels.values() for r in parts),
                 *plan.ranks[state_rank].values(), *meta_rels,
                 *sorted({r for parts in optim_rels.values() for r in parts})])
    # 3. dense tensors: aliases, renamed layouts, then names/shapes/kinds against the model
    if plan.format_version == 1:
        dense = dict(reader[plan.dense_file])
        renames = upgrade_dense_names(list(dense) + list(plan.dense_aliases), want)
        shapes = {k: tuple(v.shape) for k, v in dense.items()}
    else:
        def dense_rows(k):
            target = want.get(renames.get(k, k))
            return None if target is None else _sharded.want_rows(target)
        dense, shapes = _sharded.assemble(reader, plan.dense_parts, plan.rows, folder, dense_rows)
    dense = {renames.get(k, k): v for k, v in dense.items()}
    shapes = {renames.get(k, k): v for k, v in shapes.items()}
    for alias, stored in plan.dense_aliases.items():
        stored = renames.get(stored, stored)
        if stored in dense:
            dense[renames.get(alias, alias)] = dense[stored]
            shapes[renames.get(alias, alias)] = shapes[stored]
    _check_tensors(folder / plan.dense_file, dense, want, shapes)
    if shard:
        _sharded.check_local_shapes(folder / plan.dense_file, dense, want)
    experts = {}
    for key, parts in expert_rels.items():
        if shard:
            refs = _sharded.expert_targets(index, key)
            targets = {n: torch.empty(r.shape, dtype=r.param.dtype, device="meta") for n, r in refs.items()}

            def expert_rows(k, refs=refs):
                r = refs.get(k)
                return None if r is None or r.index is not None else _sharded.want_rows(r.param)
        else:
            targets, expert_rows = index.expert_state_dict(key), (lambda k: None)
        tensors, tshapes = _sharded.assemble(reader, parts, plan.rows, folder, expert_rows)
        _check_tensors(folder / parts[0], tensors, targets, tshapes)
        if shard:
            _sharded.check_local_shapes(folder / parts[0], tensors,
                                        {n: r.param for n, r in refs.items() if r.index is None})
        experts[key] = tensors
    # 4. optimizer state, assembled from whichever files hold this rank's tensors
    optim_sd = None
    if optimizer is not None:
        optim_sd = _optimizer_state(plan, reader, index, optim_rels, renames, optimizer, shard)
        try:
            optimizer.check_state_dict(optim_sd)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{folder}: {err}") from err
    # 5. rank state (RNG states checked here, applied only with the rest) and engine state
    if plan.format_version == 1:
        rel = plan.ranks[state_rank]["pt"]
        rng_part, rng_tensors, client_state = read_v1_rank_state(reader[rel], folder / rel)
        state_file = folder / rel
    else:
        rel_json, rel_tensors = plan.ranks[state_rank]["json"], plan.ranks[state_rank]["tensors"]
        state_file = folder / rel_json
        part, rng_tensors = reader[rel_json], reader[rel_tensors]
        if not isinstance(part, dict) or set(part) != {"rng", "client_state"}:
            raise CheckpointError(f"{state_file}: not a rank state (expected 'rng' and 'client_state')")
        rng_part = part["rng"]
        client_state = decode_client_state(part["client_state"], rng_tensors, state_file)
    rng = stage_rng(rng_part, rng_tensors, state_file)
    engine_file = folder / plan.engine if plan.engine is not None else None
    engine_state = check_engine_state(reader[plan.engine], engine_file) if engine_file is not None else {}
    return StagedLoad(folder=folder, client_state=client_state, engine_state=engine_state, engine_file=engine_file,
                      model=model, index=index, dense=dense, experts=experts, optimizer=optimizer,
                      optimizer_state=optim_sd, rng=rng if same_world else None)


def _optimizer_files(plan: Plan, index: ExpertIndex, wanted: List[str],
                     renames: Dict[str, str]) -> Dict[str, List[str]]:
    """``{tensor name (this model's): files holding its optimizer state}`` for the names the checkpoint has."""
    back = {new: old for old, new in renames.items()}  # format 2: model name -> name in the checkpoint
    out = {}
    for name in wanted:
        if plan.format_version == 1:
            if name in index:
                rel = v1_optimizer_source(index.ref(name))[0]
                if rel in plan.files:
                    out[name] = [rel]
        else:
            parts = plan.optimizer_parts.get(back.get(name, name))
            if parts is not None:
                out[name] = parts  # a name without state is reported by check_state_dict, by name
    return out


def _optimizer_state(plan: Plan, reader: _Reader, index: ExpertIndex, files: Dict[str, List[str]],
                     renames: Dict[str, str], optimizer, shard: bool = False) -> Dict:
    """The optimizer state dict this rank needs, from the files that hold its tensors' entries."""
    folder = plan.folder
    back = {new: old for old, new in renames.items()}  # model name -> name in the checkpoint
    # the settings and the type first: a state for another optimizer type is refused as such
    if plan.optimizer_meta is not None:
        meta = check_optimizer_meta(reader[plan.optimizer_meta], folder / plan.optimizer_meta, optimizer)
    else:  # format 1 before optimizer.json existed: the type is not recorded, the lrs are in engine.json
        engine = reader[plan.engine] if plan.engine is not None else {}
        lrs = engine.get("group_lr", {}) if isinstance(engine, dict) else {}
        if not isinstance(lrs, dict):
            raise CheckpointError(f"{folder / plan.engine}: group_lr must be an object, got {type(lrs).__name__}")
        meta = check_optimizer_meta({"optimizer": optimizer.kind, "param_groups": [
            {"name": n, "lr": lr} for n, lr in lrs.items()]}, folder / str(plan.engine), optimizer)
    state: Dict[str, Dict[str, Tensor]] = {}
    fields = getattr(optimizer, "state_fields", None)  # the per-tensor state it keeps besides step and master
    for name, parts in files.items():
        saved = back.get(name, name)
        if plan.format_version == 1 and index.ref(name).expert is not None:
            saved = v1_optimizer_source(index.ref(name))[1]  # format 1 keyed expert state by the inner name
        prefix = f"{saved}::"
        ref = index.ref(name) if name in index else None
        rows = None
        if shard and ref is not None and ref.index is None:
            rows = _sharded.want_rows(ref.param)  # this rank's rows of every field but the step count
        entry, shapes = _sharded.assemble(reader, parts, plan.rows, folder,
                                          lambda k: None if k.endswith("::step") else rows, prefix=prefix)
        entry = {k[len(prefix):]: v for k, v in entry.items()}
        shapes = {k[len(prefix):]: v for k, v in shapes.items()}
        if entry:
            shape = tuple(ref.shape) if ref is not None else None
            check_optimizer_entry(name, entry, folder / parts[0], fields, shape if rows is None else None)
            if rows is not None:
                for key, got in shapes.items():
                    if key != "step" and got != shape:
                        raise CheckpointError(f"{folder / parts[0]}: {name}::{key} has shape {got} but the tensor has "
                                              f"{shape}")
            state[name] = entry
    return {"optimizer": meta.get("optimizer"), "state": state, "param_groups": meta["param_groups"]}


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _check_tensors(path: Path, got: Dict[str, Tensor], want: Dict[str, Tensor],
                   shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> None:
    """Names, shapes and dtype kinds of a file's tensors against the model's (float <-> float casts allowed).

    ``shapes``: the whole tensors' shapes where ``got`` holds only some rows (a sharded model's).
    """
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing[:4]}, unexpected {extra[:4]})")
    for k, v in got.items():
        w = want[k]
        shape = tuple(v.shape) if shapes is None else tuple(shapes[k])
        if shape != tuple(w.shape):
            raise CheckpointError(f"{path}: {k!r} has shape {shape} in the checkpoint but {tuple(w.shape)} "
                                  "in the model")
        if _kind(v.dtype) != _kind(w.dtype):
            raise CheckpointError(f"{path}: {k!r} is {v.dtype} in the checkpoint but {w.dtype} in the model; "
                                  f"{_kind(v.dtype)} values cannot load into {_kind(w.dtype)} tensors")


# --- verification of a whole checkpoint ---------------------------------------------------------

def verify(directory, tag: Optional[str] = None) -> Path:
    """Verify every file of a checkpoint (all ranks' and experts'), without a model; returns its folder.

    Checks what can be checked without a model: every file as a load reads it, the rank states
    (RNG states as they would be restored, client state structure), engine.json's counters and
    optimizer.json's structure. The optimizer settings' ranges and everything against a model are
    checked when loading.

    Raises:
        CheckpointError: naming the first file that is missing, truncated, corrupted or malformed.
    """
    folder = resolve(directory, tag)
    plan = read_manifest_plan(folder)
    reader = _Reader(plan)
    reader.read(sorted(plan.files))
    if plan.format_version == 1:
        for rels in plan.ranks:
            part, tensors, _ = read_v1_rank_state(reader[rels["pt"]], folder / rels["pt"])
            stage_rng(part, tensors, folder / rels["pt"])
    else:
        for rels in plan.ranks:
            part = reader[rels["json"]]
            if not isinstance(part, dict) or set(part) != {"rng", "client_state"}:
                raise CheckpointError(f"{folder / rels['json']}: not a rank state")
            decode_client_state(part["client_state"], reader[rels["tensors"]], folder / rels["json"])
            stage_rng(part["rng"], reader[rels["tensors"]], folder / rels["json"])
    if plan.engine is not None:
        check_engine_state(reader[plan.engine], folder / plan.engine)
    if plan.optimizer_meta is not None:
        check_optimizer_meta(reader[plan.optimizer_meta], folder / plan.optimizer_meta)
    return folder
