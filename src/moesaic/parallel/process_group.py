"""Joining the process group that torchrun set up: the one place in moesaic's core that reads the environment."""

from __future__ import annotations

import datetime
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .._checks import check_number


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0) -> Tuple[int, int]:
    """Join the process group torchrun set up (env:// rendezvous); a no-op if already joined.

    The backend is NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every collective,
    so a dead peer makes the others fail with an error instead of hanging forever.

    Returns:
        ``(rank, world_size)``.
    """
    check_number(timeout_s, "timeout_s", 0.0, lo_open=True)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed needs the torchrun environment; missing {missing}. "
                           "Launch with `torchrun --nproc-per-node N script.py`")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
