"""Gradient reduction overlapped with backward (DeepSpeed's ``zero_optimization.overlap_comm``).

Without overlap the engine reduces every gradient after the boundary's backward has finished
(:meth:`~moesaic.optim.pipeline.StepPipeline.reduce`). With it, :class:`OverlappedReducer`
starts each bucket's reduction while backward is still running, as soon as every gradient in
the bucket is final, so the communication of the late layers hides behind the computation of
the early ones (what torch DDP, DeepSpeed's ZeRO 1-2 and FSDP do).

**What is reduced, and where.** The same tensors, onto the same ranks, with the same arithmetic as
the reduction after backward: each optimizer group over its replica set (dense groups over the
data-parallel world, expert groups over their expert-data-parallel group); summed in an fp32
bucket and divided by the world size; all-reduced at stages 0-1 (and at stage 2 with
``reduce_scatter: false``), reduced onto the group's owner at stage 2, where the other ranks drop
their copies as soon as the bucket is packed. Only the bucket boundaries differ (buckets follow
backward order), so W=2 gives bitwise the same gradients and larger worlds the same to fp32
round-off (a ring all-reduce adds in an order that depends on a value's place in its bucket).

**When a bucket is final.** A ``post_accumulate_grad`` hook on each trainable parameter fires
once per backward, after every contribution (a parameter used twice in a forward included) has
been summed into ``.grad``; a bucket is ready when every trainable parameter in it has fired.
Hooks act only in a backward the engine armed: the accumulation boundary's, outside
``no_sync()``; other micro-batches accumulate untouched, as without overlap.

**Why collectives never mismatch.** The buckets of one process group form a fixed sequence,
built from the model's structure and the shard plan, hence identical on every member. A bucket
is launched only when it is ready *and* every earlier bucket of its sequence has been launched,
so every member issues that group's collectives in the same order even when gradients become
final in different orders (different experts received tokens). A parameter without a gradient on
this rank (an expert that got no token, an unused parameter) never fires; its bucket, and the
ones after it, are launched at the end of backward, in the same fixed order (it contributes
zeros, as without overlap). Nothing ever waits for a collective inside backward: every wait is
at its end, after all buckets are launched, so a rank blocked in a backward collective (the MoE
all-to-all) can never wait on a peer that waits on it. Dense buckets travel on a process group
of their own (a copy of the world), so no collective a model issues on the default group during
backward can interleave with them.

**Cost.** Each bucket in flight holds an fp32 buffer until its reduction completes (finished
buckets are unpacked at each later hook and their buffers go back to a pool that later buckets
and steps reuse); in the worst case that is one fp32 copy of the gradients, as torch DDP's
buckets, and the pool keeps as many buffers as were ever in flight at once. Gloo and NCCL run the collectives in the background
(``async_op=True``); the work handles are waited at the end of backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layer.identity import ParamRef
from ..parallel.collectives import DEFAULT_BUCKET_ELEMS, pack_gradients, unpack_gradients
from ..parallel.comm import CollectiveError
from .mixed_precision import GroupedMixedPrecisionOptimizer
from .pipeline import _set_grad


@dataclass(eq=False)
class _Bucket:
    """One collective: some tensors of one replica set, reduced together onto ``dst`` (None: all)."""

    stream: Tuple
    refs: List[ParamRef]
    dst: Optional[int]
    group: object
    numel: int
    trainable: frozenset  # ids of the trainable parameters whose hooks make it ready
    pending: set = field(default_factory=set)
    flat: Optional[Tensor] = None
    buffer: Optional[Tensor] = None
    work: object = None
    launched: bool = False
    done: bool = False

    def triples(self):
        return [(lambda r=r: r.grad, _set_grad(r), r.data) for r in self.refs]


class OverlappedReducer:
    """Reduce gradient buckets during the boundary's backward (see module docstring).

    Args:
        optimizer: the engine's optimizer; its groups and ``shard`` plan say what is reduced where.
        model: the model, whose parameter order gives the buckets' order (reverse: backward order).
        bucket_elems: most elements per bucket (DeepSpeed's ``reduce_bucket_size``).
        reduce_scatter: at stage 2, reduce onto the owner only (True) or all-reduce (False).

    Use: :meth:`arm` before the boundary's backward, :meth:`finish` after it.
    """

    def __init__(self, optimizer: GroupedMixedPrecisionOptimizer, model: nn.Module,
                 bucket_elems: int = DEFAULT_BUCKET_ELEMS, reduce_scatter: bool = True) -> None:
        if optimizer.shard is None:
            raise ValueError("the optimizer needs a shard plan (moesaic.optim.sharding.plan_shards), even at stage 0")
        if isinstance(bucket_elems, bool) or not isinstance(bucket_elems, int) or bucket_elems < 1:
            raise ValueError(f"bucket_elems must be an int >= 1, got {bucket_elems!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        plan = optimizer.shard
        self.world_size = plan.world_size
        self.rank = plan.rank
        self.bucket_elems = bucket_elems
        self._armed = False
        self.last_wait_s = 0.0
        self.last_launched_in_backward = 0
        position = {id(p): i for i, p in enumerate(model.parameters())}
        dense_group = None
        if self.world_size > 1 and any(rs.key == ("dense",) for rs in plan.replica):
            # every rank builds the engine, so every rank makes this (collective) call once
            dense_group = dist.new_group(list(range(self.world_size)))
        # per replica set: (ref, dst) in backward order
        entries: Dict[Tuple, List[Tuple[ParamRef, Optional[int]]]] = {}
        groups: Dict[Tuple, object] = {}
        for gi, rs in enumerate(plan.replica):
            group = dense_group if rs.key == ("dense",) else rs.group
            groups[rs.key] = group
            dst = plan.owner[gi] if plan.stage >= 2 and reduce_scatter and group is not False else None
            entries.setdefault(rs.key, []).extend((r, dst) for r in optimizer.refs(gi))
        self._streams: Dict[Tuple, List[_Bucket]] = {}
        for key, items in entries.items():
            items.sort(key=lambda e: (-position.get(id(e[0].param), -1), -(e[0].index or 0)))
            buckets: List[_Bucket] = []
            current: List[Tuple[ParamRef, Optional[int]]] = []
            for ref, dst in items:
                if current and (current[-1][1] != dst or sum(r.numel() for r, _ in current) + ref.numel()
                                > bucket_elems):
                    buckets.append(self._bucket(key, current, groups[key]))
                    current = []
                current.append((ref, dst))
            if current:
                buckets.append(self._bucket(key, current, groups[key]))
            self._streams[key] = buckets
        self._next = {key: 0 for key in self._streams}
        self._of_param: Dict[int, List[_Bucket]] = {}
        for buckets in self._streams.values():
            for b in buckets:
                for pid in b.trainable:
                    self._of_param.setdefault(pid, []).append(b)
        self._in_flight: List[_Bucket] = []
        self._fired: set = set()
        self._pool: List[Tensor] = []
        self._max_bucket = max((b.numel for bs in self._streams.values() for b in bs), default=0)
        self._handles = []
        seen = set()
        for buckets in self._streams.values():
            for b in buckets:
                for r in b.refs:
                    if r.param.requires_grad and id(r.param) not in seen:
                        seen.add(id(r.param))
                        self._handles.append(r.param.register_post_accumulate_grad_hook(self._on_grad))

    @staticmethod
    def _bucket(key: Tuple, items, group) -> _Bucket:
        refs = [r for r, _ in items]
        return _Bucket(stream=key, refs=refs, dst=items[0][1], group=group, numel=sum(r.numel() for r in refs),
                       trainable=frozenset(id(r.param) for r in refs if r.param.requires_grad))

    # --- what the engine calls ----------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        return self._armed

    def buckets(self) -> Dict[Tuple, List[Tuple[List[str], Optional[int]]]]:
        """Per replica set, its buckets in launch order as ``(tensor names, dst)`` (for tests and docs)."""
        return {key: [([r.name for r in b.refs], b.dst) for b in bs] for key, bs in self._streams.items()}

    def arm(self) -> None:
        """The next backward is the accumulation boundary's: reduce buckets as they become final."""
        if self._armed:
            raise RuntimeError("OverlappedReducer.arm() called twice without finish()")
        for buckets in self._streams.values():
            for b in buckets:
                b.pending = set(b.trainable)
                b.flat, b.work, b.launched, b.done = None, None, False, False
        self._next = {key: 0 for key in self._streams}
        self._in_flight = []
        self._fired = set()
        self.last_launched_in_backward = 0
        self._armed = True
        for key in self._streams:  # buckets with nothing trainable in them are ready at once
            self._launch_ready(key)

    def finish(self) -> int:
        """After backward: launch what is left in the fixed order, wait for everything, write the results.

        Returns the number of collectives this boundary issued.
        """
        if not self._armed:
            raise RuntimeError("OverlappedReducer.finish() without arm()")
        start = time.perf_counter()
        try:
            for key, buckets in self._streams.items():
                while self._next[key] < len(buckets):
                    self._launch(buckets[self._next[key]])
                    self._next[key] += 1
            for b in self._in_flight:
                self._complete(b)
        finally:
            self._armed = False
            self._in_flight = []
        self.last_wait_s = time.perf_counter() - start
        return sum(1 for bs in self._streams.values() for b in bs if b.group is not False)

    def abandon(self) -> None:
        """Disarm after a failed backward (its launched collectives are not waited for)."""
        self._armed = False
        self._in_flight = []
        for buckets in self._streams.values():
            for b in buckets:
                b.flat, b.buffer, b.work = None, None, None

    def remove(self) -> None:
        """Unregister the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- the hook ---------------------------------------------------------------------------------
    def _on_grad(self, param: Tensor) -> None:
        if not self._armed:
            return
        pid = id(param)
        buckets = self._of_param.get(pid, ())
        if pid in self._fired:
            if any(b.launched for b in buckets):
                raise RuntimeError(
                    f"parameter {getattr(param, 'moe_param_name', tuple(param.shape))} received a second gradient "
                    "in one backward after its bucket was reduced (a reentrant activation checkpoint that also "
                    "uses it outside?); set zero_optimization.overlap_comm to false for this model")
            return
        self._fired.add(pid)
        streams = set()
        for b in buckets:
            b.pending.discard(pid)
            if not b.pending:
                streams.add(b.stream)
        for key in sorted(streams, key=repr):
            self._launch_ready(key)
        self._poll()

    def _launch_ready(self, key: Tuple) -> None:
        buckets = self._streams[key]
        while self._next[key] < len(buckets) and not buckets[self._next[key]].pending:
            self._launch(buckets[self._next[key]])
            self._next[key] += 1
            self.last_launched_in_backward += 1

    def _buffer(self, b: _Bucket) -> Tensor:
        """A flat fp32 buffer for ``b``: a pooled one (returned when a bucket completes), else a new one.

        The pool keeps as many buffers as were ever in flight at once, so after the first boundary
        no step maps fresh memory (a fresh multi-MiB buffer costs page faults every time).
        """
        device = b.refs[0].param.device
        for i, buf in enumerate(self._pool):
            if buf.device == device and buf.numel() >= b.numel:
                return self._pool.pop(i)
        return torch.empty(self._max_bucket, dtype=torch.float32, device=device)

    def _launch(self, b: _Bucket) -> None:
        b.buffer = self._buffer(b)
        b.flat = b.buffer[:b.numel]
        triples = b.triples()
        pack_gradients(triples, b.flat)
        b.launched = True
        if b.group is not False:
            try:
                if b.dst is None:
                    b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)
                else:
                    b.work = dist.reduce(b.flat, b.dst, group=b.group, async_op=True)
            except RuntimeError as err:
                raise CollectiveError(f"overlapped gradient reduction failed on rank {dist.get_rank()}: {err}") from err
            if b.dst is not None and self.rank != b.dst:
                unpack_gradients(triples, b.flat, self.world_size, receive=False)  # stage 2: drop our copy now
        self._in_flight.append(b)

    def _poll(self) -> None:
        """Unpack the oldest buckets whose reductions have finished (frees their buffers early)."""
        while self._in_flight and (self._in_flight[0].work is None or self._in_flight[0].work.is_completed()):
            self._complete(self._in_flight.pop(0))

    def _complete(self, b: _Bucket) -> None:
        if b.done:
            return
        if b.work is not None:
            try:
                b.work.wait()
            except RuntimeError as err:
                raise CollectiveError(f"overlapped gradient reduction failed on rank {dist.get_rank()}: {err}. "
                                      "A peer may have died; see the other ranks' logs") from err
        receive = b.dst is None or b.group is False or self.rank == b.dst
        if receive:
            unpack_gradients(b.triples(), b.flat, self.world_size, receive=True)
        self._pool.append(b.buffer)
        b.flat, b.buffer, b.work, b.done = None, None, None, True

