"""Byte corpora for ``moesaic train``: the standard library's own source by default, or a user path.

Nothing reads a whole corpus into memory: a :class:`ByteCorpus` is a list of file spans (sizes
from ``stat``), and :class:`BatchStream` samples training windows from one bounded buffer that it
refills piece by piece. The train/validation split is by file, decided by ``zlib.crc32`` of the
relative path, so it is the same on every machine and run; a single file is split by position.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_int

DEFAULT_SUFFIXES = (".txt", ".md", ".py", ".rst")
# test suites and vendored/legacy code are not what "the standard library" should teach; installed
# third-party packages would make the corpus machine-dependent (Debian calls them dist-packages)
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a file as binary
DEFAULT_BUFFER_BYTES = 4 << 20
UNIT_BYTES = 1 << 20  # big files are read (and shared between ranks) in pieces of at most 1 MiB


@dataclass(frozen=True)
class FileSpan:
    """Bytes ``[start, end)`` of the file ``path``; ``name`` is its path relative to the corpus root."""

    path: Path
    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class ByteCorpus:
    """An ordered list of file spans read as one virtual byte string, never held in memory.

    Args:
        spans: the pieces, in corpus order.
        name: shown in error messages (e.g. the data path and split).
    """

    def __init__(self, spans: Sequence[FileSpan], name: str = "corpus") -> None:
        self.spans: Tuple[FileSpan, ...] = tuple(spans)
        self.name = name
        ends = list(itertools.accumulate(span.size for span in self.spans))
        self._starts = [0] + ends[:-1]  # where each span begins in the concatenation
        self.num_bytes = ends[-1] if ends else 0

    def __len__(self) -> int:
        return len(self.spans)

    def __repr__(self) -> str:
        return f"ByteCorpus({self.name!r}, files={len(self.spans)}, num_bytes={self.num_bytes})"

    def read_into(self, index: int, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of span ``index`` from ``offset`` (relative to the span)."""
        span = self.spans[index]
        if offset < 0 or offset + len(out) > span.size:
            raise IndexError(f"read of {len(out)} bytes at {offset} is outside {span.name!r} ({span.size} bytes)")
        with open(span.path, "rb") as f:
            f.seek(span.start + offset)
            got = f.readinto(out)
        if got != len(out):  # the file shrank since the corpus was listed
            raise RuntimeError(f"{span.path} changed while training: expected {len(out)} bytes at "
                               f"{span.start + offset}, read {got}")

    def read_range(self, start: int, n: int) -> bytearray:
        """``n`` bytes from position ``start`` of the concatenated corpus (may cross files)."""
        if start < 0 or n < 0 or start + n > self.num_bytes:
            raise IndexError(f"range [{start}, {start + n}) is outside {self.name} ({self.num_bytes} bytes)")
        out = bytearray(n)
        view, done = memoryview(out), 0
        i = bisect.bisect_right(self._starts, start) - 1
        while done < n:
            while self.spans[i].size == 0 or start + done >= self._starts[i] + self.spans[i].size:
                i += 1
            offset = start + done - self._starts[i]
            take = min(n - done, self.spans[i].size - offset)
            self.read_into(i, offset, view[done:done + take])
            done += take
        return out


class CorpusSplit(NamedTuple):
    """The training and validation corpora of one data source."""

    train: ByteCorpus
    val: ByteCorpus


def _is_text(path: Path) -> bool:
    # empty, unreadable or binary (NUL in the first 8 KiB) files are skipped
    try:
        if path.stat().st_size == 0:
            return False
        with open(path, "rb") as f:
            return b"\0" not in f.read(SNIFF_BYTES)
    except OSError:
        return False


def _walk(root: Path, suffixes: Tuple[str, ...], skip_dir) -> List[Tuple[str, Path]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]
        for fname in filenames:
            if fname.endswith(suffixes):
                path = Path(dirpath, fname)
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)  # a fixed order: by relative path


def is_validation_file(relative_path: str, val_percent: int) -> bool:
    """The split rule: ``zlib.crc32(relative_path) % 100 < val_percent``."""
    return zlib.crc32(relative_path.encode("utf-8")) % 100 < val_percent


def _split_by_position(entries: List[Tuple[str, Path, int]], val_percent: int) -> Tuple[list, list]:
    # the last val_percent% of each file's bytes (at least one byte) go to validation
    train, val = [], []
    for rel, path, size in entries:
        n_val = max(1, size * val_percent // 100) if size >= 2 else 0
        if size - n_val:
            train.append(FileSpan(path, rel, 0, size - n_val))
        if n_val:
            val.append(FileSpan(path, rel, size - n_val, size))
    return train, val


def load_corpus(path: Optional[str] = None, val_percent: int = 5,
                suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> CorpusSplit:
    """List and split a data source: the stdlib's ``*.py`` (``path=None``), a text file or a folder.

    A folder contributes every file under it whose name ends with one of ``suffixes`` (hidden
    and ``__pycache__`` directories skipped). Files split by the crc32 rule; when that leaves
    one side empty (a folder of a few files) every file is split by position instead.

    Args:
        path: None for the standard library, else a file or folder.
        val_percent: percent of files (or bytes) that go to validation, 1..50.
        suffixes: file-name endings a folder's files must have.

    Returns:
        ``CorpusSplit(train, val)``.

    Raises:
        ValueError: the path does not exist, or holds no readable text file.
    """
    check_int(val_percent, "val_percent", 1, 50)
    suffixes = tuple(suffixes)
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        label = f"Python standard library at {root}"
        found = _walk(root, (".py",), lambda d: d in EXCLUDED_DIRS)
    else:
        root = Path(path).expanduser().absolute()  # ranks and later reads do not depend on the cwd
        label = f"data path {str(path)!r}"
        if not root.exists():
            raise ValueError(f"{label} does not exist")
        if root.is_file():
            found = [(root.name, root)]
        elif root.is_dir():
            found = _walk(root, suffixes, lambda d: d.startswith(".") or d == "__pycache__")
        else:
            raise ValueError(f"{label} is neither a regular file nor a folder")
    entries = [(rel, p, p.stat().st_size) for rel, p in found if _is_text(p)]
    if not entries:
        what = "is empty or binary" if root.is_file() else f"has no non-empty text file ending in {list(suffixes)}"
        raise ValueError(f"{label} {what}: nothing to train on (binary = a NUL byte in the first 8 KiB)")
    if root.is_file():
        train, val = _split_by_position(entries, val_percent)
    else:
        train = [FileSpan(p, rel, 0, size) for rel, p, size in entries if not is_validation_file(rel, val_percent)]
        val = [FileSpan(p, rel, 0, size) for rel, p, size in entries if is_validation_file(rel, val_percent)]
        if not train or not val:
            train, val = _split_by_position(entries, val_percent)
    return CorpusSplit(ByteCorpus(train, f"{label} (train)"), ByteCorpus(val, f"{label} (validation)"))


def _seed(*parts) -> int:
    # a stable 63-bit seed from (seed, rank, purpose, counter): Python's hash() may change
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _check_window(corpus: ByteCorpus, block_size: int, batch_size: int) -> None:
    check_int(block_size, "block_size", 1)
    check_int(batch_size, "batch_size", 1)
    if corpus.num_bytes < block_size + 1:
        raise ValueError(f"{corpus.name} has {corpus.num_bytes} bytes; a window needs block_size + 1 = "
                         f"{block_size + 1}: use more data or a smaller block_size")


def _windows(buf: Tensor, starts: Tensor, block_size: int) -> Tuple[Tensor, Tensor]:
    w = buf[starts[:, None] + torch.arange(block_size + 1)].long()
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchStream:
    """Endless ``(x, y)`` training batches, `(batch_size, block_size)` int64, ``y`` = ``x`` shifted by one.

    Pieces of files (at most 1 MiB; shared out round-robin between ranks when every rank gets
    at least a window) are read in a per-epoch shuffled order into a buffer of
    ``min(buffer_bytes, shard bytes)``; about one buffer's worth of random windows is drawn
    from each fill before the next. The order, the windows and the position are functions of
    ``(seed, rank)`` and a few counters, so the same seed gives the same batches and
    :meth:`state_dict` resumes exactly.

    Args:
        corpus: training corpus.
        block_size / batch_size: sequence length and sequences per batch (per process).
        seed: base seed; every rank derives its own streams from ``(seed, rank)``.
        rank / world_size: this process and the number of processes.
        buffer_bytes: memory bound of the buffer (>= block_size + 1).
    """

    def __init__(self, corpus: ByteCorpus, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        _check_window(corpus, block_size, batch_size)
        check_int(seed, "seed", 0)
        check_int(world_size, "world_size", 1)
        check_int(rank, "rank", 0, world_size - 1)
        check_int(buffer_bytes, "buffer_bytes", block_size + 1)
        self.corpus, self.block_size, self.batch_size = corpus, block_size, batch_size
        self.seed, self.rank, self.world_size, self.buffer_bytes = seed, rank, world_size, buffer_bytes
        units = [(i, s, min(s + UNIT_BYTES, span.end - span.start))
                 for i, span in enumerate(corpus.spans) for s in range(0, span.size, UNIT_BYTES)]
        shards = [units[r::world_size] for r in range(world_size)]
        # shard only if every rank gets a window, so all ranks take the same decision
        self.sharded = world_size > 1 and all(sum(e - s for _, s, e in sh) > block_size for sh in shards)
        self._units = shards[rank] if self.sharded else units
        self._fill_bytes = min(buffer_bytes, sum(e - s for _, s, e in self._units))
        self._buf = bytearray(self._fill_bytes)  # allocated once: the stream's whole data memory
        self._order_cache: Tuple[int, List[int]] = (-1, [])
        self._pos = (0, 0, 0)  # (epoch, cursor into the epoch's order, offset in that unit) of this fill
        self._fill, self._batch_in_fill = 0, 0  # fills done so far (seeds each fill's windows); batches drawn
        self._starts: Optional[Tensor] = None  # (batches, batch_size) window starts; None = not filled

    @property
    def epoch(self) -> int:
        """Passes over this rank's data begun so far (0-based)."""
        return self._pos[0]

    @property
    def buffered_bytes(self) -> int:
        """Bytes of corpus data the stream holds (its buffer): never more than ``buffer_bytes``."""
        return len(self._buf)

    def _order(self, epoch: int) -> List[int]:
        if self._order_cache[0] != epoch:
            g = torch.Generator().manual_seed(_seed(self.seed, self.rank, "order", epoch))
            self._order_cache = (epoch, torch.randperm(len(self._units), generator=g).tolist())
        return self._order_cache[1]

    def _refill(self) -> None:
        epoch, cursor, offset = self._pos
        view, done = memoryview(self._buf), 0
        while done < self._fill_bytes:  # may wrap into the next epoch: a fill is always full
            index, start, end = self._units[self._order(epoch)[cursor]]
            take = min(end - start - offset, self._fill_bytes - done)
            self.corpus.read_into(index, start + offset, view[done:done + take])
            done, offset = done + take, offset + take
            if start + offset == end:
                cursor, offset = cursor + 1, 0
                if cursor == len(self._units):
                    epoch, cursor = epoch + 1, 0
        self._next_pos = (epoch, cursor, offset)
        n_batches = max(1, round(self._fill_bytes / (self.block_size * self.batch_size)))
        g = torch.Generator().manual_seed(_seed(self.seed, self.rank, "windows", self._fill))
        self._starts = torch.randint(0, self._fill_bytes - self.block_size, (n_batches, self.batch_size), generator=g)
        self._tensor = torch.frombuffer(self._buf, dtype=torch.uint8)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> Tuple[Tensor, Tensor]:
        if self._starts is None:
            self._refill()
        if self._batch_in_fill == len(self._starts):
            self._pos, self._fill, self._batch_in_fill = self._next_pos, self._fill + 1, 0
            self._refill()
        starts = self._starts[self._batch_in_fill]
        self._batch_in_fill += 1
        return _windows(self._tensor, starts, self.block_size)

    def _signature(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "block_size": self.block_size,
                "batch_size": self.batch_size, "buffer_bytes": self.buffer_bytes,
                "corpus_files": len(self.corpus), "corpus_bytes": self.corpus.num_bytes}

    def state_dict(self) -> dict:
        """The exact position (plain ints), for checkpoints."""
        epoch, cursor, offset = self._pos
        return {**self._signature(), "epoch": epoch, "cursor": cursor, "offset": offset, "fill": self._fill,
                "batch_in_fill": self._batch_in_fill}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the position of :meth:`state_dict`; the next batches are the ones that followed.

        Raises:
            ValueError: the state is from a stream with other settings or another corpus.
        """
        for key, value in self._signature().items():
            if state.get(key) != value:
                raise ValueError(f"BatchStream state has {key}={state.get(key)!r} but this stream has {key}={value!r}; "
                                 "resume with the same data, seed, rank, world size, block and batch size")
        self._pos = (int(state["epoch"]), int(state["cursor"]), int(state["offset"]))
        self._fill, self._batch_in_fill = int(state["fill"]), int(state["batch_in_fill"])
        self._starts = None  # refilled from the saved position on the next batch


def validation_batches(corpus: ByteCorpus, block_size: int, batch_size: int,
                       max_batches: int) -> List[Tuple[Tensor, Tensor]]:
    """The same validation batches on every call: windows evenly spaced over the whole corpus.

    Args:
        corpus: validation corpus.
        block_size / batch_size: batch shape.
        max_batches: number of batches (windows = max_batches * batch_size, overlapping if the
            corpus is small).

    Returns:
        A list of ``(x, y)`` int64 `(batch_size, block_size)` pairs.
    """
    _check_window(corpus, block_size, batch_size)
    check_int(max_batches, "max_batches", 1)
    n, last = max_batches * batch_size, corpus.num_bytes - (block_size + 1)
    positions = [i * last // max(1, n - 1) for i in range(n)]
    flat = torch.frombuffer(bytearray().join(corpus.read_range(p, block_size + 1) for p in positions),
                            dtype=torch.uint8)
    starts = torch.arange(n) * (block_size + 1)
    x, y = _windows(flat, starts, block_size)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def byte_counts(corpus: ByteCorpus, max_bytes: Optional[int] = None, chunk_bytes: int = 1 << 20) -> Tensor:
    """Occurrences of each byte value, for :func:`moesaic.models.unigram_baseline_loss`.

    Args:
        corpus: the corpus to count.
        max_bytes: count about this many bytes, in evenly spaced chunks (None: everything).
        chunk_bytes: read size (the memory bound).

    Returns:
        `(256,)` int64 counts.
    """
    if max_bytes is not None:
        check_int(max_bytes, "max_bytes", 1)
    total = corpus.num_bytes
    if max_bytes is None or max_bytes >= total:
        chunks = [(pos, min(chunk_bytes, total - pos)) for pos in range(0, total, chunk_bytes)]
    else:
        size = min(chunk_bytes, max_bytes)
        n = -(-max_bytes // size)
        chunks = [(i * (total - size) // max(1, n - 1), size) for i in range(n)]
    counts = torch.zeros(256, dtype=torch.int64)
    for pos, size in chunks:
        counts += torch.bincount(torch.frombuffer(corpus.read_range(pos, size), dtype=torch.uint8), minlength=256)
    return counts
