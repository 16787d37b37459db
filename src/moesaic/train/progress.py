"""A one-line progress display for rank 0: step, loss, aux loss, dropped routes, tokens/s, ETA.

On a terminal the line is redrawn in place; otherwise (CI logs, pipes) a full line is printed every
``every`` steps so logs stay readable.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress of a training run from ``start`` to ``total`` steps."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, every: int = 10, stream=None) -> None:
        self.total, self.start, self.enabled, self.every = total, start, enabled, max(1, every)
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self._last = ""

    def _line(self, step: int, loss: float, aux: float, dropped: float, tokens_per_s: float) -> str:
        done = step - self.start
        rate = done / max(time.monotonic() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        eta_text = f"{eta:4.0f}s" if eta != float("inf") else "   ?"
        return (f"[{bar}] {step:>5}/{self.total}  loss {loss:.3f}  aux {aux:.3f}  dropped {dropped:5.1%}  "
                f"{tokens_per_s:8.0f} tok/s  ETA {eta_text}")

    def update(self, step: int, *, loss: float, aux: float, dropped: float, tokens_per_s: float) -> None:
        """Show the state after ``step``."""
        if not self.enabled:
            return
        self._last = self._line(step, loss, aux, dropped, tokens_per_s)
        if self.tty:
            self.stream.write("\r" + self._last)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            print(self._last, file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """Print a message on its own line (keeping the bar below it on a terminal)."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * len(self._last) + "\r")
        print(message, file=self.stream, flush=True)
        if self.tty and self._last:
            self.stream.write(self._last)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
