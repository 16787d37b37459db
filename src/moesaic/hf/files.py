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
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype names -> torch
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


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
    data = size - 8 - n
    end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    if end > data:
        raise ValueError(f"{path}: truncated: its tensors need {end} bytes of data but the file holds {data} "
                         f"(an interrupted download or copy; fetch the file again)")
    for k, v in entries.items():
        if v.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: tensor {k!r} has dtype {v.get('dtype')!r}; moesaic.hf reads "
                             f"{sorted(_DTYPES)} (quantized checkpoints are not supported)")
    return entries


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
        from safetensors import safe_open

        path = self._file_of[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        handle = self._open[path]
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows[0]:rows[1]]


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


def total_size(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
