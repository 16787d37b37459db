"""The checkpoint directory: the ``latest`` pointer, finding a tag's folder, tidying and pruning.

A checkpoint directory holds published checkpoint folders, the ``latest`` pointer (a text file
naming one of them) and, while a save runs, ``.tmp-*`` entries. A folder is *published* once it
has been renamed into place with a complete, fsynced content; ``latest`` is switched to it only
afterwards. Saving a tag again publishes ``<tag>@<n>`` beside the old folder, switches ``latest``
and only then removes the old folder, so ``latest`` never names a missing or partial folder.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from . import durable
from .errors import CheckpointError
from .names import POINTER, TRANSIENT_PREFIX, check_folder_name, encode_component, folder_name, split_folder_name
from .safeio import check_entry, read_small

_MAX_POINTER = 4096  # a folder name (at most 200 bytes) and a newline
_MAX_PEEK = 256 << 20  # the manifest's own limit


@dataclass(frozen=True)
class Published:
    """A published checkpoint folder as seen by the directory (from its manifest, unverified)."""

    name: str  # folder name
    tag: str
    version: int  # the n of "<tag>@<n>" (0 for "<tag>")
    sequence: int  # publication order within the directory (0 for format 1)
    step: Optional[int]
    format_version: int


def read_pointer(root: Path) -> Optional[str]:
    """The folder name ``latest`` holds (checked to be one folder inside ``root``), or None.

    ``latest`` must be a regular file, not a symbolic link (see :mod:`.safeio`).
    """
    pointer = root / POINTER
    if check_entry(pointer) is None:
        return None
    data = read_small(root, POINTER, _MAX_POINTER)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{pointer}: cannot be read as text ({err})") from None
    return check_folder_name(text.strip(), str(pointer))


def _peek(folder: Path) -> Optional[dict]:
    """A folder's manifest as plain JSON (no verification), or None when it has no readable one.

    Never follows a link or opens a file that is not regular (a FIFO named ``manifest.json`` in a
    neighbouring folder must not block a load or a save).
    """
    try:
        m = json.loads(read_small(folder, "manifest.json", _MAX_PEEK))
    except (CheckpointError, OSError, ValueError):
        return None
    return m if isinstance(m, dict) and type(m.get("format_version")) is int else None


def _is_folder(entry: Path) -> bool:
    """A real folder (a symbolic link to one is never a checkpoint of this directory, nor removed by it)."""
    try:
        return stat.S_ISDIR(os.lstat(entry).st_mode)
    except OSError:
        return False


def published(root: Path) -> List[Published]:
    """Published checkpoints of ``root``, oldest first (by publication order, then step, then name)."""
    out = []
    if not root.is_dir():
        return out
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name == POINTER or not _is_folder(entry):
            continue
        m = _peek(entry)
        if m is None:
            continue  # not a checkpoint of ours (or unreadable): never touched
        version = split_folder_name(entry.name)[1] if m["format_version"] >= 2 else 0
        tag = m.get("tag") if isinstance(m.get("tag"), str) else entry.name
        seq = m.get("sequence") if type(m.get("sequence")) is int else 0
        step = m.get("step") if type(m.get("step")) is int else None
        out.append(Published(entry.name, tag, version, seq, step, m["format_version"]))
    return sorted(out, key=lambda p: (p.sequence, -1 if p.step is None else p.step, p.name))


def resolve(directory, tag: Optional[str] = None) -> Path:
    """The checkpoint folder for ``tag`` (its newest save), or the one ``latest`` names.

    ``tag`` may also be a folder name as ``latest`` holds it (``"best@2"``). Tags are names, not
    patterns: ``"global_step*"`` means a tag with a ``*`` in it.

    Raises:
        CheckpointError: no ``latest``; a tag or a ``latest`` that does not name one folder inside
            the directory (naming it); a folder that is a symbolic link or has no manifest.
    """
    root = Path(directory)
    folder = find(root, tag)
    if folder is None:
        if tag is None:
            raise CheckpointError(f"{root}: no '{POINTER}' file; pass a tag or point at a checkpoint folder")
        folder = root / tag
    if check_entry(folder, want_dir=True) is None or check_entry(folder / "manifest.json") is None:
        known = sorted({p.tag for p in published(root)})
        raise CheckpointError(f"{folder}: no manifest.json (not a moesaic checkpoint, or an unfinished save); "
                              f"tags in {root}: {known[:8]}")
    return folder


def find(directory, tag: Optional[str] = None) -> Optional[Path]:
    """Where ``tag`` (None: ``latest``) would load from, or None when there is no such entry (nothing verified).

    Raises:
        CheckpointError: a tag, or the content of ``latest``, that is not one folder name (naming
            it); a ``latest`` that is a link or not a regular file.
    """
    root = Path(directory)
    if tag is None:
        name = read_pointer(root)
        return None if name is None else root / name
    if not isinstance(tag, str):
        raise CheckpointError(f"{root}: tag must be a str, got {type(tag).__name__}: {tag!r}")
    check_folder_name(tag, f"{root}: tag")
    folder = _newest_of_tag(root, tag)
    if folder is not None:
        return folder
    return root / tag if os.path.lexists(root / tag) else None


def _newest_of_tag(root: Path, tag: str) -> Optional[Path]:
    base = encode_component(tag)
    best = None
    if not root.is_dir():
        return None
    for entry in root.iterdir():
        name_base, version = split_folder_name(entry.name)
        if name_base != base or not _is_folder(entry):
            continue
        m = _peek(entry)
        if m is None or m.get("tag") != tag:
            continue
        if best is None or version > best[0]:
            best = (version, entry)
    return None if best is None else best[1]


def next_folder(root: Path, tag: str) -> tuple:
    """``(folder name, sequence)`` for a new save of ``tag``: a name not in use, the next publication number."""
    existing = published(root)
    versions = [split_folder_name(e.name)[1] for e in root.iterdir()
                if split_folder_name(e.name)[0] == encode_component(tag)] if root.is_dir() else []
    version = 0 if not versions else max(versions) + 1
    sequence = 1 + max((p.sequence for p in existing), default=0)
    return folder_name(tag, version), sequence


def tidy(root: Path, keep_last: Optional[int]) -> List[str]:
    """After a publish: remove superseded saves of each tag and, with ``keep_last``, the oldest checkpoints.

    Never removes the folder ``latest`` names, nor anything without a moesaic manifest.
    Returns the removed folder names.
    """
    current = read_pointer(root)
    items = published(root)
    doomed = set()
    newest = {}
    for p in items:  # format 2 folders of the same tag: only the newest save counts
        if p.format_version >= 2 and (p.tag not in newest or p.version > newest[p.tag].version):
            newest[p.tag] = p
    doomed |= {p.name for p in items if p.format_version >= 2 and newest[p.tag].name != p.name}
    if keep_last is not None:
        alive = [p for p in items if p.name not in doomed]
        doomed |= {p.name for p in alive[:max(0, len(alive) - keep_last)]}
    doomed.discard(current)
    for name in sorted(doomed):
        durable.remove_tree(root / name)
    return sorted(doomed)


def staging_folder(root: Path, tag: str) -> Path:
    """Where a save of ``tag`` is assembled before it is published."""
    return root / f"{TRANSIENT_PREFIX}save-{encode_component(tag)}"
