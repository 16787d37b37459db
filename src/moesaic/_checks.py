"""Argument checks shared by every config and constructor: one wording for one kind of mistake.

Each names the key (or argument), shows the value and states what is allowed; ``bool`` never
passes for a number.
"""

from __future__ import annotations

import math
from typing import Any, Optional


def check_int(value: Any, key: str, lo: Optional[int] = None, hi: Optional[int] = None, *, hi_text: str = "",
              none_word: Optional[str] = None) -> Optional[int]:
    """``value`` as an int in ``[lo, hi]``; None passes when ``none_word`` (e.g. "null") is given."""
    if value is None and none_word is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        what = f"an int or {none_word}" if none_word is not None else "an int"
        raise TypeError(f"{key} must be {what}, got {type(value).__name__}: {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi_text or hi}]"
        raise ValueError(f"{key} must be an int {allowed}, got {value!r}")
    return value


def check_number(value: Any, key: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False, allow_none: bool = False) -> Optional[float]:
    """``value`` as a finite float in the interval from ``lo`` to ``hi`` (open ends as asked)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if not math.isfinite(value) or too_low or too_high:
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
        raise ValueError(f"{key} must be a finite number in {span}, got {value!r}")
    return value
