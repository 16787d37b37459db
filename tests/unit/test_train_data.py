"""Byte corpora and batch streams: the stdlib corpus, the split, determinism, exact resume, bounded memory."""

import json
import random
import tracemalloc
import zlib

import pytest
import torch

from moesaic.train.data import (EXCLUDED_DIRS, BatchStream, ByteCorpus, byte_counts, is_validation_file,
                                load_corpus, validation_batches)


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus()


@pytest.fixture
def folder(tmp_path):
    """A few text files (about 6 KB) plus things that must be skipped."""
    rng = random.Random(0)
    for i in range(12):
        words = " ".join(rng.choice(["def", "return", "self", "x", "(", ")", ":"]) for _ in range(rng.randint(20, 200)))
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i}\n{words}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.md").write_text("# notes\n" * 50)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0\0")  # wrong suffix
    (tmp_path / "blob.txt").write_bytes(b"abc\0def")  # binary: NUL byte
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("skip me")
    return tmp_path


def take(stream, n):
    return [next(stream) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_stdlib_corpus_found_and_filtered(stdlib):
    train, val = stdlib
    assert train.num_bytes > 1_000_000 and val.num_bytes > 10_000
    names = [s.name for s in train.spans]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert not any(part in EXCLUDED_DIRS for n in names for part in n.split("/")[:-1])
    assert train.num_bytes == sum(s.path.stat().st_size for s in train.spans)


def test_split_is_deterministic_and_disjoint(stdlib):
    train, val = stdlib
    again = load_corpus()
    assert [s.name for s in again.val.spans] == [s.name for s in val.spans]
    assert not {s.name for s in train.spans} & {s.name for s in val.spans}
    assert all(zlib.crc32(s.name.encode()) % 100 < 5 for s in val.spans)
    assert not any(is_validation_file(s.name, 5) for s in train.spans)
    assert len(load_corpus(val_percent=20).val) > len(val)


def test_same_seed_same_batches_and_shapes(stdlib):
    a = take(BatchStream(stdlib.train, 32, 4, seed=7, buffer_bytes=1 << 16), 5)
    b = take(BatchStream(stdlib.train, 32, 4, seed=7, buffer_bytes=1 << 16), 5)
    c = take(BatchStream(stdlib.train, 32, 4, seed=8, buffer_bytes=1 << 16), 5)
    assert same(a, b) and not same(a, c)
    x, y = a[0]
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_rank_streams_differ_and_shard_the_data(stdlib):
    r0 = BatchStream(stdlib.train, 32, 4, seed=7, rank=0, world_size=2, buffer_bytes=1 << 16)
    r1 = BatchStream(stdlib.train, 32, 4, seed=7, rank=1, world_size=2, buffer_bytes=1 << 16)
    assert not same(take(r0, 3), take(r1, 3))
    assert r0.sharded and not set(r0._units) & set(r1._units)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 1\], got 2"):
        BatchStream(stdlib.train, 32, 4, seed=7, rank=2, world_size=2)


@pytest.mark.parametrize("buffer_bytes", [1000, 1 << 20])
@pytest.mark.parametrize("stop", [0, 1, 7, 16, 40])  # 16 batches per 1000-byte fill
def test_state_dict_resume_is_exact(folder, buffer_bytes, stop):
    # a ~6 KB corpus with a 1000-byte buffer: resumes land mid-fill, at fill ends and in later epochs
    train = load_corpus(str(folder)).train
    stream = BatchStream(train, 16, 4, seed=3, rank=1, world_size=2, buffer_bytes=buffer_bytes)
    take(stream, stop)
    state = json.loads(json.dumps(stream.state_dict()))  # plain ints: survives JSON
    expected = take(stream, 100)
    resumed = BatchStream(train, 16, 4, seed=3, rank=1, world_size=2, buffer_bytes=buffer_bytes)
    resumed.load_state_dict(state)
    assert same(take(resumed, 100), expected)
    if buffer_bytes == 1000:
        assert stream.epoch >= 2  # the stream cycled over epochs


def test_load_state_dict_rejects_other_settings(folder):
    train = load_corpus(str(folder)).train
    state = BatchStream(train, 16, 4, seed=3).state_dict()
    with pytest.raises(ValueError, match="BatchStream state has seed=3 but this stream has seed=4"):
        BatchStream(train, 16, 4, seed=4).load_state_dict(state)


def test_memory_is_bounded_by_the_buffer(stdlib, monkeypatch):
    reads = []
    original = ByteCorpus.read_into

    def spy(self, index, offset, out):
        reads.append(len(out))
        return original(self, index, offset, out)

    monkeypatch.setattr(ByteCorpus, "read_into", spy)
    stream = BatchStream(stdlib.train, 64, 8, seed=1, buffer_bytes=32 << 10)
    tracemalloc.start()
    take(stream, 400)  # ~6 fills of 32 KiB
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert stream.buffered_bytes == 32 << 10 and stream._fill >= 5
    assert max(reads) <= 32 << 10 and sum(reads) > 5 * (32 << 10)
    assert peak < 1 << 20  # Python-side allocations stay far below the 11 MB corpus


def test_validation_batches_are_deterministic(stdlib):
    a = validation_batches(stdlib.val, 64, 4, 3)
    b = validation_batches(stdlib.val, 64, 4, 3)
    assert len(a) == 3 and same(a, b)
    x, y = a[0]
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    first = stdlib.val.read_range(0, 65)
    assert x[0].tolist() == list(first[:64])  # windows are evenly spaced from the start


def test_user_folder(folder):
    train, val = load_corpus(str(folder))
    names = sorted(s.name for s in train.spans + val.spans)
    assert "sub/notes.md" in names and "blob.txt" not in names and "empty.txt" not in names
    assert not any(n.startswith(".hidden") or n.endswith(".png") for n in names)
    assert [s.name for s in load_corpus(str(folder), suffixes=(".md",)).train.spans] == ["sub/notes.md"]


def test_user_file_split_by_position(tmp_path):
    path = tmp_path / "book.txt"
    data = bytes(range(32, 127)) * 20  # 1900 bytes
    path.write_bytes(data)
    train, val = load_corpus(str(path), val_percent=10)
    assert train.num_bytes == 1710 and val.num_bytes == 190
    assert val.read_range(0, 190) == data[-190:] and train.read_range(0, 1710) == data[:1710]


def test_byte_counts(folder):
    train = load_corpus(str(folder)).train
    data = b"".join(s.path.read_bytes()[s.start:s.end] for s in train.spans)
    expected = torch.bincount(torch.tensor(list(data)), minlength=256)
    assert torch.equal(byte_counts(train, chunk_bytes=100), expected)
    sampled = byte_counts(train, max_bytes=1000, chunk_bytes=100)
    assert sampled.sum() == 1000


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data path '.*nope' does not exist"):
        load_corpus(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"data path '.*empty' has no non-empty text file ending in"):
        load_corpus(str(empty))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.txt").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"data path '.*binary' has no non-empty text file"):
        load_corpus(str(binary))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=r"data path '.*blank.txt' is empty or binary"):
        load_corpus(str(tmp_path / "blank.txt"))
    (tmp_path / "short.txt").write_text("x" * 100)
    short = load_corpus(str(tmp_path / "short.txt"))
    with pytest.raises(ValueError, match=r"has 5 bytes; a window needs block_size \+ 1 = 17"):
        validation_batches(short.val, 16, 2, 1)
    with pytest.raises(ValueError, match=r"val_percent must be an int in \[1, 50\]"):
        load_corpus(val_percent=0)
