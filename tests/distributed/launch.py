"""Spawn 2-4 ranks (gloo; NCCL for GPU tests) on 127.0.0.1 for a test; every process is joined with a timeout.

Each rank runs ``fn(rank, world_size, *args)`` after joining the process group. A rank that raises
writes its traceback to a file; the parent fails the test with every rank's traceback. A rank that
does not finish within ``timeout_s`` is killed and the test fails (a hang never stalls CI).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


# Ranks start from a fork server that has imported torch and moesaic once for the whole test
# session: a rank then starts in a fraction of a second instead of importing torch again (about
# 2 s per rank with "spawn", most of this folder's run time on 2 cores). The server imports nothing
# that starts threads or touches CUDA, so its forks are as clean as spawned processes.
START_METHOD = "forkserver"
mp.set_forkserver_preload(["torch", "torch.distributed", "moesaic"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, errdir, fn, args, pg_timeout_s, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # NCCL needs one device per rank
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(errdir, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def run_ranks(fn, world_size: int, *args, timeout_s: float = 120.0, pg_timeout_s: float = 60.0,
              expect_failure: bool = False, backend: str = "gloo") -> dict:
    """Run ``fn`` on ``world_size`` ranks (``backend`` "gloo" or "nccl"); returns ``{rank: traceback}`` of failed ranks.

    Raises AssertionError when a rank fails (unless ``expect_failure``) or when the ranks
    outlive ``timeout_s``.
    """
    errdir = tempfile.mkdtemp(prefix="moesaic-ranks-")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = mp.start_processes(_entry, args=(world_size, free_port(), errdir, fn, args, pg_timeout_s, backend),
                             nprocs=world_size, join=False, start_method=START_METHOD)
    deadline = time.monotonic() + timeout_s
    while not all(not p.is_alive() for p in ctx.processes):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"ranks still running after {timeout_s}s: a hang")
        time.sleep(0.05)
    for p in ctx.processes:
        p.join(timeout=5)
    errors = {int(f.stem[4:]): f.read_text() for f in Path(errdir).glob("rank*.err")}
    codes = [p.exitcode for p in ctx.processes]
    if not expect_failure and (errors or any(c != 0 for c in codes)):
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"rank exit codes {codes}\n{details}")
    return errors
