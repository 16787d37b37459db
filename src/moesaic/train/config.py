"""Typed, frozen training configs for ``moesaic train``, read from TOML (or a dict) and validated.

A config has five sections: ``model`` (:class:`~moesaic.models.GPTConfig`), ``data``, ``optim``,
``train`` and ``moe``; every section and key is optional. Each error is a ``ValueError`` or
``TypeError`` naming the full key (``train.batch_size``), the value and what is allowed; unknown
keys at any level are errors listing the allowed ones, so a typo never falls back to a default.
Combinations that cannot run (``train.nproc`` not divisible by ``model.ep_size`` ...) fail here,
before any process starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

from .._checks import check_int, check_number
from ..models.gpt import GPTConfig
from .data import DEFAULT_SUFFIXES

SPLIT_BY = ("expert", "layer")


def _int(value: Any, key: str, lo: int, hi: Optional[int] = None, allow_none: bool = False) -> None:
    check_int(value, key, lo, hi, none_word="absent" if allow_none else None)


def _float(value: Any, key: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
           allow_none: bool = False) -> Optional[float]:
    return check_number(value, key, lo, hi, lo_open=lo_open, hi_open=hi_open, allow_none=allow_none)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise a frozen field (int -> float, list -> tuple)


@dataclass(frozen=True)
class DataConfig:
    """``data``: the corpus (None: the standard library's source) and its validation share."""

    path: Optional[str] = None
    val_percent: int = 5
    suffixes: Tuple[str, ...] = DEFAULT_SUFFIXES

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise TypeError(f"data.path must be a non-empty str (a file or folder) or absent, got {self.path!r}")
        _int(self.val_percent, "data.val_percent", 1, 50)
        if not isinstance(self.suffixes, (list, tuple)) or not self.suffixes or \
                not all(isinstance(s, str) and s for s in self.suffixes):
            raise TypeError(f"data.suffixes must be a non-empty list of non-empty str (e.g. [\".txt\"]), "
                            f"got {self.suffixes!r}")
        _set(self, "suffixes", tuple(self.suffixes))


@dataclass(frozen=True)
class OptimConfig:
    """``optim``: AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _set(self, "lr", _float(self.lr, "optim.lr", 0.0, lo_open=True))
        _set(self, "weight_decay", _float(self.weight_decay, "optim.weight_decay", 0.0))
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise TypeError(f"optim.betas must be a list of 2 numbers in [0, 1), got {self.betas!r}")
        _set(self, "betas", tuple(_float(b, f"optim.betas[{i}]", 0.0, 1.0, hi_open=True)
                                  for i, b in enumerate(self.betas)))
        _int(self.warmup_steps, "optim.warmup_steps", 0)
        _set(self, "grad_clip", _float(self.grad_clip, "optim.grad_clip", 0.0))
        _set(self, "min_lr_ratio", _float(self.min_lr_ratio, "optim.min_lr_ratio", 0.0, 1.0))


@dataclass(frozen=True)
class LoopConfig:
    """``train``: the loop. ``batch_size`` is per process; ``max_minutes`` stops early (None: never)."""

    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100  # 0: only the final checkpoint
    log_every: int = 10
    seed: int = 1337
    bf16: bool = False
    nproc: int = 1
    max_minutes: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "nproc"):
            _int(getattr(self, name), f"train.{name}", 1)
        _int(self.checkpoint_every, "train.checkpoint_every", 0)
        _int(self.seed, "train.seed", 0)
        if not isinstance(self.bf16, bool):
            raise TypeError(f"train.bf16 must be a bool (true/false), got {type(self.bf16).__name__}: {self.bf16!r}")
        _set(self, "max_minutes", _float(self.max_minutes, "train.max_minutes", 0.0, lo_open=True, allow_none=True))


@dataclass(frozen=True)
class MoEOptConfig:
    """``moe``: how expert parameters are grouped in the optimizer (see ``moesaic.optim``)."""

    split_by: str = "expert"
    max_group_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"moe.split_by must be one of {list(SPLIT_BY)}, got {self.split_by!r}")
        _int(self.max_group_size, "moe.max_group_size", 1, allow_none=True)


_SECTIONS = {"model": GPTConfig, "data": DataConfig, "optim": OptimConfig, "train": LoopConfig, "moe": MoEOptConfig}


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run: the five sections, cross-checked."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    moe: MoEOptConfig = field(default_factory=MoEOptConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        ep, nproc = self.model.ep_size, self.train.nproc
        if nproc % ep:
            raise ValueError(f"train.nproc ({nproc}) must be divisible by model.ep_size ({ep}): the processes "
                             f"form groups of ep_size that share the experts; use nproc in {ep}, {2 * ep}, ...")

    def to_dict(self) -> dict:
        """Nested plain dict (tuples as lists; None kept), for checkpoints; loads back unchanged."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        return {name: {k: plain(v) for k, v in asdict(getattr(self, name)).items()} for name in _SECTIONS}

    def with_overrides(self, overrides: Optional[Mapping[str, Any]] = None, **dotted: Any) -> "TrainConfig":
        """A copy with ``"section.key"`` values replaced (CLI flags), validated like a file.

        Args:
            overrides: ``{"train.steps": 10, ...}``.
            **dotted: more of the same (``**{"optim.lr": 1e-3}``).

        Returns:
            The new TrainConfig.
        """
        merged = self.to_dict()
        for key, value in {**(overrides or {}), **dotted}.items():
            section, _, name = key.partition(".")
            if section not in _SECTIONS or not name:
                raise ValueError(f"override {key!r} must look like 'section.key' with section one of "
                                 f"{', '.join(_SECTIONS)}")
            allowed = [f.name for f in fields(_SECTIONS[section])]
            if name not in allowed:
                raise ValueError(f"unknown key {key!r}; allowed keys under {section}: {', '.join(allowed)}")
            merged[section][name] = value
        return load_train_config(merged)


def _read_toml(path: Path) -> dict:
    try:
        import tomllib as toml  # Python 3.11+
    except ImportError:  # Python 3.10: the same parser ships as 'tomli'
        import tomli as toml
    try:
        return toml.loads(path.read_text(encoding="utf-8"))
    except toml.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None


def load_train_config(source: Union[str, os.PathLike, Mapping[str, Any], TrainConfig, None] = None) -> TrainConfig:
    """Read and validate a training config.

    Args:
        source: a ``.toml`` path, a mapping of sections, a TrainConfig (returned as is) or None
            (all defaults).

    Returns:
        The validated, frozen TrainConfig.

    Raises:
        ValueError / TypeError: naming the full key, its value and what is allowed.
    """
    if isinstance(source, TrainConfig):
        return source
    if source is None:
        source = {}
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix != ".toml":
            raise ValueError(f"config file {str(path)!r} must end in .toml")
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        source = _read_toml(path)
    if not isinstance(source, Mapping):
        raise TypeError(f"config must be a .toml path, a mapping or a TrainConfig, got {type(source).__name__}")
    for key in source:
        if key not in _SECTIONS:
            raise ValueError(f"unknown key {key!r}; allowed keys at the top level: {', '.join(_SECTIONS)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = source.get(name, {})
        if not isinstance(values, Mapping):
            raise TypeError(f"{name} must be a table (mapping), got {type(values).__name__}: {values!r}")
        if cls is GPTConfig:
            sections[name] = GPTConfig.from_dict(values, prefix="model.")
            continue
        allowed = [f.name for f in fields(cls)]
        for key in values:
            if key not in allowed:
                raise ValueError(f"unknown key {f'{name}.{key}'!r}; allowed keys under {name}: {', '.join(allowed)}")
        sections[name] = cls(**values)
    return TrainConfig(**sections)


def parse_override(text: str) -> Tuple[str, Any]:
    """Split a CLI ``"section.key=value"`` into the key and its TOML-typed value.

    ``"train.steps=10"`` gives ``("train.steps", 10)``; a value that is not TOML (``data.path=a/b``)
    stays a string.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.steps=10)")
    try:
        import tomllib as toml
    except ImportError:
        import tomli as toml
    try:
        value = toml.loads(f"v = {raw.strip()}")["v"]
    except toml.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value
