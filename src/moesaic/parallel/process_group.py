"""Joining the process group that torchrun set up (the environment is read by :class:`LaunchEnv`)."""

from __future__ import annotations

import datetime
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .._checks import check_number
from .launch import LaunchEnv


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0,
                     env: Optional[LaunchEnv] = None) -> Tuple[int, int]:
    """Join the process group torchrun set up (env:// rendezvous); a no-op if already joined.

    The backend is NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every collective,
    so a dead peer makes the others fail with an error instead of hanging forever.

    Args:
        backend: "gloo", "nccl" or None (by the device).
        timeout_s: the process group's timeout for every collective.
        env: the launch environment (default: :meth:`LaunchEnv.from_environ`).

    Returns:
        ``(rank, world_size)``.
    """
    check_number(timeout_s, "timeout_s", 0.0, lo_open=True)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = env if env is not None else LaunchEnv.from_environ()
    missing = [k for k, v in (("RANK", env.launched), ("MASTER_ADDR", env.master_addr),
                              ("MASTER_PORT", env.master_port)) if not v]
    if missing:
        raise RuntimeError(f"init_distributed needs the torchrun environment; missing {missing}. "
                           "Launch with `torchrun --nproc-per-node N script.py`")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
