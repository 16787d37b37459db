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

import math
import random
from dataclasses import dataclass
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


_MT_WORDS = 624  # Python's Mersenne Twister: 624 32-bit words, then the position in them
_MAX_CUDA_DEVICES = 1 << 16


@dataclass(frozen=True)
class RngState:
    """RNG states read and checked, ready to install (:func:`apply_rng` cannot fail on them)."""

    python: Tuple[Any, ...]  # as random.getstate() returns it
    torch: Tensor
    cuda: Tuple[Tensor, ...]  # one per CUDA device of this process that gets a state


def stage_rng(part: Any, tensors: Dict[str, Tensor], file: Path) -> RngState:
    """Check the RNG states :func:`capture_rng` wrote, changing nothing; CheckpointError naming ``file`` and the key.

    Python's state is tried on a private ``random.Random`` and torch's on a private
    ``torch.Generator``, so whatever those would refuse is refused here, before the live RNGs
    (or anything else) change. CUDA states beyond this process's device count are not restored.
    """
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{file}: rng.{key}: {what}")

    if not isinstance(part, dict) or set(part) != {"python", "cuda_devices"}:
        got = sorted(part) if isinstance(part, dict) else type(part).__name__
        raise CheckpointError(f"{file}: rng must be an object with the keys ['cuda_devices', 'python'], got {got}")
    python = part["python"]
    if not isinstance(python, list) or len(python) != 3:
        raise bad("python", f"must be [version, state, gauss], got {_short(python)}")
    version, internal, gauss = python
    if type(version) is not int or version != 3:
        raise bad("python[0]", f"the state version must be 3 (what random.getstate() writes), got {_short(version)}")
    if not isinstance(internal, list) or len(internal) != _MT_WORDS + 1:
        got = f"{len(internal)} values" if isinstance(internal, list) else _short(internal)
        raise bad("python[1]", f"must list {_MT_WORDS + 1} ints, got {got}")
    for i, v in enumerate(internal):
        hi = _MT_WORDS if i == _MT_WORDS else (1 << 32) - 1
        if type(v) is not int or not 0 <= v <= hi:
            raise bad(f"python[1][{i}]", f"must be an int in [0, {hi}], got {_short(v)}")
    if gauss is not None and (type(gauss) is not float or not math.isfinite(gauss)):
        raise bad("python[2]", f"must be null or a finite float, got {_short(gauss)}")
    state = (version, tuple(internal), gauss)
    try:
        random.Random().setstate(state)
    except (TypeError, ValueError, OverflowError) as err:
        raise bad("python", f"random.setstate refuses it ({err})") from None
    n = part["cuda_devices"]
    if type(n) is not int or not 0 <= n <= _MAX_CUDA_DEVICES:
        raise bad("cuda_devices", f"must be an int in [0, {_MAX_CUDA_DEVICES}], got {_short(n)}")
    expected = {"rng/torch", *(f"rng/cuda/{i}" for i in range(n))}
    stored = {k for k in tensors if k.startswith("rng/")}
    if stored != expected:
        raise CheckpointError(f"{file}: rng.cuda_devices is {n} but the rank's tensor file holds the RNG tensors "
                              f"{sorted(stored)[:6]} (expected {sorted(expected)[:6]})")
    current = torch.get_rng_state()
    saved = tensors["rng/torch"]
    if saved.dtype != current.dtype or tuple(saved.shape) != tuple(current.shape):
        raise CheckpointError(f"{file}: torch's RNG state (rng/torch) has {saved.dtype} {tuple(saved.shape)}, "
                              f"expected {current.dtype} {tuple(current.shape)}")
    saved = saved.clone()  # own, contiguous memory: set_state reads a view's storage from its start
    try:
        torch.Generator().set_state(saved)
    except RuntimeError as err:
        raise CheckpointError(f"{file}: torch's RNG state (rng/torch) is invalid ({err})") from None
    cuda = []
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(min(n, devices)):
        t = tensors[f"rng/cuda/{i}"]
        want = torch.cuda.get_rng_state(i)
        if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{file}: the CUDA RNG state rng/cuda/{i} has {t.dtype} {tuple(t.shape)}, expected "
                                  f"{want.dtype} {tuple(want.shape)}")
        cuda.append(t.clone())
    return RngState(python=state, torch=saved, cuda=tuple(cuda))


def apply_rng(state: RngState) -> None:
    """Install checked RNG states (Python's, torch's, CUDA's)."""
    random.setstate(state.python)
    torch.set_rng_state(state.torch)
    for i, t in enumerate(state.cuda):
        torch.cuda.set_rng_state(t, i)


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
