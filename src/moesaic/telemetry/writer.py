"""``MetricsWriter``: nested metric dicts to TensorBoard event files and a long-format CSV.

Nested dicts flatten to slash-separated tags and list entries to ``<tag>/<index>``, so
``{"moe": {"layers.1.mlp": {"tokens_per_expert": [5, 3]}}}`` becomes the scalars
``moe/layers.1.mlp/tokens_per_expert/0`` and ``.../1`` (index = expert number). Every list at
``moe/<layer>/tokens_per_expert`` is also logged as the histogram ``moe/<layer>/load_histogram``
(TensorBoard only). Non-finite values (nan, inf) are written as they are, never dropped.
TensorBoard stores scalars as float32; the CSV keeps full precision (ints stay ints).
"""

from __future__ import annotations

import csv as _csv  # the ``csv`` flag of MetricsWriter would shadow the module
import functools
import math
import numbers
import os
import time
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["MetricsWriter", "read_csv_metrics"]

CSV_NAME = "metrics.csv"
CSV_HEADER = ["step", "tag", "value"]
Number = Union[int, float]


def _number(value, tag: str) -> Number:
    """``value`` as a Python int or float, or TypeError naming ``tag``."""
    if isinstance(value, Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"metric {tag!r} must be a number, a list of numbers or a dict, got "
                        f"{type(value).__name__}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _flatten(metrics: dict) -> Tuple[List[Tuple[str, Number]], List[Tuple[str, List[Number]]]]:
    """Flatten nested metrics to ``[(tag, number)]`` plus the load histograms ``[(tag, values)]``."""
    scalars: List[Tuple[str, Number]] = []
    histograms: List[Tuple[str, List[Number]]] = []
    seen = set()

    def add(tag: str, value: Number) -> None:
        if tag in seen:
            raise ValueError(f"metric tag {tag!r} occurs twice after flattening; rename one of the keys")
        seen.add(tag)
        scalars.append((tag, value))

    def walk(path: List[str], value) -> None:
        tag = "/".join(path)
        if isinstance(value, dict):
            for key, sub in value.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"metric keys must be non-empty str, got {key!r} "
                                    f"({type(key).__name__}) under {tag or '<root>'!r}")
                walk(path + [key], sub)
            return
        if isinstance(value, Tensor) and value.dim() == 1:
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            numbers_ = [_number(v, f"{tag}/{i}") for i, v in enumerate(value)]
            for i, v in enumerate(numbers_):
                add(f"{tag}/{i}", v)
            if len(path) >= 3 and path[0] == "moe" and path[-1] == "tokens_per_expert":
                histograms.append(("/".join(path[:-1] + ["load_histogram"]), numbers_))
            return
        add(tag, _number(value, tag))

    walk([], metrics)
    return scalars, histograms


def _format(value: Number) -> str:
    return str(value) if isinstance(value, int) else repr(value)  # repr: nan, inf, -inf, shortest round trip


def _parse(text: str) -> Number:
    try:
        return int(text)
    except ValueError:
        return float(text)


@functools.lru_cache(maxsize=None)
def _warn_no_tensorboard_once() -> None:
    """One warning per process that metrics go to CSV only (cached: later calls do nothing)."""
    warnings.warn("the tensorboard package is not installed: metrics go to metrics.csv only "
                  "(pip install 'moesaic[train]' or tensorboard for event files)", RuntimeWarning, stacklevel=3)


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (which torch's ``SummaryWriter`` needs) can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsWriter:
    """Write nested metric dicts as TensorBoard scalars and ``metrics.csv`` rows (``step,tag,value``).

    Args:
        log_dir: folder for the event files and ``metrics.csv`` (created if missing; an existing
            ``metrics.csv`` is appended to, so a resumed run continues the same file: call
            :meth:`discard_after` with the step it resumes from first).
        tensorboard: True: write TensorBoard event files (needs the ``tensorboard`` package, an
            ImportError otherwise); False: never; None (default): when the package is installed,
            else CSV only, with one warning per process naming the extra that brings it.
        csv: append rows to ``log_dir/metrics.csv``.
        flush_every: flush both outputs every this many ``write`` calls.

    Raises:
        ImportError: ``tensorboard=True`` and the ``tensorboard`` package is missing.
        ValueError: both outputs disabled, or an existing ``metrics.csv`` has another header.
    """

    def __init__(self, log_dir: Union[str, os.PathLike], *, tensorboard: Optional[bool] = None, csv: bool = True,
                 flush_every: int = 1) -> None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a str or path, got {type(log_dir).__name__}")
        if tensorboard is not None and not isinstance(tensorboard, bool):
            raise TypeError(f"tensorboard must be True, False or None (when installed), got {tensorboard!r}")
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if tensorboard is None:
            tensorboard = tensorboard_available()
            if not tensorboard and csv:
                _warn_no_tensorboard_once()
        elif tensorboard and not tensorboard_available():
            raise ImportError("MetricsWriter(tensorboard=True) needs the tensorboard package: pip install "
                              "'moesaic[train]' (or tensorboard), or pass tensorboard=None to write CSV only "
                              "when it is missing")
        if not tensorboard and not csv:
            raise ValueError("MetricsWriter with tensorboard=False and csv=False would write nothing; "
                             "enable at least one")
        self.log_dir = os.fspath(log_dir)
        self.tensorboard = tensorboard
        self.flush_every = flush_every
        self._writes = 0
        self._closed = False
        self._tb = None  # created at the first write, so discard_after can still set its purge step
        self._purge_step: Optional[int] = None
        self._csv_file = None
        self._csv = None
        os.makedirs(self.log_dir, exist_ok=True)
        self._csv_path = os.path.join(self.log_dir, CSV_NAME)
        csv_exists = csv and os.path.exists(self._csv_path) and os.path.getsize(self._csv_path) > 0
        if csv_exists:  # check before creating anything, so a refusal leaves no files behind
            with open(self._csv_path, newline="") as f:
                header = next(_csv.reader(f), None)
            if header != CSV_HEADER:
                raise ValueError(f"{self._csv_path} exists with header {header}, not {CSV_HEADER}; use another "
                                 "log_dir")
        if csv:
            self._open_csv(write_header=not csv_exists)

    def _open_csv(self, write_header: bool) -> None:
        self._csv_file = open(self._csv_path, "a", newline="")
        self._csv = _csv.writer(self._csv_file)
        if write_header:
            self._csv.writerow(CSV_HEADER)
            self._csv_file.flush()

    def _tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            if self._purge_step is not None:
                self._after_existing_event_files()
            # purge_step: TensorBoard hides events at and after it from earlier sessions (a resumed run)
            self._tb = SummaryWriter(log_dir=self.log_dir, purge_step=self._purge_step)
        return self._tb

    def _after_existing_event_files(self) -> None:
        """Wait (at most a second) until a new event file's name sorts after every existing one.

        TensorBoard reads a folder's event files in name order, and a name starts with the second the
        file was created; a file created in the same second as an earlier one can sort before it, so the
        purge it carries would come before the events it must hide.
        """
        newest = 0
        for name in os.listdir(self.log_dir):
            parts = name.split(".")
            if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
                newest = max(newest, int(parts[3]))
        while int(time.time()) <= newest:
            time.sleep(0.05)

    def discard_after(self, step: int) -> int:
        """Forget what earlier sessions wrote after ``step`` (a run resumed from a checkpoint at ``step``).

        Rows of ``metrics.csv`` with a larger step are removed (the file is rewritten atomically), and
        the next TensorBoard event file starts with a purge of the events after ``step`` (TensorBoard's
        ``purge_step``), so the steps trained again after a resume appear once, not twice.

        Args:
            step: the last step to keep, an int >= 0.

        Returns:
            The number of CSV rows removed.

        Raises:
            ValueError: ``step`` is not an int >= 0.
            RuntimeError: the writer is closed.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self._closed:
            raise RuntimeError(f"MetricsWriter({self.log_dir!r}) is closed")
        if self._tb is not None:  # TensorBoard purges when a writer starts: the next write starts a new one
            self._tb.close()
            self._tb = None
        self._purge_step = int(step) + 1
        if self._csv is None:
            return 0
        self._csv_file.close()
        with open(self._csv_path, newline="") as f:
            rows = list(_csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if len(r) == 3 and r[0].isdigit() and int(r[0]) <= step]
        tmp = self._csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            _csv.writer(f).writerows(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._csv_path)
        self._open_csv(write_header=False)
        return len(rows) - len(kept)

    def write(self, step: int, metrics: dict) -> None:
        """Write one step's metrics (validated completely before anything is written).

        Args:
            step: the global step, a non-negative int.
            metrics: nested dict of numbers, lists of numbers (index = expert number) and dicts;
                0-dim and 1-dim tensors are accepted as a number and a list.

        Raises:
            TypeError: ``step`` is not an int, ``metrics`` not a dict, or a value of another
                type (the message names its tag).
            ValueError: ``step`` is negative, or two entries flatten to the same tag.
            RuntimeError: the writer is closed.
        """
        if self._closed:
            raise RuntimeError(f"MetricsWriter({self.log_dir!r}) is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        scalars, histograms = _flatten(metrics)
        if self._csv is not None:
            self._csv.writerows([step, tag, _format(value)] for tag, value in scalars)
        if self.tensorboard:
            tb = self._tensorboard()
            for tag, value in scalars:
                tb.add_scalar(tag, float(value), step)
            for tag, values in histograms:
                finite = [float(v) for v in values if math.isfinite(v)]
                if finite:
                    tb.add_histogram(tag, torch.tensor(finite, dtype=torch.float64), step)
        self._writes += 1
        if self._writes % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        """Push everything written so far to disk."""
        if self._csv_file is not None and not self._csv_file.closed:
            self._csv_file.flush()
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both outputs; further ``write`` calls raise. Safe to call twice."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._tb is not None:
            self._tb.close()
        if self._csv_file is not None:
            self._csv_file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_csv_metrics(path: Union[str, os.PathLike]) -> Dict[str, List[Tuple[int, Number]]]:
    """Read a ``metrics.csv`` written by ``MetricsWriter`` back into series.

    Args:
        path: the CSV file, or the ``log_dir`` holding ``metrics.csv``.

    Returns:
        ``{tag: [(step, value), ...]}`` in file order; values are ints where written as ints,
        floats otherwise (nan and inf included).

    Raises:
        ValueError: the file does not start with the header ``step,tag,value`` or a row is malformed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CSV_NAME)
    series: Dict[str, List[Tuple[int, Number]]] = {}
    with open(path, newline="") as f:
        rows = _csv.reader(f)
        header = next(rows, None)
        if header != CSV_HEADER:
            raise ValueError(f"{path} does not start with the header {','.join(CSV_HEADER)} (got {header})")
        for line, row in enumerate(rows, start=2):
            if len(row) != 3:
                raise ValueError(f"{path}:{line}: expected 3 fields step,tag,value, got {row}")
            series.setdefault(row[1], []).append((int(row[0]), _parse(row[2])))
    return series
