"""Stopping a run cleanly: SIGINT/SIGTERM become a request that every rank honours at the same step.

A signal handler only sets a flag; the loop finishes the step it is in. At every step boundary the
ranks combine their flags in one small all-reduce (:meth:`StopRequest.agree`), so they stop after the
same step even when the signal reached them at different moments (or reached one of them only), then
save a checkpoint together. The time limit (``train.max_minutes``) goes through the same all-reduce:
clocks of different ranks cross the deadline at different steps, and a rank that stopped alone would
leave the others waiting in the checkpoint's collectives.

A second signal aborts at once without saving (:class:`Aborted`, a ``KeyboardInterrupt``); so does a
signal before the loop has started (:func:`abort_on_signals`).
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """Raised by the trainer after a signal stopped it and the checkpoint was saved.

    Attributes:
        step: the last step trained (and saved).
        checkpoint: the checkpoint folder written.
        signum: the signal that asked for the stop.
        resume_command: the command that continues the run (None when unknown).
    """

    def __init__(self, step: int, checkpoint, signum: int, resume_command: Optional[str] = None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        self.resume_command = resume_command

    def line(self) -> str:
        """The one line a stopped run prints."""
        return (f"stopped at step {self.step} ({signal.Signals(self.signum).name}), checkpoint {self.checkpoint}; "
                f"resume with: {self.resume_command or 'moesaic train <same arguments> --resume'}")

    @property
    def exit_code(self) -> int:
        """``128 + signal number``, the shell's convention (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class Aborted(KeyboardInterrupt):
    """A stop signal that arrived where no step can be finished first (start-up), or a second signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def abort_on_signals() -> None:
    """Outside the training loop, SIGINT and SIGTERM raise :class:`Aborted` (SIGTERM would otherwise end the
    process without a word). Call in the main thread."""
    def handler(signum, frame):
        raise Aborted(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag while installed (a context manager); see the module docstring.

    Args:
        on_first: called with the signal number when the first signal arrives (e.g. to say that the
            run will stop after the current step).
    """

    def __init__(self, on_first: Optional[Callable[[int], None]] = None) -> None:
        self.signum: Optional[int] = None
        self._on_first = on_first
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: abort now, without saving
            self.__exit__()
            raise Aborted(signum)
        self.signum = signum
        if self._on_first is not None:
            self._on_first(signum)

    def agree(self, out_of_time: bool = False, device: Optional[torch.device] = None) -> Tuple[Optional[int], bool]:
        """Combine every rank's flags (collective when the world is initialised).

        Args:
            out_of_time: this rank's clock passed the run's deadline.
            device: where the flag tensor lives (NCCL reduces CUDA tensors only).

        Returns:
            ``(signal number or None, out_of_time)`` as every rank sees them: a signal on any rank
            stops all of them; so does a deadline passed on any rank.
        """
        flags = torch.tensor([self.signum or 0, int(out_of_time)], dtype=torch.int64, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, late = (int(v) for v in flags.tolist())
        return (signum or None), bool(late)
