"""Names inside a checkpoint directory: which tags are allowed, how names become file names.

Nothing a user or a checkpoint supplies is joined into a path unchecked:

* a **tag** is one path component: no separator, not ``.``/``..``, no leading ``.``
  (``.tmp-*`` entries belong to saves in progress) and not ``latest`` in any case (the
  pointer file). Tags are percent-encoded into folder names (``encode_component``), so
  spaces, ``%`` or ``@`` in a tag are harmless;
* a tag's folder is ``<encoded tag>`` and, when the tag is saved again, ``<encoded tag>@<n>``
  (n = 1, 2, ...): the new copy never has to replace the old one in place (see
  :mod:`.directory`). ``@`` never occurs in an encoded tag, so the version is unambiguous;
* a **layer name** (``expert_group_name``, any string) is encoded the same way into a folder
  under ``experts/``; the manifest maps layers and experts to files, so loading never rebuilds a
  path from a name;
* a path read back from a manifest or from ``latest`` must be relative, made of safe components.
"""

from __future__ import annotations

import hashlib
import re
from typing import Dict, Iterable, Optional, Tuple

from .errors import CheckpointError

POINTER = "latest"  # the file naming the newest checkpoint folder, as in DeepSpeed
TRANSIENT_PREFIX = ".tmp-"  # staging folders, pointer temp files, folders being deleted
MAX_COMPONENT_BYTES = 200  # below every common file-system limit (255) with room for "@<n>" and suffixes

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-+=,")
_VERSIONED = re.compile(r"^(?P<base>[^@]+)@(?P<n>[1-9][0-9]{0,8})$")


def check_tag(tag) -> str:
    """Return ``tag`` if it can name a checkpoint, else raise ValueError/TypeError saying why."""
    if not isinstance(tag, str):
        raise TypeError(f"tag must be a str, got {type(tag).__name__}")
    problem = _component_problem(tag)
    if problem is None and tag.lower() == POINTER:
        problem = f"{POINTER!r} is the name of the pointer file"
    if problem is not None:
        raise ValueError(f"tag {tag!r} is not allowed: {problem}. A tag is one folder name such as "
                         "'global_step100'")
    return tag


def _component_problem(name: str) -> Optional[str]:
    if not name:
        return "it is empty"
    if any(c in name for c in "/\\\0"):
        return "it contains a path separator or NUL"
    if name in (".", ".."):
        return "it is a relative path"
    if name.startswith("."):
        return "names starting with '.' are reserved for saves in progress"
    if any(ord(c) < 32 for c in name):
        return "it contains a control character"
    if len(name.encode("utf-8")) > MAX_COMPONENT_BYTES:
        return f"it is longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def encode_component(name: str) -> str:
    """``name`` as one safe file-name component (percent-encoding; long names end in a hash).

    ``[A-Za-z0-9_.-+=,]`` stay as they are except a leading ``.``; every other byte of the UTF-8
    form becomes ``%XX``. The result never contains ``/``, ``@`` or a leading ``.``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    out = []
    for i, b in enumerate(name.encode("utf-8")):
        out.append(chr(b) if b in _SAFE and not (i == 0 and b == ord(".")) else f"%{b:02X}")
    encoded = "".join(out) or "%00"  # "" cannot be a file name
    if len(encoded) > MAX_COMPONENT_BYTES:  # the manifest keeps the real name; the file name only has to be unique
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
        encoded = f"{encoded[:MAX_COMPONENT_BYTES - 17]}~{digest}"
    return encoded


def layer_folders(layer_names: Iterable[str]) -> Dict[str, str]:
    """``{layer name: folder name}``, unique even on case-insensitive file systems."""
    names = sorted(set(layer_names))
    folders = {n: encode_component(n) for n in names}
    by_folded: Dict[str, list] = {}
    for n, f in folders.items():
        by_folded.setdefault(f.lower(), []).append(n)
    for clash in by_folded.values():
        if len(clash) > 1:  # "FFN" and "ffn" would share a folder on macOS or Windows
            for n in clash:
                folders[n] = f"{folders[n][:MAX_COMPONENT_BYTES - 17]}~{hashlib.sha256(n.encode()).hexdigest()[:16]}"
    return folders


def folder_name(tag: str, version: int) -> str:
    """The folder of version ``version`` of ``tag`` (0 for the first save of the tag)."""
    base = encode_component(tag)
    return base if version == 0 else f"{base}@{version}"


def split_folder_name(name: str) -> Tuple[str, int]:
    """``"best@3"`` -> ``("best", 3)``; ``"best"`` -> ``("best", 0)`` (the encoded tag and version)."""
    m = _VERSIONED.match(name)
    if m is not None:
        return m.group("base"), int(m.group("n"))
    return name, 0


def check_folder_name(name, what: str) -> str:
    """A folder name read from ``latest`` or given as a tag: one safe component, else CheckpointError."""
    if not isinstance(name, str):
        raise CheckpointError(f"{what}: expected a folder name, got {type(name).__name__}")
    problem = _component_problem(name)
    if problem is None and name.lower() == POINTER:
        problem = f"{POINTER!r} is the pointer file itself"
    if problem is not None:
        raise CheckpointError(f"{what}: {name!r} does not name a checkpoint folder inside the checkpoint "
                              f"directory ({problem})")
    return name


def check_relative_path(rel, what: str) -> str:
    """A file path from a manifest: relative, '/'-separated safe components, no '..'."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{what}: file path {rel!r} is not a non-empty string")
    for part in rel.split("/"):
        problem = _component_problem(part)
        if problem is not None:
            raise CheckpointError(f"{what}: file path {rel!r} is not a plain path inside the checkpoint folder "
                                  f"(component {part!r}: {problem})")
    return rel
