"""Joining the process group that torchrun set up (the environment is read by :class:`LaunchEnv`)."""

from __future__ import annotations

import atexit
import datetime
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .._checks import check_int, check_number
from .launch import LaunchEnv


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0,
                     env: Optional[LaunchEnv] = None, default_port: Optional[int] = None) -> Tuple[int, int]:
    """Join the process group torchrun set up (env:// rendezvous); a no-op if already joined.

    The backend is NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every collective,
    so a dead peer makes the others fail with an error instead of hanging forever.

    A process started without a launcher (``RANK`` not set, :class:`LaunchEnv` ``launched`` false) and
    without ``default_port`` joins a group of itself alone (rank 0 of 1, an in-memory store: no port,
    no file), which is what FSDP2 (``zero_optimization.stage`` 3) needs to shard over one process, as
    DeepSpeed runs stage 3 on one process.

    Args:
        backend: "gloo", "nccl" or None (by the device).
        timeout_s: the process group's timeout for every collective.
        env: the launch environment (default: :meth:`LaunchEnv.from_environ`).
        default_port: where ``MASTER_ADDR``/``MASTER_PORT`` are not set, rendezvous on 127.0.0.1 at
            this port (DeepSpeed's ``distributed_port`` rule); None: both are required.

    Returns:
        ``(rank, world_size)``.
    """
    check_number(timeout_s, "timeout_s", 0.0, lo_open=True)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = env if env is not None else LaunchEnv.from_environ()
    if default_port is not None:
        check_int(default_port, "default_port", 1, 65535)
    addr = env.master_addr or ("127.0.0.1" if default_port is not None else None)
    port = env.master_port or default_port
    alone = not env.launched and not addr and not port
    missing = [k for k, v in (("RANK", env.launched), ("MASTER_ADDR", addr), ("MASTER_PORT", port)) if not v]
    if missing and not alone:
        raise RuntimeError(f"init_distributed needs the torchrun environment; missing {missing}. "
                           "Launch with `torchrun --nproc-per-node N script.py`")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if alone:  # one process, no launcher
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif env.master_addr and env.master_port:  # torchrun's env:// rendezvous (its agent's store, if any)
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # the default_port fallback
        dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{port}", rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
    if backend == "gloo":
        atexit.unregister(_destroy_gloo_at_exit)  # once, however often a test re-initialises
        atexit.register(_destroy_gloo_at_exit)
    return dist.get_rank(), dist.get_world_size()


def _destroy_gloo_at_exit() -> None:
    """Destroy the gloo process group that :func:`init_distributed` created, while Python is still whole.

    A script that ends without ``destroy_process_group`` (DeepSpeed's examples do) leaves gloo's
    worker threads holding work objects whose tensors are freed during interpreter finalization:
    now and then the process dies with SIGABRT ("terminate called without an active exception")
    after its last line ran, and the launcher reports a failed run. gloo's destroy is local (no
    collective), so it is safe at exit even when a peer has already gone. NCCL is left alone: its
    destroy aborts communicators, which the user's own shutdown must order.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_timeout() -> Optional[datetime.timedelta]:
    """The timeout the default (world) process group was created with, or None when it cannot be read.

    ``torch.distributed.new_group`` does not inherit it: a group created without ``timeout=`` waits
    torch's default (30 minutes for gloo, 10 for NCCL) whatever ``init_process_group`` was given, so
    a peer that stops answering inside an expert-parallel all-to-all would hang its group for that
    long. Groups moesaic creates pass this value on.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:  # the backend's options (private attributes of torch; absent ones fall back to torch's default)
        group = dist.distributed_c10d._get_default_group()
        for device_type in group._device_types:
            timeout = getattr(getattr(group._get_backend(device_type), "options", None), "_timeout", None)
            if isinstance(timeout, datetime.timedelta):
                return timeout
    except (AttributeError, RuntimeError, ValueError):
        pass
    return None
