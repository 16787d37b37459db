"""Reading and writing the tensors of a Hugging Face model folder (``config.json`` + safetensors).

:class:`TensorSource` is what the converter reads tensors from: a folder's safetensors files
(:class:`FolderSource`: the header of every file is checked against the file's size first, so a
truncated download is an error naming the file, never a half-loaded model; tensors are read one
at a time, and an expert-parallel rank reads only its experts' tensors, or its rows of a stacked
one) or the state dict of a model already in memory (:class:`StateDictSource`).

:func:`write_folder` writes tensors the way ``save_pretrained`` does: ``model.safetensors``, or
shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` when several
ranks write their own part.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype names -> torch
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in _DTYPES.items()}


class TensorSource:
    """Named tensors to convert: shapes without reading, tensors (or their first-dim rows) on demand."""

    def keys(self) -> List[str]:
        raise NotImplementedError

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def where(self, key: str) -> str:
        """Where ``key`` lives, for messages."""
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str, rows: Optional[Tuple[int, int]] = None) -> Tensor:
        """The tensor ``key`` (only rows ``[lo, hi)`` of dim 0 when ``rows`` is given)."""
        raise NotImplementedError


class StateDictSource(TensorSource):
    """The tensors of a state dict (a model already in memory)."""

    def __init__(self, tensors: Mapping[str, Tensor], what: str = "the model's state dict") -> None:
        self._tensors = dict(tensors)
        self._what = what

    def keys(self) -> List[str]:
        return list(self._tensors)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def where(self, key: str) -> str:
        return self._what

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str, rows: Optional[Tuple[int, int]] = None) -> Tensor:
        t = self._tensors[key].detach()
        return t if rows is None else t[rows[0]:rows[1]]


def read_header(path: Path) -> Dict[str, dict]:
    """The tensor entries of a safetensors file, checked against the file's size (truncation, corruption)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes; a safetensors file starts with an 8-byte "
                             "header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: truncated or not a safetensors file: its header claims {n} bytes but the file "
                             f"holds {size - 8} after the length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for k, v in entries.items():
        _check_entry(path, k, v)
    data = size - 8 - n
    end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    if end > data:
        raise ValueError(f"{path}: truncated: its tensors need {end} bytes of data but the file holds {data} "
                         f"(an interrupted download or copy; fetch the file again)")
    _check_layout(path, entries, data)
    return entries


def _check_entry(path: Path, key: str, entry) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, offsets spanning exactly its bytes.

    safetensors refuses an inconsistent entry too, but with a message naming neither the file nor
    the tensor; a header that lies about a tensor's dtype or shape is caught here instead.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: corrupt safetensors header: the entry of tensor {key!r} is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise ValueError(f"{path}: tensor {key!r} has dtype {dtype!r}; moesaic.hf reads "
                         f"{sorted(_DTYPES)} (quantized checkpoints are not supported)")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise ValueError(f"{path}: corrupt safetensors header: tensor {key!r} has shape {shape!r} (expected a list "
                         "of non-negative integers)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise ValueError(f"{path}: corrupt safetensors header: tensor {key!r} has data_offsets {offsets!r} (expected "
                         "[begin, end] with 0 <= begin <= end)")
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{path}: corrupt safetensors header: tensor {key!r} is declared {dtype} of shape "
                         f"{tuple(shape)} ({nbytes} bytes) but its data_offsets {offsets} span "
                         f"{offsets[1] - offsets[0]} bytes (the header's dtype or shape is wrong)")


def _check_layout(path: Path, entries: Dict[str, dict], data: int) -> None:
    """The tensors' byte ranges tile the data section, as safetensors requires (no overlap, no gap)."""
    pos, prev = 0, None
    for key, entry in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin != pos:
            what = f"overlaps tensor {prev!r}" if begin < pos else f"leaves {begin - pos} bytes unused before it"
            raise ValueError(f"{path}: corrupt safetensors header: tensor {key!r} at bytes [{begin}, {end}) {what}")
        pos, prev = end, key
    if pos != data:
        raise ValueError(f"{path}: corrupt safetensors file: {data - pos} bytes after the last tensor's data "
                         "(a header that does not describe the file)")


def _is_size(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 63


class FolderSource(TensorSource):
    """The safetensors tensors of a Hugging Face model folder (see module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        files = _weight_files(folder)
        self._file_of: Dict[str, Path] = {}
        self._entries: Dict[str, dict] = {}
        index = folder / INDEX_NAME
        listed: Optional[Dict[str, str]] = None
        if index.exists():
            try:
                listed = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (expected a JSON object with a 'weight_map'): "
                                 f"{e}") from None
        for path in files:
            for key, entry in read_header(path).items():
                if key in self._file_of:
                    raise ValueError(f"tensor {key!r} is stored twice: in {self._file_of[key]} and in {path}")
                self._file_of[key] = path
                self._entries[key] = entry
        if listed is not None:
            for key, name in listed.items():
                if key not in self._file_of:
                    raise ValueError(f"{index} lists tensor {key!r} in {name}, which does not hold it "
                                     f"(missing or truncated shard?)")
                if self._file_of[key].name != name:
                    raise ValueError(f"{index} lists tensor {key!r} in {name}, but it is in {self._file_of[key].name}")
            extra = sorted(set(self._file_of) - set(listed))
            if extra:
                raise ValueError(f"{self._file_of[extra[0]]} holds tensor {extra[0]!r}, which {index} does not list")
        self._open: Dict[Path, object] = {}

    def keys(self) -> List[str]:
        return list(self._file_of)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._entries[key]["dtype"]]

    def where(self, key: str) -> str:
        return str(self._file_of[key])

    def get(self, key: str, rows: Optional[Tuple[int, int]] = None) -> Tensor:
        from safetensors import SafetensorError, safe_open

        path = self._file_of[key]
        try:
            if path not in self._open:
                self._open[path] = safe_open(str(path), framework="pt")
            handle = self._open[path]
            if rows is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[rows[0]:rows[1]]
        except (SafetensorError, OSError, RuntimeError) as e:  # safetensors' own messages name neither
            raise ValueError(f"{path}: cannot read tensor {key!r}: {e}") from e


def _weight_files(folder: Path) -> List[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        raise ValueError(f"{folder}: no *.safetensors weights found (files there: {others or 'none of weights'}); "
                         "moesaic.hf reads safetensors checkpoints only (convert .bin files with "
                         "transformers' save_pretrained(safe_serialization=True))")
    return files


def open_folder(path) -> Tuple[Path, dict]:
    """Check that ``path`` is a Hugging Face model folder; returns it and its raw ``config.json``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path_or_model must be a folder path or a transformers PreTrainedModel, got "
                        f"{type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a Hugging Face model folder (no such directory); expected a folder with "
                         "config.json and *.safetensors, as save_pretrained writes (no download: this takes local "
                         "folders only)")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder}: not a Hugging Face model folder: no config.json (files: "
                         f"{sorted(p.name for p in folder.iterdir())[:10]})")
    try:
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{config}: no 'model_type' key; a transformers config names its architecture there")
    return folder, raw


def warn_custom_code(raw: dict, where) -> None:
    """Say so when a config asks for the folder's own code (``auto_map``): moesaic never runs it.

    Every ``transformers`` call of moesaic passes ``trust_remote_code=False``, so the model (or
    tokenizer) is built from ``transformers``' own classes for its ``model_type``; without this
    line a user would not know the folder's ``modeling_*.py`` was not what ran.
    """
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    if auto_map:
        from .families import describe_auto_map

        warnings.warn(f"{where}: auto_map asks to run the folder's own code ({describe_auto_map(auto_map)}); "
                      "moesaic never runs a model folder's code (trust_remote_code=False): transformers' own "
                      f"classes for model_type={raw.get('model_type')!r} are used instead", UserWarning, stacklevel=3)


def write_folder(out_dir: Path, tensors: Dict[str, Tensor], *, shard: Optional[Tuple[int, int]] = None,
                 all_keys: Optional[Dict[str, int]] = None) -> None:
    """Write ``tensors`` as ``save_pretrained`` does.

    Args:
        out_dir: the folder (created).
        tensors: name -> tensor (contiguous copies are written; views are fine).
        shard: ``(index, count)`` when this call writes one of ``count`` shards; None for one file.
        all_keys: with ``shard`` on the writer of the index: every key of the model -> its shard index.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().contiguous() for k, v in tensors.items()}
    if shard is None:
        save_file(data, str(out_dir / SAFE_NAME), metadata={"format": "pt"})
        return
    i, count = shard
    save_file(data, str(out_dir / shard_name(i, count)), metadata={"format": "pt"})
    if all_keys is not None:
        index = {"metadata": {}, "weight_map": {k: shard_name(s, count) for k, s in sorted(all_keys.items())}}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"
