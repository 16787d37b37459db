"""Argument checks shared by every config and constructor: one wording for one kind of mistake.

Each check takes the value and its ``key`` (the full key path inside a config, ``engine.optimizer.params.lr``,
or an argument name), returns the value normalised (ints given for floats become floats, lists of a
fixed shape become tuples) and otherwise raises: ``TypeError`` for a wrong type, ``ValueError`` for a
wrong value. Every message names the key, shows the value and states what is allowed. ``bool`` never
passes for a number (``True`` is an ``int`` to Python, never to a config).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple


def join_key(path: str, key: Any) -> str:
    """The key path of ``key`` under ``path``: ``"engine.fp16"`` + ``"enabled"``, or ``"betas"`` + ``0`` -> ``"betas[0]"``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _got(value: Any) -> str:
    return f"got {type(value).__name__}: {value!r}"


def check_int(value: Any, key: str, lo: Optional[int] = None, hi: Optional[int] = None, *, hi_text: str = "",
              none_word: Optional[str] = None) -> Optional[int]:
    """``value`` as an int in ``[lo, hi]``; None passes when ``none_word`` (e.g. "null") is given."""
    if value is None and none_word is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        what = f"an int or {none_word}" if none_word is not None else "an int"
        raise TypeError(f"{key} must be {what}, {_got(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is None:
            allowed = f"<= {hi_text or hi}"
        else:
            allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi_text or hi}]"
        raise ValueError(f"{key} must be an int {allowed}, got {value!r}")
    return value


def check_number(value: Any, key: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False, allow_none: bool = False) -> Optional[float]:
    """``value`` as a finite float in the interval from ``lo`` to ``hi`` (open ends as asked)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "a number or null" if allow_none else "a number"
        raise TypeError(f"{key} must be {what}, {_got(value)}")
    value = float(value)
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if not math.isfinite(value) or too_low or too_high:
        span = f"{'(' if lo_open or lo == -math.inf else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
        raise ValueError(f"{key} must be a finite number in {span}, got {value!r}")
    return value


def check_bool(value: Any, key: str) -> bool:
    """``value`` as a bool; 0/1 and "true" are refused (a typo in a config must not read as a flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be a bool (true/false), {_got(value)}")
    return value


def check_str(value: Any, key: str, *, allow_empty: bool = False, allow_none: bool = False) -> Optional[str]:
    """``value`` as a str (non-empty unless ``allow_empty``); None passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    what = ("a str" if allow_empty else "a non-empty str") + (" or null" if allow_none else "")
    if not isinstance(value, str):
        raise TypeError(f"{key} must be {what}, {_got(value)}")
    if not value and not allow_empty:
        raise ValueError(f"{key} must be {what}, got {value!r}")
    return value


def check_choice(value: Any, key: str, choices: Sequence[Any], *, fold_case: bool = False) -> Any:
    """``value`` as one of ``choices`` (returned in its canonical spelling when ``fold_case``)."""
    kinds = {type(c) for c in choices}
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind is not None and (isinstance(value, bool) != (kind is bool) or not isinstance(value, kind)):
        raise TypeError(f"{key} must be a {kind.__name__}, one of {list(choices)}, {_got(value)}")
    for choice in choices:
        if value == choice or (fold_case and isinstance(value, str) and value.lower() == choice.lower()):
            return choice
    raise ValueError(f"{key} must be one of {list(choices)}{' (any case)' if fold_case else ''}, got {value!r}")


def check_mapping(value: Any, key: str) -> Mapping[str, Any]:
    """``value`` as a mapping with str keys (a dict, a JSON object, a TOML table)."""
    where = key or "config"
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a mapping (dict / JSON object / TOML table), {_got(value)}")
    for name in value:
        if not isinstance(name, str):
            raise TypeError(f"{where} keys must be str, got {type(name).__name__}: {name!r}")
    return value


def check_keys(value: Any, key: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    """``value`` as a mapping whose keys are all in ``allowed``; an unknown key names its full path."""
    check_mapping(value, key)
    allowed = list(allowed)
    for name in value:
        if name not in allowed:
            where = f"under {key}" if key else "at the top level"
            raise ValueError(f"unknown key {join_key(key, name)!r}; allowed keys {where}: "
                             f"{', '.join(sorted(allowed)) or '(none)'}")
    return value


def check_list(value: Any, key: str, item: Optional[Callable[[Any, str], Any]] = None, *,
               length: Optional[int] = None, min_length: int = 0, what: str = "values") -> Tuple[Any, ...]:
    """``value`` as a tuple of ``item``-checked entries (each named ``key[i]``).

    Args:
        value: a list or tuple.
        key: its key path.
        item: checks and normalises one entry, called as ``item(entry, "key[i]")``.
        length: the exact length required, if any.
        min_length: the least length allowed.
        what: the entries in words, for messages (``"2 numbers in [0, 1)"``).
    """
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{key} must be a list of {what}, {_got(value)}")
    if (length is not None and len(value) != length) or len(value) < min_length:
        need = f"exactly {length}" if length is not None else f"at least {min_length}"
        raise ValueError(f"{key} must be a list of {what} ({need} entries), got {len(value)}: {list(value)!r}")
    if item is None:
        return tuple(value)
    return tuple(item(v, join_key(key, i)) for i, v in enumerate(value))


def _same(a: Any, b: Any) -> bool:
    """Config equality: a bool never equals a number, an int equals the float it is (5e8 == 500000000)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def only(allowed: Sequence[Any], why: str) -> Callable[[Any, str], Any]:
    """A check accepting the values in ``allowed`` and refusing any other value with ``why``.

    For keys of another library's config (DeepSpeed's) whose accepted values describe what this
    library always does; the message says what it does instead.

    Args:
        allowed: the accepted values.
        why: what is done instead, for the message (one clause, no final period).
    """
    allowed = tuple(allowed)

    def check(value: Any, key: str) -> Any:
        for a in allowed:
            if _same(value, a):
                return a
        spelled = " or ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else repr(a)
                              for a in allowed)
        raise ValueError(f"{key}={value!r} is not supported by moesaic: {why}; allowed: {spelled}")

    return check


def check_elements(value: Any, key: str, none_word: Optional[str] = None) -> Optional[int]:
    """A size in elements: an int >= 1, or an integral float as DeepSpeed configs write it (``5e8``)."""
    if value is None and none_word is not None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_int(value, key, lo=1, none_word=none_word)


def moved_names(module: str, moved: Dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that moved: ``AttributeError`` naming each one's new place.

    Args:
        module: the module's name (``__name__``).
        moved: ``{old name: where it lives now}`` (``"moesaic.deepspeed.initialize"``).
    """
    def __getattr__(name: str) -> Any:
        if name in moved:
            raise AttributeError(f"{module}.{name} moved: use {moved[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__
