"""File-system steps that survive a crash: durable writes, atomic renames, fsync'd folders.

A checkpoint is published with renames, and a rename is only as durable as the folder entry that
records it: after a power cut, a file whose data was never fsynced can come back empty, and a
rename whose parent folder was never fsynced can be undone. So every step here ends with the
fsync that makes it permanent before the next step may depend on it:

* :func:`write_file` writes chunks, fsyncs the file and returns its size and CRC-32 (computed
  over the very bytes written, so no second read); its errors (a full disk) name the file;
* :func:`fsync_tree` fsyncs every folder of a staging tree (their entries name the files);
* :func:`rename_into_place` renames a complete folder to a name that does not exist yet and
  fsyncs the parent;
* :func:`replace_file` publishes small text (the ``latest`` pointer) through a temp file:
  write, fsync, rename over the old one, fsync the folder: readers see the old or the new
  content, never a mix;
* :func:`remove_tree` first renames a folder to a ``.tmp-`` name (atomic), then deletes it, so a
  process killed while deleting never leaves a half-deleted folder that looks published.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Iterable, Tuple

from .names import TRANSIENT_PREFIX


def write_file(path: Path, chunks: Iterable) -> Tuple[int, int]:
    """Create ``path`` (it must not exist) from ``chunks`` (bytes-like), fsync it.

    Returns:
        ``(size in bytes, CRC-32 of the whole file)``.
    """
    crc, size = 0, 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    except OSError as err:
        raise _with_path(err, path) from err
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                crc = zlib.crc32(view, crc)  # zlib releases the GIL: other files are written meanwhile
                while view:  # a raw write may be partial
                    n = f.write(view)
                    view = view[n:]
                    size += n
            os.fsync(f.fileno())
    except BaseException as err:
        try:
            os.unlink(path)
        except OSError:
            pass
        if isinstance(err, OSError):  # a full disk: say which file (the write's own error names none)
            raise _with_path(err, path) from err
        raise
    return size, crc


def _with_path(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` (the same errno, so the same OSError subclass)."""
    if err.filename is not None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(path))


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (created, renamed or removed files) durable."""
    if os.name == "nt":  # pragma: no cover - folders cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every folder under ``root`` and ``root`` itself, deepest first."""
    for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(Path(w[0]).parts)):
        fsync_dir(Path(folder))


def make_dirs(path: Path, top: Path) -> None:
    """Create ``path`` and its missing parents up to ``top`` (exclusive), fsyncing each parent."""
    missing = []
    p = path
    while p != top and not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:  # another rank's writer created it meanwhile
            continue
        fsync_dir(p.parent)


def rename_into_place(src: Path, dst: Path) -> None:
    """Rename folder ``src`` to ``dst`` (which must not exist) and make the rename durable."""
    if dst.exists():
        raise FileExistsError(f"{dst} exists; refusing to rename {src} over it")
    os.rename(src, dst)
    fsync_dir(dst.parent)


def replace_file(path: Path, text: str) -> None:
    """Atomically set the content of ``path`` to ``text``: temp file, fsync, rename, fsync folder."""
    tmp = path.parent / f"{TRANSIENT_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}"
    write_file(tmp, [text.encode("utf-8")])
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Delete folder ``path``; a kill midway leaves only a ``.tmp-`` folder (removed at the next save)."""
    if path.name.startswith(TRANSIENT_PREFIX):
        shutil.rmtree(path)
        return
    doomed = path.parent / f"{TRANSIENT_PREFIX}del-{uuid.uuid4().hex[:12]}"
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


def remove_transient(root: Path) -> list:
    """Remove every ``.tmp-*`` entry of ``root`` (debris of killed saves); returns their names."""
    removed = []
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith(TRANSIENT_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    if removed:
        fsync_dir(root)
    return removed
