"""The seconds and tokens/s of a whole training run, across the segments that stops and ``--resume`` cut it into.

A run stopped (Ctrl-C, SIGTERM, ``train.max_minutes``) and resumed is one run trained in several
segments, one per ``moesaic train`` invocation. ``summary.json`` reports the whole run: the seconds
of every segment added up, every trained token over those seconds, and the list of segments
(``first_step``, ``last_step``, ``steps``, ``seconds``, ``tokens``, ``tokens_per_s``, ``world_size``).

Each checkpoint carries the segments up to its own step (client state ``"segments"``), so the run
that resumes from it continues the list. The seconds of a segment run from the start of its first
step to its last step (model building, loading and process start-up are not counted). Steps a
killed process trained after its last checkpoint are trained again after ``--resume`` and counted
once, in the segment that trains them again; a run resumed from a checkpoint written before
segments were recorded times only the steps since (its first segment starts after step 1).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

SEGMENT_KEYS = ("first_step", "last_step", "steps", "seconds", "tokens", "tokens_per_s", "world_size")


def check_segments(value: Any, what: str) -> List[Dict[str, Any]]:
    """The segments a checkpoint holds, checked (a ValueError naming ``what`` and the entry otherwise)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{what}: 'segments' must be a list of segments, got {type(value).__name__}")
    out = []
    for i, seg in enumerate(value):
        if not isinstance(seg, dict) or sorted(seg) != sorted(SEGMENT_KEYS):
            raise ValueError(f"{what}: segments[{i}] must hold exactly {list(SEGMENT_KEYS)}, got {seg!r}")
        ints = [seg[k] for k in ("first_step", "last_step", "steps", "tokens", "world_size")]
        floats = [seg[k] for k in ("seconds", "tokens_per_s")]
        if (not all(type(v) is int and v >= 0 for v in ints) or not all(type(v) in (int, float) and v >= 0 for v in floats)
                or seg["steps"] != seg["last_step"] - seg["first_step"] + 1 or seg["steps"] < 1):
            raise ValueError(f"{what}: segments[{i}] = {seg!r} is not a segment (non-negative counts, "
                             "steps = last_step - first_step + 1 >= 1, seconds >= 0)")
        out.append(dict(seg))
    return out


class RunClock:
    """Times this segment of a run and joins it to the earlier ones.

    Args:
        earlier: the segments before this one (from the checkpoint resumed; [] for a fresh run).
        start_step: the step this segment starts after (the checkpoint's step; 0 for a fresh run).
        tokens_per_step: tokens (bytes, for the byte-level GPT) one optimizer step trains on, all
            processes together.
        world_size: processes of this segment.
    """

    def __init__(self, earlier: List[Dict[str, Any]], start_step: int, tokens_per_step: int,
                 world_size: int) -> None:
        self.earlier = check_segments(earlier, "earlier segments")
        self.start_step, self.tokens_per_step, self.world_size = start_step, tokens_per_step, world_size
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of this segment so far."""
        return time.perf_counter() - self.t0

    def segments(self, step: int) -> List[Dict[str, Any]]:
        """The earlier segments and this one up to ``step`` (this one left out while it has no step)."""
        steps = step - self.start_step
        if steps <= 0:
            return [dict(s) for s in self.earlier]
        seconds = self.elapsed()
        tokens = self.tokens_per_step * steps
        here = {"first_step": self.start_step + 1, "last_step": step, "steps": steps, "seconds": seconds,
                "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9), "world_size": self.world_size}
        return [dict(s) for s in self.earlier] + [here]

    def summary(self, step: int) -> Dict[str, Any]:
        """``{"seconds", "tokens_per_s", "segments"}`` of the whole run up to ``step``."""
        segments = self.segments(step)
        seconds = sum(s["seconds"] for s in segments)
        tokens = sum(s["tokens"] for s in segments)
        return {"seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9), "segments": segments}


__all__ = ["RunClock", "SEGMENT_KEYS", "check_segments"]
