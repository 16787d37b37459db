"""The two file kinds of a checkpoint, written with their checksum and read back verified.

**Tensor files** are safetensors files (readable by ``safetensors.torch.load_file``), written
here directly: the header is built once, the tensors' bytes go to the file from their own memory
(no copy), and the CRC-32 of the whole file (8-byte length, JSON header, data) is taken over the
same buffers while they are written. Tensors are ordered by element size, largest first, so every
tensor starts at a multiple of its element size and loads as a zero-copy view.

**JSON files** hold everything that is not a tensor (engine counters, optimizer settings, client
state, Python's RNG); ``NaN``/``Infinity`` are allowed, as Python's ``json`` writes them.

Every read is verified before its content is used: the size first (a truncated file fails
before it is read), then the CRC-32 of all bytes read (reused for parsing, not read twice), then
the structure (the safetensors header: known dtypes, shapes that match byte ranges, ranges that
tile the data exactly; JSON that parses). A tensor file's names, dtypes and shapes must also equal
what the manifest recorded. Every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Dict

import torch
from torch import Tensor

from .durable import write_file
from .errors import CheckpointError
from .safeio import open_file

DTYPES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
_BY_NAME = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit
_MAX_BYTES = 1 << 63  # torch indexes bytes and strides with int64


# --- tensor files -------------------------------------------------------------------------------

def tensor_meta(tensors: Dict[str, Tensor]) -> Dict[str, Dict[str, Any]]:
    """``{name: {"dtype": "F32", "shape": [..]}}``: what the manifest records for a tensor file."""
    return {n: {"dtype": _dtype_name(n, t), "shape": list(t.shape)} for n, t in sorted(tensors.items())}


def _dtype_name(name: str, t: Tensor) -> str:
    try:
        return DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which a checkpoint cannot store; "
                        f"allowed: {sorted(str(d) for d in DTYPES)}") from None


def write_tensors(path: Path, tensors: Dict[str, Tensor]) -> Dict[str, Any]:
    """Write ``tensors`` as a safetensors file, fsynced.

    Returns:
        the manifest entry ``{"bytes", "crc32", "tensors": tensor_meta(tensors)}``.
    """
    flat = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise TypeError(f"tensor files map str names to tensors; got {name!r}: {type(t).__name__}")
        _dtype_name(name, t)
        flat[name] = t.detach().to("cpu").contiguous()
    order = sorted(flat, key=lambda n: (-flat[n].element_size(), n))  # keeps every tensor aligned
    header: Dict[str, Any] = {}
    offset = 0
    for name in order:
        t = flat[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned
    chunks = [struct.pack("<Q", len(text)), text]
    chunks += [flat[n].reshape(-1).view(torch.uint8).numpy() for n in order if flat[n].numel()]
    size, crc = write_file(path, chunks)
    return {"bytes": size, "crc32": crc, "tensors": tensor_meta(flat)}


_MMAP_FROM = 1 << 20  # files from 1 MiB on are mapped, not copied: the page cache is the buffer


def read_verified_bytes(folder: Path, rel: str, entry: Dict[str, Any], check_crc: bool = True):
    """All bytes of ``folder/rel`` (a buffer) after checking its size and (``check_crc``) whole-file CRC-32.

    The file is opened by :func:`.safeio.open_file`: a symbolic link on the way or a file that is
    not a regular file (a FIFO would block the read) is refused before anything is read.

    Large files are memory-mapped copy-on-write: checksumming and parsing touch the page cache
    directly, no anonymous memory is allocated and zero-filled, and writes to tensors made from the
    buffer never reach the file. Small files are read into a bytearray.
    """
    path = folder / rel
    expected = entry["bytes"]
    f = os.fdopen(open_file(folder, rel), "rb", buffering=0)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != expected:
            raise CheckpointError(f"{path}: {size} bytes but the manifest recorded {expected}; the file is "
                                  f"{'truncated' if size < expected else 'longer than written'} or replaced")
        if size >= _MMAP_FROM:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if hasattr(buf, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
                buf.madvise(mmap.MADV_WILLNEED)  # start reading ahead while the checksum walks the pages
        else:
            buf = bytearray(size)
            view, got = memoryview(buf), 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{path}: ended after {got} of {size} bytes while reading; the file is "
                                          "truncated")
                got += n
    if check_crc:
        crc = zlib.crc32(buf)
        if crc != entry["crc32"]:
            raise CheckpointError(f"{path}: checksum mismatch (CRC-32 {crc:#010x}, manifest {entry['crc32']:#010x}); "
                                  "the file is corrupted or was edited")
    return buf


def parse_tensors(buf, path: Path) -> Dict[str, Tensor]:
    """The tensors of a safetensors file held in ``buf``, as views of it; strict about the format."""
    if len(buf) < 8:
        raise CheckpointError(f"{path}: {len(buf)} bytes is too short for a safetensors file")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > min(_MAX_HEADER, len(buf) - 8):
        raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file ({len(buf)} bytes)")
    try:
        header = json.loads(bytes(memoryview(buf)[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_len = 8 + n, len(buf) - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: safetensors entry {name!r} is malformed: {info!r}")
        dtype = _BY_NAME.get(info["dtype"])
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {info['dtype']!r}")
        if (not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _MAX_BYTES for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape {shape!r} or offsets {offsets!r}")
        size = torch.empty((), dtype=dtype).element_size()
        if math.prod(max(d, 1) for d in shape) * size >= _MAX_BYTES:  # even with a 0 dim: torch's strides overflow
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, which no tensor can have (its strides "
                                  "exceed 2**63 bytes)")
        begin, end = offsets
        nbytes = math.prod(shape) * size
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) does not fit its byte range "
                                  f"{offsets} (data holds {data_len} bytes)")
        spans.append((begin, end, name, dtype, shape))
    spans.sort()
    pos = 0
    for begin, end, name, _, _ in spans:  # the byte ranges must tile the data: no overlap, no hidden bytes
        if begin != pos:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin}, expected {pos} "
                                  "(overlapping or unaccounted data)")
        pos = end
    if pos != data_len:
        raise CheckpointError(f"{path}: {data_len - pos} bytes after the last tensor are not accounted for")
    whole = torch.frombuffer(buf, dtype=torch.uint8)  # len(buf) >= 8 here
    out = {}
    for begin, end, name, dtype, shape in spans:
        raw = whole[start + begin:start + end]
        if raw.numel() == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        size = raw.new_empty((), dtype=dtype).element_size()
        if (start + begin) % size or raw.data_ptr() % size:
            raw = raw.clone()  # unaligned (a file from another writer): copy once
        out[name] = raw.view(dtype).reshape(shape)
    return out


def check_tensor_meta(path: Path, tensors: Dict[str, Tensor], recorded: Dict[str, Any]) -> None:
    """The file's names, dtypes and shapes must be the ones the manifest recorded."""
    got = tensor_meta(tensors)
    if got == recorded:
        return
    missing, extra = sorted(set(recorded) - set(got)), sorted(set(got) - set(recorded))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors differ from the manifest (missing {missing[:4]}, unexpected "
                              f"{extra[:4]})")
    for name in sorted(got):
        if got[name] != recorded[name]:
            raise CheckpointError(f"{path}: tensor {name!r} is {got[name]['dtype']} {got[name]['shape']} in the file "
                                  f"but {recorded[name]['dtype']} {recorded[name]['shape']} in the manifest")


def read_tensors(folder: Path, rel: str, entry: Dict[str, Any]) -> Dict[str, Tensor]:
    """A verified tensor file: size, whole-file CRC-32, header structure, names/dtypes/shapes."""
    path = folder / rel
    tensors = parse_tensors(read_verified_bytes(folder, rel, entry), path)
    check_tensor_meta(path, tensors, entry["tensors"])
    return tensors


# --- JSON files ---------------------------------------------------------------------------------

def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")


def write_json(path: Path, obj: Any) -> Dict[str, int]:
    """Write ``obj`` as JSON, fsynced; returns the manifest entry ``{"bytes", "crc32"}``."""
    size, crc = write_file(path, [encode_json(obj)])
    return {"bytes": size, "crc32": crc}


def parse_json(data, path: Path) -> Any:
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or corrupted") from None


def read_json(folder: Path, rel: str, entry: Dict[str, Any]) -> Any:
    """A verified JSON file (size and CRC-32 from ``entry``)."""
    return parse_json(read_verified_bytes(folder, rel, entry), folder / rel)


def tensors_crc32(tensors: Dict[str, Tensor]) -> int:
    """Format 1's checksum: CRC-32 of names and raw bytes in name order (not the file)."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        crc = zlib.crc32(name.encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def read_v1_tensors(folder: Path, rel: str, entry: Dict[str, Any]) -> Dict[str, Tensor]:
    """A format-1 tensor file: size, structure, and the CRC-32 of its tensors."""
    path = folder / rel
    tensors = parse_tensors(read_verified_bytes(folder, rel, entry, check_crc=False), path)
    if tensors_crc32(tensors) != entry["tensors_crc32"]:
        raise CheckpointError(f"{path}: checksum mismatch (CRC-32 of its tensors); the file is corrupted")
    return tensors
