"""Bucketed collectives over gradients and parameters: all-reduce, reduce to an owner, broadcast.

The engine's data-parallel traffic, in one place and with bounded memory:

* :func:`reduce_gradients` sums the gradients of some tensors over a replica group and divides
  them (every rank keeps the result: ZeRO stages 0 and 1), or sums them onto one owner rank
  and lets the other ranks drop their copies (stage 2);
* :func:`broadcast_tensors` sends the values an owner updated to the other replicas (stages 1-2).

Tensors travel in buckets of at most ``bucket_elems`` elements, in the order given, which must
be the same on every rank of the group. A bucket is one preallocated flat buffer: gradients are
summed in fp32 whatever their dtype (each tensor is converted while it is copied in, so no
fp32 copy of more than one bucket ever exists); parameters travel in their own dtype.

Each tensor is given as a pair of accessors rather than as a parameter, so that one expert's
slice of a stacked parameter (a view) travels like a whole parameter.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import CollectiveError

DEFAULT_BUCKET_ELEMS = 8 * 1024 * 1024  # 32 MiB of fp32 per bucket

GetTensor = Callable[[], Optional[Tensor]]


def _buckets(sizes: Sequence[int], bucket_elems: int) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` index ranges of consecutive items summing to at most ``bucket_elems``."""
    start, size = 0, 0
    for i, n in enumerate(sizes):
        if i > start and size + n > bucket_elems:
            yield start, i
            start, size = i, 0
        size += n
    if start < len(sizes):
        yield start, len(sizes)


def _call(what: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as err:  # gloo/NCCL: a peer died, timed out or disagreed on sizes
        raise CollectiveError(f"{what} failed on rank {dist.get_rank()}: {err}. A peer may have died or "
                              "disagreed on the tensors; see the other ranks' logs") from err


def reduce_gradients(grads: Sequence[Tuple[GetTensor, Callable[[Tensor], None], Tensor]], group, divide_by: int,
                     *, dst: Optional[int] = None, bucket_elems: int = DEFAULT_BUCKET_ELEMS) -> int:
    """Sum gradients over ``group`` and divide by ``divide_by``; returns the collectives issued.

    Args:
        grads: per tensor ``(get_grad, set_grad, like)``: the current gradient (None: this rank
            has none, it contributes zeros), a setter for the result, and a tensor of the right
            shape, dtype and device (the parameter or its view).
        group: the process group (None: the default group); ``False`` when this rank has no
            peers, so only the division happens.
        divide_by: the divisor (the data-parallel world size).
        dst: None to all-reduce (every rank gets the result); a global rank to reduce onto it
            only (the other ranks' setters receive None).
        bucket_elems: most elements per collective.
    """
    if not grads:
        return 0
    calls = 0
    sizes = [like.numel() for _, _, like in grads]
    device = grads[0][2].device
    buffer = torch.empty(min(bucket_elems, sum(sizes)) if sizes else 0, dtype=torch.float32, device=device)
    receive = dst is None or group is False or dist.get_rank() == dst
    for start, stop in _buckets(sizes, bucket_elems):
        n = sum(sizes[start:stop])
        flat = buffer[:n] if n <= buffer.numel() else torch.empty(n, dtype=torch.float32, device=device)
        pack_gradients(grads[start:stop], flat)
        if group is not False:
            if dst is None:
                _call("gradient all-reduce", dist.all_reduce, flat, group=group)
            else:
                _call(f"gradient reduce onto rank {dst}", dist.reduce, flat, dst, group=group)
            calls += 1
        unpack_gradients(grads[start:stop], flat, divide_by, receive)
    return calls


def pack_gradients(grads: Sequence[Tuple[GetTensor, Callable[[Tensor], None], Tensor]], flat: Tensor) -> None:
    """Copy the gradients of ``grads`` (``reduce_gradients``' triples) into the fp32 ``flat``, zeros for None.

    Shared by the bucketed reduction after backward and the overlapped one during it
    (:mod:`moesaic.optim.overlap`), so both put the same values in the same places.
    """
    offset = 0
    for get, _, like in grads:
        g = get()
        view = flat[offset:offset + like.numel()]
        if g is None:
            view.zero_()
        else:
            view.copy_(g.reshape(-1))  # converts to fp32 while copying
        offset += like.numel()


def unpack_gradients(grads: Sequence[Tuple[GetTensor, Callable[[Tensor], None], Tensor]], flat: Tensor,
                     divide_by: int, receive: bool) -> None:
    """Divide the reduced ``flat`` by ``divide_by`` and write it back into the gradients (``receive``),
    or drop this rank's copies (``receive`` False: a stage-2 non-owner)."""
    if divide_by != 1 and receive:
        flat.div_(divide_by)
    offset = 0
    for get, set_, like in grads:
        k = like.numel()
        if receive:
            g = get()
            if g is None:
                g = torch.empty_like(like)
                g.copy_(flat[offset:offset + k].view_as(like))
                set_(g)
            else:
                g.copy_(flat[offset:offset + k].view_as(g))
        else:
            set_(None)
        offset += k


def broadcast_tensors(tensors: Sequence[Tensor], group, src: int, *,
                      bucket_elems: int = DEFAULT_BUCKET_ELEMS) -> int:
    """Give every rank of ``group`` the values ``src`` holds, in place; returns collectives issued.

    Tensors are bucketed by dtype (a bf16 model sends bf16); the buffer is preallocated once.
    """
    if group is False or not tensors:
        return 0
    calls = 0
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    me = dist.get_rank()
    for (dtype, device), ts in by_dtype.items():
        sizes = [t.numel() for t in ts]
        buffer = torch.empty(min(bucket_elems, sum(sizes)), dtype=dtype, device=device)
        for start, stop in _buckets(sizes, bucket_elems):
            n = sum(sizes[start:stop])
            flat = buffer[:n] if n <= buffer.numel() else torch.empty(n, dtype=dtype, device=device)
            if me == src:
                offset = 0
                for t in ts[start:stop]:
                    flat[offset:offset + t.numel()].copy_(t.reshape(-1))
                    offset += t.numel()
            _call(f"parameter broadcast from rank {src}", dist.broadcast, flat, src, group=group)
            calls += 1
            if me != src:
                offset = 0
                for t in ts[start:stop]:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
    return calls


def all_reduce_values(values: Iterable[float], group=None, op=None, device=None) -> List[float]:
    """All-reduce a few Python numbers in float64 (one collective); returns them reduced."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        _call("scalar all-reduce", dist.all_reduce, t, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return t.tolist()
