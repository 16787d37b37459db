"""A launched worker's sign of life, so that the launcher can name a peer that stopped answering.

A collective bounded by the process group's timeout (``train.dist_timeout_s``) fails on the rank
that *noticed* (the one left waiting), and says nothing of the rank that stopped; a stopped process
cannot report anything itself. So every worker of moesaic's launcher runs :class:`Heartbeat`: a
daemon thread that rewrites a small JSON file every ``interval_s`` seconds with a beat counter and
the phase the main thread is in (``"step 12"``, ``"saving checkpoint step12"``, set with
:func:`phase`, which also writes the file at once, so the launcher knows the phase a process stopped
in even when phases change faster than the beats). The thread beats whatever the main thread does (a
long step, a wait in a collective), so the beats stop only when the whole process stops running:
SIGSTOP, a frozen cgroup, a debugger's breakpoint. The launcher reads the files through :class:`Watchdog`, which names the rank that has been
silent for longer than the timeout while another rank still answers (see :mod:`.launcher`).

The files live in the launcher's private folder; the environment variables :data:`ENV_FILE` and
:data:`ENV_INTERVAL` tell a worker where and how often to beat. Without them (one process, torchrun)
nothing runs and :func:`phase` does nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .._checks import check_number

ENV_FILE = "MOESAIC_HEARTBEAT_FILE"
ENV_INTERVAL = "MOESAIC_HEARTBEAT_S"
_RECORD_BYTES = 512  # a beat's record, padded with spaces (JSON whitespace) so a shorter one covers a longer


def interval_for(timeout_s: float) -> float:
    """How often a worker beats for a launcher that waits ``timeout_s``: ten beats per timeout, at most one a
    second (a beat is one small file write)."""
    check_number(timeout_s, "timeout_s", 0.0, lo_open=True)
    return min(1.0, timeout_s / 10)


class Heartbeat:
    """Rewrites ``path`` every ``interval_s`` seconds from a daemon thread (see module docstring).

    Args:
        path: the file to write (rewritten in place).
        interval_s: seconds between beats (> 0).
    """

    def __init__(self, path: str, interval_s: float) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise TypeError(f"path must be a non-empty path, got {path!r}")
        check_number(interval_s, "interval_s", 0.0, lo_open=True)
        self.path, self.interval_s = str(path), float(interval_s)
        self._phase, self._beats = "start-up", 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the thread and set_phase both write
        self._fd: Optional[int] = None
        self._thread: Optional[threading.Thread] = None

    def set_phase(self, text: str) -> None:
        """What the main thread does now (shown by the launcher if this process stops answering); written at
        once while the heartbeat runs (a small file write: a few per training step)."""
        self._phase = text
        if self._thread is not None and not self._stop.is_set():
            try:
                self.beat()
            except OSError:  # the launcher removed its folder (it is ending the run)
                pass

    def beat(self) -> None:
        """Write one beat now: ``{"beat": n, "phase": ..., "pid": ...}``, padded to a fixed size and written
        in place with one ``pwrite`` (microseconds; a reader that catches it half-written skips that read)."""
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._beats += 1
            data = json.dumps({"beat": self._beats, "phase": self._phase[:200], "pid": os.getpid()})
            os.pwrite(self._fd, data.encode().ljust(_RECORD_BYTES), 0)

    def start(self) -> "Heartbeat":
        """Beat once, then every ``interval_s`` seconds from a daemon thread (it ends with the process)."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="moesaic-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (the launcher then sees this process as silent if it does not end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OSError:  # the launcher removed its folder (it is ending the run): nothing to tell
                return


_current: Optional[Heartbeat] = None


def start_from_environ(environ: Optional[Mapping[str, str]] = None) -> Optional[Heartbeat]:
    """Start this process's heartbeat when its launcher asked for one (:data:`ENV_FILE`); else None."""
    global _current
    environ = os.environ if environ is None else environ
    path = environ.get(ENV_FILE)
    if not path or _current is not None:
        return _current
    raw = environ.get(ENV_INTERVAL, "1")
    try:
        interval = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL} must be a number of seconds, got {raw!r}") from None
    _current = Heartbeat(path, interval).start()
    return _current


def phase(text: str) -> None:
    """Tell the launcher what this process is doing now; nothing when it runs without moesaic's launcher."""
    if _current is not None:
        _current.set_phase(text)


def read_beat(path: str) -> Optional[Dict]:
    """The last beat written to ``path`` (None before the first one, or when it cannot be read)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("beat"), int) else None


@dataclass(frozen=True)
class Silence:
    """A worker that stopped answering: for how long (seconds) and in which phase."""

    rank: int
    seconds: float
    phase: str
    stopped: bool = False  # the operating system says the process is stopped (SIGSTOP, a debugger)

    def describe(self) -> str:
        why = " (the process is stopped: SIGSTOP or a debugger)" if self.stopped else ""
        return f"stopped answering for {self.seconds:.0f} s during {self.phase}{why}"


class Watchdog:
    """The launcher's reader of its workers' heartbeats (see module docstring).

    Silence is measured on the launcher's clock, from the last time the launcher saw a worker's beat
    counter change. A worker is watched from its first beat on: before it, it is still importing
    (seconds, or more on a loaded machine), and a peer waits for it only in the process group's
    rendezvous, which the process group's timeout bounds (the launcher then finds a stopped worker
    through ``/proc``).

    Args:
        paths: each rank's heartbeat file, by rank.
        timeout_s: how long a worker may be silent while another one answers (``train.dist_timeout_s``).
        clock: seconds, monotonic (for tests).
    """

    def __init__(self, paths: Sequence[str], timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        check_number(timeout_s, "timeout_s", 0.0, lo_open=True)
        self.paths, self.timeout_s, self._clock = list(paths), float(timeout_s), clock
        n = len(self.paths)
        self._beat: List[Optional[int]] = [None] * n
        self._changed: List[Optional[float]] = [None] * n  # launcher clock of the last change seen
        self._phase: List[str] = ["start-up"] * n
        self._start = clock()

    def poll(self) -> None:
        """Read every heartbeat file once."""
        now = self._clock()
        for rank, path in enumerate(self.paths):
            data = read_beat(path)
            if data is not None and data["beat"] != self._beat[rank]:
                self._beat[rank], self._changed[rank] = data["beat"], now
                self._phase[rank] = str(data.get("phase", "?"))

    def silence(self, rank: int) -> float:
        """Seconds since ``rank`` last answered (before its first beat: since the watchdog was made, with the
        workers)."""
        return self._clock() - (self._changed[rank] if self._changed[rank] is not None else self._start)

    def phase_of(self, rank: int) -> str:
        return self._phase[rank]

    def silent(self, alive: Sequence[bool]) -> Optional[Silence]:
        """The live worker silent the longest, if for more than the timeout while another worker answers or has
        ended (so a peer waits, or waited, for it); None otherwise."""
        candidates = [(self.silence(r), r) for r in range(len(self.paths)) if alive[r] and self._beat[r] is not None]
        over = [(s, r) for s, r in candidates if s > self.timeout_s]
        if not over:
            return None
        seconds, rank = max(over)
        others_wait = any(not alive[r] or self.silence(r) <= self.timeout_s
                          for r in range(len(self.paths)) if r != rank)
        return Silence(rank, seconds, self.phase_of(rank)) if others_wait else None
