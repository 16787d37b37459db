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
  cause once: one line for a configuration error, the worker's traceback and one line for a bug.
  The root cause is the earliest failure that is not the echo of another one: a failed collective is
  an echo; a worker that died by a signal the launcher did not send (``kill -9``, the out-of-memory
  killer, a crash) is not, and it is named with its signal rather than the peer whose collective
  then failed.
* **a peer that stops answering** (``train.dist_timeout_s``): every worker beats (:mod:`.heartbeat`:
  a thread rewrites a small file every ``dist_timeout_s / 10`` s, at most every second, with the
  phase it is in). A worker silent for longer than ``dist_timeout_s`` while another one answers
  (SIGSTOP, a frozen container, a debugger) ends the run: the launcher kills every worker and names
  that rank, how long it was silent and in which phase. A worker that fails while a peer is
  stopped (``/proc`` state T) names the stopped peer at once. Collectives are bounded too, by the
  process group's timeout (the second line of defence, and the only one under torchrun), so every
  wait for a stopped or dead peer ends within about ``dist_timeout_s``.
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
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch.distributed as dist

from moesaic._checks import check_number
from moesaic.parallel.comm import CollectiveError
from moesaic.parallel.launch import LaunchEnv

from . import heartbeat
from .heartbeat import Silence, Watchdog
from .stop import STOP_SIGNALS


_KILL_WAIT_S = 10.0  # how long a killed worker may take to disappear before the launcher reports without it


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what a collective says when its peer went away or stopped answering (gloo's transport, NCCL's watchdog)
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting",
              "Socket Timeout", "NCCL communicator was aborted", "Watchdog caught collective")


def _is_secondary(err: BaseException) -> bool:
    """A failed collective is usually the echo of a peer that failed first: moesaic's own collective errors,
    torch's backend errors, and the bare ``RuntimeError`` a torch.distributed call raises when its peer is
    gone or silent."""
    if isinstance(err, CollectiveError) or isinstance(err, getattr(dist, "DistBackendError", ())):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_GONE)


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
    """How one worker ended: its exit code and, if it wrote one, its error record.

    Attributes:
        ended_at: when the launcher saw it end (``time.time()``; None: unknown).
        killed_by_launcher: the launcher killed it (after a peer failed): its end is no cause.
        silence: it stopped answering (the launcher then ended the run).
    """

    rank: int
    code: int
    error: Optional[dict] = None
    ended_at: Optional[float] = None
    killed_by_launcher: bool = False
    silence: Optional[Silence] = None

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
    """The failure to show (see module docstring).

    In this order: a worker that stopped answering (the longest silent); the earliest primary failure,
    that is a recorded error that is not a failed collective, or an end the worker did not record and
    the launcher did not cause (a signal such as SIGKILL, an exit code); the earliest failed collective;
    the first worker that failed at all.
    """
    failed = [r for r in results if r.failed]
    silent = [r for r in failed if r.silence is not None]
    if silent:
        return max(silent, key=lambda r: r.silence.seconds)

    def when(r: WorkerResult) -> float:
        t = r.error.get("time") if r.error else r.ended_at
        return float(t) if isinstance(t, (int, float)) else float("inf")

    primary = [r for r in failed if (not r.error.get("secondary", False) if r.error else not r.killed_by_launcher)]
    if primary:
        return min(primary, key=when)
    recorded = [r for r in failed if r.error]
    if recorded:
        return min(recorded, key=when)
    return failed[0] if failed else None


def describe_failure(result: WorkerResult, world: int) -> str:
    """The message for a failed worker (with the traceback first for a bug)."""
    where = f" (rank {result.rank} of {world})" if world > 1 else ""
    if result.silence is not None:
        return f"error{where}: {result.silence.describe()}; every process of the run was ended"
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


def process_stopped(pid: int) -> bool:
    """Whether the operating system holds process ``pid`` stopped (Linux ``/proc`` state T: SIGSTOP, SIGTSTP;
    t: a debugger). False where it cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("T", "t")


def launch(args: List[str], nproc: int, *, threads_per_process: int, grace_s: float = 10.0,
           dist_timeout_s: Optional[float] = None, stderr=None) -> int:
    """Run ``python -m moesaic.train.cli <args>`` as ``nproc`` ranks on 127.0.0.1 (see module docstring).

    Args:
        args: the worker's command line (``train ...``).
        nproc: processes to start (>= 1).
        threads_per_process: ``OMP_NUM_THREADS`` of each worker.
        grace_s: after a worker fails, how long the others may take to end before they are killed.
        dist_timeout_s: how long a worker may stop answering while another one answers
            (``train.dist_timeout_s``); None: the workers are not watched.
        stderr: where the launcher's report goes (default ``sys.stderr``).

    Returns:
        0 when every worker succeeded; 128 + signal number when a signal stopped them; else the
        exit code of the failure shown (2: a configuration error; 1: a bug, or a worker that stopped
        answering).
    """
    stderr = sys.stderr if stderr is None else stderr
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if dist_timeout_s is not None:
        check_number(dist_timeout_s, "dist_timeout_s", 0.0, lo_open=True)
    port = free_port()
    folder = tempfile.mkdtemp(prefix="moesaic-launch-")
    procs: List[subprocess.Popen] = []
    received: List[int] = []
    killed = set()  # ranks the launcher killed itself

    def kill_all() -> None:
        for rank, p in enumerate(procs):
            if p.poll() is None:
                killed.add(rank)
                try:
                    p.kill()  # (SIGKILL ends a stopped process too)
                except ProcessLookupError:
                    pass

    def forward(signum, frame):
        received.append(signum)
        if len(received) > 1:
            kill_all()
            return
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    beats = [os.path.join(folder, f"rank{rank}.beat") for rank in range(nproc)]
    watchdog = Watchdog(beats, dist_timeout_s) if dist_timeout_s is not None else None
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    ended_at: List[Optional[float]] = [None] * nproc
    silence: dict = {}
    try:
        for rank in range(nproc):
            env = LaunchEnv(launched=True, rank=rank, world_size=nproc, local_rank=rank, local_world_size=nproc,
                            master_addr="127.0.0.1", master_port=port,
                            error_file=os.path.join(folder, f"rank{rank}.json"))
            extra = {}
            if watchdog is not None:
                extra = {heartbeat.ENV_FILE: beats[rank],
                         heartbeat.ENV_INTERVAL: repr(heartbeat.interval_for(dist_timeout_s))}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "moesaic.train.cli", *args], stdin=subprocess.DEVNULL,
                env={**os.environ, **env.to_environ(), "OMP_NUM_THREADS": str(threads_per_process), **extra},
                start_new_session=True, preexec_fn=_parent_death_signal))
        failed_at = ended_all_at = None
        while any(p.poll() is None for p in procs):
            now = time.time()
            for rank, p in enumerate(procs):
                if p.returncode is not None and ended_at[rank] is None:
                    ended_at[rank] = now
            alive = [p.returncode is None for p in procs]
            stop_codes = {128 + s for s in received} | {-s for s in received}
            if failed_at is None and any(p.returncode not in (None, 0) and p.returncode not in stop_codes
                                         and rank not in killed for rank, p in enumerate(procs)):
                failed_at = time.monotonic()
            if watchdog is not None and not silence:
                watchdog.poll()
                found = watchdog.silent(alive)
                if found is not None:  # silent while a peer answers (and waits for it)
                    silence[found.rank] = replace(found, stopped=process_stopped(procs[found.rank].pid))
                elif failed_at is not None:  # a peer failed: a stopped worker is why (it cannot fail by itself)
                    for rank, p in enumerate(procs):
                        if alive[rank] and process_stopped(p.pid):
                            silence[rank] = Silence(rank, watchdog.silence(rank), watchdog.phase_of(rank), True)
                if silence:
                    kill_all()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                kill_all()
            if killed and ended_all_at is None:
                ended_all_at = time.monotonic()
            if ended_all_at is not None and time.monotonic() - ended_all_at > _KILL_WAIT_S:
                break  # a process that SIGKILL does not end (uninterruptible I/O): report without it
            time.sleep(0.05)
        now = time.time()
        results = []
        for rank, p in enumerate(procs):
            error = _read_error(os.path.join(folder, f"rank{rank}.json"))
            if error is not None:
                try:
                    with open(os.path.join(folder, f"rank{rank}.json")) as f:
                        error["traceback"] = json.load(f)["message"]["extraInfo"]["py_callstack"]
                except (OSError, ValueError, KeyError):
                    pass
            code = p.poll()
            results.append(WorkerResult(rank, -signal.SIGKILL if code is None else code, error,
                                        ended_at[rank] if ended_at[rank] is not None else now, rank in killed,
                                        silence.get(rank)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=_KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    print(f"moesaic train: process {p.pid} did not end after SIGKILL", file=stderr)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)
    if all(not r.failed for r in results):
        return 0
    stop_codes = {128 + s for s in received} | {-s for s in received}
    if not silence and received and all(r.code == 0 or r.code in stop_codes for r in results):
        if results[0].code < 0:  # rank 0 ended by the signal itself, before it could say anything
            print(f"moesaic train: stopped by {signal.Signals(received[0]).name} during start-up; nothing saved",
                  file=stderr)
        return 128 + received[0]  # stopped as asked; rank 0 said where the checkpoint is (or that none is)
    cause = root_cause(results)
    if not silence and len(received) > 1 and cause.error is None:  # the second signal killed them
        print("moesaic train: aborted, nothing saved", file=stderr)
        return 128 + received[0]
    print(f"moesaic train: {describe_failure(cause, nproc)}", file=stderr)
    if cause.silence is not None:
        return 1
    if cause.error is not None:  # its own code, even if the process then died on the way out
        return 2 if cause.error.get("user_error") else 1
    if cause.code > 0:
        return cause.code
    return 128 - cause.code  # killed by a signal: the shell's convention
