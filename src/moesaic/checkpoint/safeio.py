"""Opening a file inside a checkpoint: regular files only, no symbolic links, never blocking.

A checkpoint folder is data from disk, possibly from someone else's job, so its entries are not
trusted to be what their names say:

* a **symbolic link** anywhere below the checkpoint directory (the ``latest`` pointer, a tag's
  folder, ``experts/``, a layer's folder, any file) is refused: followed, it would load data from
  outside the folder the manifest describes. The directory a caller passes may itself be a link
  (the caller chose it);
* a **non-regular file** (a FIFO, a socket, a device, a folder) in place of a file is refused
  *before it is opened*: opening a FIFO for reading blocks until a writer appears, and reading a
  device never ends.

Each component is checked with ``lstat`` (through a folder descriptor where the platform has
``dir_fd``, so a component swapped for a link between the check and the open is caught by
``O_NOFOLLOW``), and the file is opened with ``O_NONBLOCK`` and checked again with ``fstat``: the
open itself can never block.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional

from .errors import CheckpointError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_BINARY", 0)
_DIR_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FD = os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd and bool(_NOFOLLOW)


def kind_of(mode: int) -> str:
    """What a file-system entry is, in words (for messages)."""
    for test, word in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return word
    return "not a regular file"


def _refuse(path: Path, mode: int, want: str) -> CheckpointError:
    if stat.S_ISLNK(mode):
        return CheckpointError(f"{path}: is a symbolic link; a checkpoint may not contain links (they could load "
                               "data from outside it). Copy the target into the checkpoint instead")
    return CheckpointError(f"{path}: is {kind_of(mode)}, expected {want}; refused without opening it")


def check_entry(path: Path, want_dir: bool = False) -> Optional[os.stat_result]:
    """``lstat`` of ``path`` if it is a regular file (or, ``want_dir``, a folder) and not a link; None if missing."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not ok:
        raise _refuse(path, st.st_mode, "a folder" if want_dir else "a regular file")
    return st


def open_file(folder: Path, rel: str, missing: str = "file missing from the checkpoint") -> int:
    """A read-only descriptor of ``folder/rel`` after checking every component below ``folder``.

    ``rel`` is ``/``-separated (a manifest path, already checked by :func:`.names.check_relative_path`).
    The caller closes the descriptor.

    Raises:
        CheckpointError: naming ``folder/rel`` when it is missing (``missing`` says how), is or
            passes through a symbolic link, or is not a regular file.
    """
    path = folder / rel
    parts = rel.split("/")
    try:
        if not _DIR_FD:  # pragma: no cover - platforms without dir_fd / O_NOFOLLOW (Windows)
            for i in range(1, len(parts)):
                if check_entry(folder.joinpath(*parts[:i]), want_dir=True) is None:
                    raise FileNotFoundError(path)
            st = check_entry(path)
            if st is None:
                raise FileNotFoundError(path)
            fd = os.open(path, _FILE_FLAGS)
        else:
            fd = _open_below(folder, parts, path)
            st = None
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{path}: {missing}") from None
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be opened ({err.strerror})") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (st is not None and (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)):
            raise CheckpointError(f"{path}: changed while it was being opened (now {kind_of(now.st_mode)}); refused")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_below(folder: Path, parts, path: Path) -> int:
    """Walk ``parts`` from ``folder`` by descriptor: every folder and the file ``lstat``-checked, then opened."""
    dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            st = os.stat(part, dir_fd=dir_fd, follow_symlinks=False)  # FileNotFoundError: missing
            ok = stat.S_ISREG(st.st_mode) if last else stat.S_ISDIR(st.st_mode)
            if not ok:
                raise _refuse(folder.joinpath(*parts[:i + 1]), st.st_mode, "a regular file" if last else "a folder")
            try:
                fd = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as err:
                if err.errno != errno.ELOOP:
                    raise
                raise CheckpointError(f"{folder.joinpath(*parts[:i + 1])}: became a symbolic link while it was "
                                      "being opened; refused") from None
            if last:
                now = os.fstat(fd)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)
                    raise CheckpointError(f"{path}: changed while it was being opened; refused")
                return fd
            os.close(dir_fd)
            dir_fd = fd
    finally:
        try:
            os.close(dir_fd)
        except OSError:
            pass
    raise AssertionError("unreachable: parts is never empty")  # pragma: no cover


def read_small(folder: Path, rel: str, limit: int, missing: str = "file missing from the checkpoint") -> bytes:
    """All bytes of a small file (``latest``, ``manifest.json``), opened by :func:`open_file`; at most ``limit + 1``."""
    fd = open_file(folder, rel, missing)
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read(limit + 1)
        except OSError as err:
            raise CheckpointError(f"{folder / rel}: cannot be read ({err.strerror})") from None
