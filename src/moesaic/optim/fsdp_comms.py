"""FSDP2's all-gather and reduce-scatter on gloo, as one broadcast / one reduce per rank.

torch's gloo backend serves ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (what
FSDP2 calls for every unit, twice and once a step) far more slowly than its own ``broadcast``
and ``reduce`` of the same bytes: on 4 CPU processes and one MoE layer's experts (8 M elements
per rank), an all-gather took 0.37 s against 0.09 s for four broadcasts, and a reduce-scatter
1.13 s against 0.27 s for four reduces (``docs/fsdp.md``, "Step time"). Both classes below are
FSDP2's own extension points (``FSDPModule.set_custom_all_gather`` /
``set_custom_reduce_scatter``); :func:`moesaic.optim.fsdp.shard_model` installs them on units
of CPU tensors whose process group runs on gloo (``collectives="auto"``, the default). NCCL and
CUDA tensors keep FSDP2's collectives.

* :class:`BroadcastAllGather`: rank ``i`` of the group broadcasts its slot of the flat output
  (FSDP2 has already copied its shard there); every element arrives as sent, so the gathered
  parameters are bitwise those of ``all_gather_into_tensor``.
* :class:`ReduceReduceScatter`: chunk ``i`` of the flat input is reduced onto rank ``i``, which
  copies it to the output. A sum over the same ranks in gloo's own order: equal to
  ``reduce_scatter_tensor``'s to fp32 round-off (the order of additions may differ).

The ``W`` collectives of one call are started together and all waited for before it returns, in
the same order on every rank (gloo tags each one), so a call is synchronous as FSDP2's are on
the CPU, and no rank can skip one: a rank whose experts saw no tokens still sends its zeros.

**Scratch buffers.** Every unit's all-gather output and reduce-scatter input is a flat buffer of
the unit's size that FSDP2 reads once and drops (the gathered parameters and the reduced gradient
shard are copied out of it). On the CPU each such allocation above glibc's mmap threshold is fresh
memory the kernel must fault in and zero: for 8 layers of experts that was about 1 M page faults
per rank and step. :class:`ScratchPool` hands the same buffers to the next unit of the same size
once nothing uses them any more (no tensor shares their storage), and lets them all go at the end
of each backward, so nothing is kept between steps. The reduce-scatter's *output* becomes the
gradient shard and is always fresh memory.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter


def _empty(size: Sequence[Union[int, torch.SymInt]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(*size, dtype=dtype, device=device)


def _check(output: torch.Tensor, input: torch.Tensor, world: int, out_per_in: Optional[int]) -> None:
    if out_per_in == world and output.numel() != input.numel() * world:
        raise ValueError(f"all-gather output holds {output.numel()} elements; the group of {world} needs "
                         f"{input.numel() * world} (input {input.numel()} x {world})")
    if out_per_in is None and input.numel() != output.numel() * world:
        raise ValueError(f"reduce-scatter input holds {input.numel()} elements; the group of {world} needs "
                         f"{output.numel() * world} (output {output.numel()} x {world})")
    if not (output.is_contiguous() and input.is_contiguous()):
        raise ValueError("FSDP2's collective buffers are contiguous; got a strided tensor")


def _users(t: torch.Tensor) -> int:
    """How many tensors share ``t``'s storage (``t`` itself included)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1  # less the temporary storage object


class ScratchPool:
    """Flat buffers reused between FSDP2 collectives of the same size and dtype (see module docstring).

    :meth:`get` returns a new view of a pooled buffer that no tensor uses (its storage shared by
    the pool's tensor alone), else a new buffer, pooled up to ``per_size`` of each size.
    :meth:`release` drops the pool's references: buffers still in use live on with their users.
    """

    def __init__(self, per_size: int = 1) -> None:
        if isinstance(per_size, bool) or not isinstance(per_size, int) or per_size < 1:
            raise ValueError(f"per_size must be an int >= 1, got {per_size!r}")
        self.per_size = per_size
        self._bufs: Dict[Tuple[int, torch.dtype, torch.device], List[torch.Tensor]] = {}
        self._release_queued = False

    def get(self, size: Sequence[Union[int, torch.SymInt]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for s in size:
            numel *= int(s)
        bufs = self._bufs.setdefault((numel, dtype, torch.device(device)), [])
        for buf in bufs:
            if _users(buf) == 1:
                return buf.view(*size)
        buf = torch.empty(numel, dtype=dtype, device=device)
        if len(bufs) < self.per_size:
            bufs.append(buf)
        return buf.view(*size)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lies in a pooled buffer."""
        ptr = t.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for bufs in self._bufs.values() for b in bufs)

    def release(self) -> None:
        self._bufs.clear()
        self._release_queued = False

    def release_after_backward(self) -> None:
        """Empty the pool when the running backward ends (autograd's final callback; once per backward).

        Outside a backward this does nothing: the buffers stay for the next call.
        """
        if self._release_queued:
            return
        from torch.autograd import Variable

        try:
            Variable._execution_engine.queue_callback(self.release)
        except RuntimeError:  # not inside a backward pass
            return
        self._release_queued = True

    def __len__(self) -> int:
        return sum(len(b) for b in self._bufs.values())


class BroadcastAllGather(AllGather):
    """All-gather into one flat tensor as one broadcast from each rank of the group (see module docstring).

    Args:
        pool: where the output buffers come from (None: a fresh buffer per call).
    """

    def __init__(self, pool: Optional[ScratchPool] = None) -> None:
        self.pool = pool

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return _empty(size, dtype, device) if self.pool is None else self.pool.get(size, dtype, device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> None:
        world, rank = group.size(), group.rank()
        _check(output_tensor, input_tensor, world, world)
        out, n = output_tensor.view(-1), input_tensor.numel()
        mine = out.narrow(0, rank * n, n)
        if mine.data_ptr() != input_tensor.data_ptr():  # FSDP2 gathers in place; another caller may not
            mine.copy_(input_tensor.view(-1))
        works = [dist.broadcast(out.narrow(0, i * n, n), group_src=i, group=group, async_op=True)
                 for i in range(world)]
        for work in works:
            work.wait()
        return None  # done: FSDP2 treats a call that returns no Work as finished


class ReduceReduceScatter(ReduceScatter):
    """Reduce-scatter of one flat tensor as one reduce onto each rank of the group (see module docstring).

    FSDP2 (torch 2.13, ``foreach_reduce``) allocates the input, then the output, then calls: the
    first allocation after a call is the input (from ``pool``), the second the output (fresh:
    it becomes the gradient shard). A call whose output lies in the pool is refused.

    Args:
        pool: where the input buffers come from (None: a fresh buffer per call); it is emptied at
            the end of every backward that reduce-scatters.
    """

    def __init__(self, pool: Optional[ScratchPool] = None) -> None:
        self.pool = pool
        self._input_next = True

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        use_pool, self._input_next = self.pool is not None and self._input_next, not self._input_next
        return self.pool.get(size, dtype, device) if use_pool else _empty(size, dtype, device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op=dist.ReduceOp.SUM, async_op: bool = False) -> None:
        world, rank = group.size(), group.rank()
        _check(output_tensor, input_tensor, world, None)
        self._input_next = True
        if self.pool is not None:
            if self.pool.owns(output_tensor):
                raise RuntimeError("the reduce-scatter output (the gradient shard) was allocated from the scratch "
                                   "pool: FSDP2 no longer allocates input then output; build shard_model with "
                                   "collectives='torch'")
            self.pool.release_after_backward()
        chunks = input_tensor.view(world, -1)  # the input is scratch: FSDP2 frees it after this call
        works = [dist.reduce(chunks[i], group_dst=i, op=op, group=group, async_op=True) for i in range(world)]
        for work in works:
            work.wait()
        output_tensor.view(-1).copy_(chunks[rank])
        return None


def uses_gloo(group: dist.ProcessGroup, device_type: str) -> bool:
    """Whether ``group``'s collectives on ``device_type`` tensors run on gloo."""
    backend = str(dist.get_backend(group))
    return backend == "gloo" or f"{device_type}:gloo" in backend.split(",")
