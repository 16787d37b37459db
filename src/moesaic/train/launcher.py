"""The processes of ``moesaic train --nproc N`` on one machine: started, signalled and reported as one run.

The launcher sets every process's environment as torchrun does (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_ERROR_FILE``; see
:class:`moesaic.parallel.launch.LaunchEnv`), so a worker cannot tell it from torchrun, and adds what
a terminal user needs from a training command:

* **signals**: the workers run in their own session, so a Ctrl-C reaches only the launcher, which
  passes SIGINT/SIGTERM on to every worker exactly once; the workers finish their step, agree to
  stop at the same one, save, and the launcher exits with their code (130 / 143). A second signal
  kills them at once. (torchrun would also pass the signal on, but kills the workers 30 s later,
  whether their checkpoint is written or not.) If the launcher itself dies, the workers get
  SIGTERM (Linux) and stop the same way.
* **one error, once**: a worker that fails writes its error to its error file (torchrun's JSON
  format) instead of the terminal; when one worker fails, the others get ``grace_s`` seconds to end
  (they usually fail at once, their peer gone) and are then killed. The launcher prints the root
  cause (the earliest error that is not a failed collective) once: one line for a configuration
  error, the worker's traceback and one line for a bug.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch.distributed as dist

from moesaic.parallel.comm import CollectiveError
from moesaic.parallel.launch import LaunchEnv

from .stop import STOP_SIGNALS


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_secondary(err: BaseException) -> bool:
    """A failed collective is usually the echo of a peer that failed first."""
    return isinstance(err, CollectiveError) or isinstance(err, getattr(dist, "DistBackendError", ()))


def write_error_file(path: str, err: BaseException, rank: int, *, user_error: bool) -> None:
    """Record ``err`` for the launcher, in torchrun's error-file format plus a ``moesaic`` entry.

    Args:
        path: the file (``LaunchEnv.error_file``).
        err: the exception that ends this process.
        rank: this process's rank.
        user_error: a configuration or input error (shown as one line) rather than a bug (traceback).
    """
    now = time.time()
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    data = {"message": {"message": f"{type(err).__name__}: {err}",
                        "extraInfo": {"py_callstack": tb, "timestamp": str(int(now))}},
            "moesaic": {"rank": rank, "text": str(err), "type": type(err).__name__, "user_error": user_error,
                        "secondary": _is_secondary(err), "time": now}}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


@dataclass(frozen=True)
class WorkerResult:
    """How one worker ended: its exit code and, if it wrote one, its error record."""

    rank: int
    code: int
    error: Optional[dict] = None

    @property
    def failed(self) -> bool:
        return self.code != 0


def _read_error(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f).get("moesaic")
    except (OSError, ValueError):
        return None


def root_cause(results: Sequence[WorkerResult]) -> Optional[WorkerResult]:
    """The failure to show: the earliest recorded error that is not a failed collective, else the earliest
    recorded error, else the first worker that exited with an error code or a signal."""
    failed = [r for r in results if r.failed]
    recorded = sorted((r for r in failed if r.error), key=lambda r: (r.error.get("secondary", False),
                                                                    r.error.get("time", 0.0)))
    if recorded:
        return recorded[0]
    return failed[0] if failed else None


def describe_failure(result: WorkerResult, world: int) -> str:
    """The message for a failed worker (with the traceback first for a bug)."""
    where = f" (rank {result.rank} of {world})" if world > 1 else ""
    if result.error:
        text = result.error.get("text", "")
        if result.error.get("user_error"):
            return f"error{where}: {text}"
        return f"{result.error.get('traceback', '')}error{where}: {result.error.get('type')}: {text}"
    if result.code < 0:
        name = signal.Signals(-result.code).name
        hint = " (out of memory? the system kills the largest process)" if result.code == -signal.SIGKILL else ""
        return f"error{where}: the process was killed by {name}{hint}"
    return f"error{where}: the process exited with code {result.code}"


def _parent_death_signal() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this worker when the launcher dies, so it stops cleanly instead of running orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def launch(args: List[str], nproc: int, *, threads_per_process: int, grace_s: float = 10.0,
           stderr=None) -> int:
    """Run ``python -m moesaic.train.cli <args>`` as ``nproc`` ranks on 127.0.0.1 (see module docstring).

    Args:
        args: the worker's command line (``train ...``).
        nproc: processes to start (>= 1).
        threads_per_process: ``OMP_NUM_THREADS`` of each worker.
        grace_s: after a worker fails, how long the others may take to end before they are killed.
        stderr: where the launcher's report goes (default ``sys.stderr``).

    Returns:
        0 when every worker succeeded; 128 + signal number when a signal stopped them; else the
        exit code of the failure shown (2: a configuration error).
    """
    stderr = sys.stderr if stderr is None else stderr
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    port = free_port()
    folder = tempfile.mkdtemp(prefix="moesaic-launch-")
    procs: List[subprocess.Popen] = []
    received: List[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum if len(received) == 1 else signal.SIGKILL)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        for rank in range(nproc):
            env = LaunchEnv(launched=True, rank=rank, world_size=nproc, local_rank=rank, local_world_size=nproc,
                            master_addr="127.0.0.1", master_port=port,
                            error_file=os.path.join(folder, f"rank{rank}.json"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "moesaic.train.cli", *args], stdin=subprocess.DEVNULL,
                env={**os.environ, **env.to_environ(), "OMP_NUM_THREADS": str(threads_per_process)},
                start_new_session=True, preexec_fn=_parent_death_signal))
        failed_at = None
        while any(p.poll() is None for p in procs):
            stop_codes = {128 + s for s in received} | {-s for s in received}
            if failed_at is None and any(p.returncode not in (None, 0) and p.returncode not in stop_codes
                                         for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        results = []
        for rank, p in enumerate(procs):
            error = _read_error(os.path.join(folder, f"rank{rank}.json"))
            if error is not None:
                try:
                    with open(os.path.join(folder, f"rank{rank}.json")) as f:
                        error["traceback"] = json.load(f)["message"]["extraInfo"]["py_callstack"]
                except (OSError, ValueError, KeyError):
                    pass
            results.append(WorkerResult(rank, p.returncode, error))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)
    if all(not r.failed for r in results):
        return 0
    stop_codes = {128 + s for s in received} | {-s for s in received}
    if received and all(r.code == 0 or r.code in stop_codes for r in results):
        if results[0].code < 0:  # rank 0 ended by the signal itself, before it could say anything
            print(f"moesaic train: stopped by {signal.Signals(received[0]).name} during start-up; nothing saved",
                  file=stderr)
        return 128 + received[0]  # stopped as asked; rank 0 said where the checkpoint is (or that none is)
    cause = root_cause(results)
    if len(received) > 1 and cause.error is None:  # the second signal killed them
        print("moesaic train: aborted, nothing saved", file=stderr)
        return 128 + received[0]
    print(f"moesaic train: {describe_failure(cause, nproc)}", file=stderr)
    if cause.error is not None:  # its own code, even if the process then died on the way out
        return 2 if cause.error.get("user_error") else 1
    if cause.code > 0:
        return cause.code
    return 128 - cause.code  # killed by a signal: the shell's convention
