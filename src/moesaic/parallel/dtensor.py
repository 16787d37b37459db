"""This rank's part of a ``DTensor`` (FSDP2's sharded parameters, :func:`moesaic.shard_model`).

The layer, the optimizer and the checkpoint all ask "is this tensor sharded, and which rows does this
rank hold"; the answer lives here, under all of them, once. ``torch.distributed.tensor`` is never
imported by these functions: a process that has not imported it holds no ``DTensor``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional, Tuple

from torch import Tensor, nn

Rows = Tuple[int, int, int]  # start, stop, total rows of dimension 0


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (the tensor itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


def local_rows(t: Tensor) -> Optional[Rows]:
    """``(start, stop, total)`` of this rank's rows of a ``DTensor`` sharded on dim 0; None for a plain tensor.

    Raises:
        ValueError: ``t`` is placed other than FSDP2's ``Shard(0)`` on a one-dimensional mesh, or holds
            padded local rows (not a layout moesaic writes or reads).
    """
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if t.dim() == 0 or len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise ValueError(f"a sharded tensor of shape {tuple(t.shape)} is placed {t.placements}; checkpoints of "
                         "sharded models read FSDP2's Shard(0) on a one-dimensional mesh only")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    start = offset[0] if shape[0] else min(offset[0], t.shape[0])
    if tuple(t.to_local().shape) != tuple(shape):  # FSDP2 keeps unpadded local rows; anything else is not ours
        raise ValueError(f"a sharded tensor of shape {tuple(t.shape)} holds local rows {tuple(t.to_local().shape)}, "
                         f"not {tuple(shape)}")
    return start, start + shape[0], t.shape[0]


__all__ = ["Rows", "is_dtensor", "local_rows", "local_tensor"]


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[int]:
    """Within the block, every ``DTensor`` parameter of ``module`` is registered as its full value.

    What reads a model's tensors by module (``state_dict()``, :func:`moesaic.hf.save`'s per-expert
    reads) then sees the whole tensors, as on an unsharded model. Each parameter is gathered with
    ``full_tensor()`` in ``named_modules()`` order, the same on every rank, so call it on every rank of
    the parameters' meshes at once; it holds every full value on every rank until the block ends. The
    parameters are put back as they were (the same ``DTensor`` objects) on leaving, also on an error.
    FSDP2's state-dict pre-hook re-registers the sharded parameters only when its group is unsharded
    (inside a forward/backward): call this between steps. Yields the number of parameters gathered.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    swapped, full = [], {}  # full: one gathered Parameter per DTensor, so tied parameters stay tied
    try:
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and is_dtensor(param):
                    if id(param) not in full:
                        full[id(param)] = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                    owner._parameters[name] = full[id(param)]
                    swapped.append((owner, name, param))
        yield len(full)
    finally:
        for owner, name, param in reversed(swapped):
            owner._parameters[name] = param
