"""One rank's RNG states and client state, stored without pickle.

A checkpoint must never run code when loaded, so nothing here is pickled:

* RNG states: torch's (and CUDA's) are byte tensors, stored in the rank's tensor file; Python's
  ``random`` state is three plain values, stored as JSON.
* ``client_state`` (the user's dict: data position, history...) is stored as JSON. Tensors in it
  go to the rank's tensor file, with their place in the structure recorded; tuples are recorded
  as such so they come back as tuples. Anything else (a NumPy number, a set, a custom object, a
  non-str dict key) is refused at save with the key path and the type, before anything is
  written: JSON would otherwise change its type silently.

Tensors in ``client_state`` come back on the CPU.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import Tensor

from .errors import CheckpointError

Path_ = List[Union[str, int]]
_LEAVES = (str, int, float, bool, type(None))


def _where(path: Path_) -> str:
    return "client_state" + "".join(f"[{p!r}]" for p in path)


def encode_client_state(obj: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """``(json part, tensors)`` for ``client_state``; TypeError naming the key of a value JSON cannot hold."""
    if not isinstance(obj, dict):
        raise TypeError(f"client_state must be a dict, got {type(obj).__name__}")
    tensors: Dict[str, Tensor] = {}
    tensor_paths: Dict[str, Path_] = {}
    tuple_paths: List[Path_] = []

    def walk(x, path: Path_):
        if type(x) in _LEAVES:
            return x
        if isinstance(x, Tensor):
            key = f"client/{len(tensors)}"
            tensors[key] = x.detach().cpu()
            tensor_paths[key] = list(path)
            return None
        if type(x) is dict:
            out = {}
            for k, v in x.items():
                if type(k) is not str:
                    raise TypeError(f"{_where(path)} has the key {k!r} of type {type(k).__name__}; checkpoint "
                                    "client_state dict keys must be str (it is stored as JSON)")
                out[k] = walk(v, path + [k])
            return out
        if type(x) in (list, tuple):
            if type(x) is tuple:
                tuple_paths.append(list(path))
            return [walk(v, path + [i]) for i, v in enumerate(x)]
        raise TypeError(f"{_where(path)} is a {type(x).__module__}.{type(x).__qualname__}; checkpoint client_state "
                        "holds dict (str keys), list, tuple, str, int, float, bool, None and torch.Tensor (it is "
                        "stored as JSON and safetensors, never pickled); convert it, e.g. with int(), float() "
                        "or .tolist()")

    value = walk(obj, [])
    return {"value": value, "tensors": tensor_paths, "tuples": tuple_paths}, tensors


def decode_client_state(part: Any, tensors: Dict[str, Tensor], file: Path) -> Dict[str, Any]:
    """Inverse of :func:`encode_client_state` (checks the structure; CheckpointError naming ``file``)."""
    if not isinstance(part, dict) or set(part) != {"value", "tensors", "tuples"} or not isinstance(part["value"], dict):
        raise CheckpointError(f"{file}: client_state is malformed")
    root = {"": part["value"]}

    def locate(path, what):
        if not isinstance(path, list) or not all(type(p) in (str, int) for p in path):
            raise CheckpointError(f"{file}: client_state {what} path {path!r} is malformed")
        node, key = root, ""
        for p in path:
            node = node[key]
            ok = (type(p) is str and isinstance(node, dict) and p in node) or (
                type(p) is int and isinstance(node, list) and 0 <= p < len(node))
            if not ok:
                raise CheckpointError(f"{file}: client_state {what} path {path!r} does not exist")
            key = p
        return node, key

    if not isinstance(part["tensors"], dict) or not isinstance(part["tuples"], list):
        raise CheckpointError(f"{file}: client_state is malformed")
    for key, path in part["tensors"].items():
        if key not in tensors:
            raise CheckpointError(f"{file}: client_state tensor {key!r} is missing from the rank's tensor file")
        node, k = locate(path, "tensor")
        node[k] = tensors[key].clone()  # own memory: the file buffer is freed after loading
    for path in sorted(part["tuples"], key=len, reverse=True):  # innermost first: outer ones copy them
        node, k = locate(path, "tuple")
        if not isinstance(node[k], list):
            raise CheckpointError(f"{file}: client_state tuple path {path!r} is not a list")
        node[k] = tuple(node[k])
    return root[""]


def capture_rng() -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """This process's RNG states as ``(json part, tensors)``."""
    version, internal, gauss = random.getstate()
    tensors = {"rng/torch": torch.get_rng_state()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, s in enumerate(cuda):
        tensors[f"rng/cuda/{i}"] = s
    return {"python": [version, list(internal), gauss], "cuda_devices": len(cuda)}, tensors


def restore_rng(part: Any, tensors: Dict[str, Tensor], file: Path) -> None:
    """Set the RNG states :func:`capture_rng` returned (checked first; CheckpointError naming ``file``)."""
    ok = (isinstance(part, dict) and isinstance(part.get("python"), list) and len(part["python"]) == 3
          and isinstance(part["python"][1], list) and all(type(v) is int for v in part["python"][1])
          and type(part.get("cuda_devices")) is int and "rng/torch" in tensors)
    if not ok:
        raise CheckpointError(f"{file}: the RNG state is malformed")
    current = torch.get_rng_state()
    if tensors["rng/torch"].dtype != current.dtype or tensors["rng/torch"].shape != current.shape:
        raise CheckpointError(f"{file}: torch's RNG state has {tensors['rng/torch'].dtype} "
                              f"{tuple(tensors['rng/torch'].shape)}, expected {current.dtype} {tuple(current.shape)}")
    version, internal, gauss = part["python"]
    cuda = [tensors[f"rng/cuda/{i}"] for i in range(part["cuda_devices"]) if f"rng/cuda/{i}" in tensors]
    if len(cuda) != part["cuda_devices"]:
        raise CheckpointError(f"{file}: {part['cuda_devices']} CUDA RNG states recorded, {len(cuda)} stored")
    state = (version, tuple(internal), gauss)
    try:
        random.setstate(state)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: Python's RNG state is invalid ({err})") from None
    torch.set_rng_state(tensors["rng/torch"].clone())
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([c.clone() for c in cuda])
