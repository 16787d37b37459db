"""Typed, validated training-engine config with DeepSpeed's key names, read from a dict, JSON or TOML.

Every dataclass checks itself in ``__post_init__``; bad values raise ``ValueError``, bad types
``TypeError``, and each message names the full key path (``optimizer.params.betas``), the value
and what is allowed. Unknown keys are errors at every level, so a typo never silently falls back
to a default. ``bool`` is never accepted where a number is expected.

Differences from DeepSpeed's config, on purpose: only the keys moesaic implements are accepted
(``fp16.auto_cast``, ``zero_optimization`` ... are unknown keys, not silently ignored);
``fp16`` values are checked even when fp16 is off or the scale is static; ``optimizer`` defaults
to AdamW; ``gradient_accumulation_steps`` defaults to 1 instead of being derived from
``train_batch_size``, so a mismatch is reported by :meth:`EngineConfig.check_batch`.
``moe.lr_scale`` and ``moe.freeze_experts`` name experts as ``"<expert_group_name>/<expert_number>"``
(a group name may not itself contain ``/``); a bare group name in ``lr_scale`` covers the whole
layer, a bare int in ``freeze_experts`` that expert number in every MoE layer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from .._checks import check_int, check_number

OPTIMIZER_TYPES = ("AdamW", "Adam", "SGD")
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
WARMUP_TYPES = ("log", "linear")
SPLIT_BY = ("expert", "layer")
OFFLOAD = ("none", "cpu")
DEFAULT_MAX_GROUP_SIZE = 178956971  # DeepSpeed's default cap on elements per param group
_REQUIRED = object()  # marks a parameter without a default


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{path or 'config'} must be a mapping (dict / JSON object / TOML table), "
                        f"got {type(value).__name__}: {value!r}")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"{path or 'config'} keys must be str, got {type(key).__name__}: {key!r}")
    return value


def _check_keys(value: Any, allowed, path: str) -> Mapping[str, Any]:
    _mapping(value, path)
    for key in value:
        if key not in allowed:
            raise ValueError(f"unknown key {_join(path, key)!r}; allowed keys under "
                             f"{path or 'the top level'}: {', '.join(sorted(allowed))}")
    return value


def _int(value: Any, path: str, lo: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    return check_int(value, path, lo, none_word="null" if allow_none else None)


def _float(value: Any, path: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
           hi_open: bool = False) -> float:
    return check_number(value, path, lo, hi, lo_open=lo_open, hi_open=hi_open)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{path} must be a bool (true/false), got {type(value).__name__}: {value!r}")
    return value


def _choice(value: Any, path: str, choices: Tuple[str, ...], fold_case: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{path} must be a str, one of {list(choices)}, got {type(value).__name__}: {value!r}")
    for choice in choices:
        if value == choice or (fold_case and value.lower() == choice.lower()):
            return choice
    raise ValueError(f"{path} must be one of {list(choices)}{' (any case)' if fold_case else ''}, got {value!r}")


_pos = partial(_float, lo=0.0, lo_open=True)
_nonneg = partial(_float, lo=0.0)
_ratio = partial(_float, lo=0.0, hi=1.0)
_steps = partial(_int, lo=1)
_last_iter = partial(_int, lo=-1)
_warmup_type = partial(_choice, choices=WARMUP_TYPES)


def _betas(value: Any, path: str) -> Tuple[float, float]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{path} must be a list of 2 numbers in [0, 1), got {type(value).__name__}: {value!r}")
    if len(value) != 2:
        raise ValueError(f"{path} must be a list of 2 numbers in [0, 1), got {len(value)} values: {value!r}")
    return tuple(_float(v, f"{path}[{i}]", lo=0.0, hi=1.0, hi_open=True) for i, v in enumerate(value))


def _lrs(value: Any, path: str, allow_none: bool = False) -> Union[None, float, list]:
    # DeepSpeed takes one lr for every param group or a list with one lr per group; the list
    # length can only be checked against the optimizer, which the scheduler does.
    if value is None and allow_none:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{path} must be a number >= 0 or a non-empty list of them, got {value!r}")
        return [_nonneg(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return _nonneg(value, path)


Spec = Dict[str, Tuple[Any, Callable[[Any, str], Any]]]  # name -> (default, checker)


def _fill(params: Any, spec: Spec, path: str, owner: str) -> Dict[str, Any]:
    """Check ``params`` against ``spec`` and return a new dict with every default filled in."""
    _check_keys(params, spec, path)
    out = {}
    for name, (default, check) in spec.items():
        if name in params:
            out[name] = check(params[name], _join(path, name))
        elif default is _REQUIRED:
            raise ValueError(f"{_join(path, name)} is required for {owner} (allowed keys: {', '.join(spec)})")
        else:
            out[name] = default
    return out


def _plain(value: Any) -> Any:
    """Turn tuples into lists so ``to_dict`` output is JSON-ready and reloads to an equal config."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses store their normalized values this way


class _Section:
    """``from_dict`` / ``to_dict`` shared by the config dataclasses; ``_PATH`` prefixes error messages."""

    _PATH = ""

    @classmethod
    def from_dict(cls, value: Any):
        """Build the section from its mapping.

        Args:
            value: the section's mapping; unknown keys are errors.

        Returns:
            The validated section.
        """
        _check_keys(value, [f.name for f in fields(cls)], cls._PATH)
        return cls(**value)

    def to_dict(self) -> Dict[str, Any]:
        """Return the section as plain data.

        Returns:
            A JSON-ready dict (tuples as lists) that ``from_dict`` reads back to an equal object.
        """
        return _plain(asdict(self))


_ADAM: Spec = {"lr": (1e-3, _pos), "betas": ((0.9, 0.999), _betas), "eps": (1e-8, _pos),
               "weight_decay": (0.0, _nonneg)}
_OPTIMIZER_SPECS: Dict[str, Spec] = {
    "Adam": _ADAM,
    "AdamW": {**_ADAM, "weight_decay": (0.01, _nonneg)},
    "SGD": {"lr": (1e-3, _pos), "momentum": (0.0, _nonneg), "weight_decay": (0.0, _nonneg),
            "nesterov": (False, _bool), "dampening": (0.0, _nonneg)},
}
# DeepSpeed's constructor argument names and defaults (deepspeed/runtime/lr_schedules.py).
_WARMUP: Spec = {"warmup_min_lr": (0.0, _lrs), "warmup_max_lr": (None, partial(_lrs, allow_none=True)),
                 "warmup_num_steps": (1000, _steps), "warmup_type": ("log", _warmup_type),
                 "last_batch_iteration": (-1, _last_iter)}
_SCHEDULER_SPECS: Dict[str, Spec] = {
    "WarmupLR": _WARMUP,
    "WarmupDecayLR": {"total_num_steps": (_REQUIRED, _steps), **_WARMUP, "warmup_max_lr": (0.001, _lrs)},
    "WarmupCosineLR": {"total_num_steps": (_REQUIRED, _steps), "warmup_min_ratio": (0.0, _ratio),
                       "warmup_num_steps": (1000, _steps), "cos_min_ratio": (0.0001, _ratio),
                       "warmup_type": ("log", _warmup_type), "last_batch_iteration": (-1, _last_iter)},
}


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """The ``optimizer`` section: a type and its params, every default filled in."""

    _PATH = "optimizer"

    type: str = "AdamW"
    params: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        kind = _choice(self.type, "optimizer.type", OPTIMIZER_TYPES, fold_case=True)
        params = _fill(self.params, _OPTIMIZER_SPECS[kind], "optimizer.params", f"optimizer type {kind}")
        # torch.optim.SGD rejects this combination only when the optimizer is built; fail at load time.
        if kind == "SGD" and params["nesterov"] and (params["momentum"] <= 0 or params["dampening"] != 0):
            raise ValueError(f"optimizer.params.nesterov=True requires momentum > 0 and dampening == 0, "
                             f"got momentum={params['momentum']!r}, dampening={params['dampening']!r}")
        _set(self, "type", kind)
        _set(self, "params", params)



@dataclass(frozen=True)
class SchedulerConfig(_Section):
    """The ``scheduler`` section: a DeepSpeed lr schedule name and its params, defaults filled in."""

    _PATH = "scheduler"

    type: str
    params: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        kind = _choice(self.type, "scheduler.type", SCHEDULER_TYPES)
        _set(self, "type", kind)
        _set(self, "params", _fill(self.params, _SCHEDULER_SPECS[kind], "scheduler.params", f"scheduler type {kind}"))

    @classmethod
    def from_dict(cls, value: Any) -> "SchedulerConfig":
        """Build from the ``scheduler`` mapping.

        Args:
            value: ``{"type": ..., "params": {...}}``; ``type`` is required.

        Returns:
            The validated section.
        """
        _check_keys(value, ("type", "params"), "scheduler")
        if "type" not in value:
            raise ValueError(f"scheduler.type is required, one of {list(SCHEDULER_TYPES)}")
        return super().from_dict(value)


@dataclass(frozen=True)
class FP16Config(_Section):
    """The ``fp16`` section; ``loss_scale`` 0 means dynamic loss scaling (DeepSpeed's keys and defaults)."""

    _PATH = "fp16"

    enabled: bool = False
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    consecutive_hysteresis: bool = False

    def __post_init__(self):
        _bool(self.enabled, "fp16.enabled")
        _set(self, "loss_scale", _nonneg(self.loss_scale, "fp16.loss_scale"))
        if _int(self.initial_scale_power, "fp16.initial_scale_power", lo=0) > 127:
            raise ValueError(f"fp16.initial_scale_power must be an int in [0, 127] (2**power must be a finite "
                             f"fp32), got {self.initial_scale_power!r}")
        _int(self.loss_scale_window, "fp16.loss_scale_window", lo=1)  # used as a modulus
        _int(self.hysteresis, "fp16.hysteresis", lo=1)  # 0 would never lower the scale at all
        _set(self, "min_loss_scale", _pos(self.min_loss_scale, "fp16.min_loss_scale"))
        _bool(self.consecutive_hysteresis, "fp16.consecutive_hysteresis")
        # A floor above the start would make the first overflow *raise* the scale.
        if self.loss_scale == 0 and self.min_loss_scale > 2.0 ** self.initial_scale_power:
            raise ValueError(f"fp16.min_loss_scale must be <= 2**fp16.initial_scale_power "
                             f"({2.0 ** self.initial_scale_power:g}), got {self.min_loss_scale!r}")

    @property
    def dynamic(self) -> bool:
        """True when the loss scale is dynamic (``loss_scale == 0``)."""
        return self.loss_scale == 0


def _expert_ref(value: Any, path: str, allow_group: bool) -> Union[str, int]:
    """Check an expert reference: ``"<group>/<n>"``, a bare group name, or (freeze) an int."""
    form = "'<expert_group_name>/<expert_number>'" + (" or '<expert_group_name>'" if allow_group else "")
    if not allow_group and isinstance(value, int) and not isinstance(value, bool):
        return _int(value, path, lo=0)
    if not isinstance(value, str):
        extra = "" if allow_group else " or an int >= 0"
        raise TypeError(f"{path} must be a str {form}{extra}, got {type(value).__name__}: {value!r}")
    group, slash, number = value.rpartition("/")
    if slash:
        if not group or not (number.isascii() and number.isdigit()):
            raise ValueError(f"{path} must look like {form} with expert_number an int >= 0, got {value!r}")
        return f"{group}/{int(number)}"  # "g/03" and "g/3" name the same expert
    if not allow_group or not value:
        raise ValueError(f"{path} must look like {form}, got {value!r}")
    return value


@dataclass(frozen=True)
class MoEEngineConfig(_Section):
    """The ``moe`` section: how expert params are grouped, offloaded, scaled and frozen."""

    _PATH = "moe"

    split_by: str = "expert"
    max_group_size: Optional[int] = DEFAULT_MAX_GROUP_SIZE
    offload: str = "none"
    lr_scale: Dict[str, float] = field(default_factory=dict)
    freeze_experts: Tuple[Union[str, int], ...] = ()

    def __post_init__(self):
        _choice(self.split_by, "moe.split_by", SPLIT_BY)
        _int(self.max_group_size, "moe.max_group_size", lo=1, allow_none=True)
        _choice(self.offload, "moe.offload", OFFLOAD)
        _mapping(self.lr_scale, "moe.lr_scale")
        scales = {}
        for key, scale in self.lr_scale.items():
            path = f"moe.lr_scale[{key!r}]"
            scales[_expert_ref(key, path, allow_group=True)] = _pos(scale, path)
        if not isinstance(self.freeze_experts, (list, tuple)):
            raise TypeError(f"moe.freeze_experts must be a list, got {type(self.freeze_experts).__name__}: "
                            f"{self.freeze_experts!r}")
        frozen = tuple(_expert_ref(v, f"moe.freeze_experts[{i}]", allow_group=False)
                       for i, v in enumerate(self.freeze_experts))
        _set(self, "lr_scale", scales)
        _set(self, "freeze_experts", frozen)


_TOP_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
             "scheduler", "bf16", "fp16", "gradient_clipping", "moe", "steps_per_print")


@dataclass(frozen=True)
class EngineConfig(_Section):
    """The whole training-engine config; build it with :func:`load_config`."""

    train_micro_batch_size_per_gpu: Optional[int] = None
    gradient_accumulation_steps: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: Optional[SchedulerConfig] = None
    bf16: bool = False
    fp16: FP16Config = field(default_factory=FP16Config)
    gradient_clipping: float = 0.0
    moe: MoEEngineConfig = field(default_factory=MoEEngineConfig)
    steps_per_print: int = 10
    train_batch_size: Optional[int] = None

    def __post_init__(self):
        _int(self.train_micro_batch_size_per_gpu, "train_micro_batch_size_per_gpu", lo=1, allow_none=True)
        _int(self.gradient_accumulation_steps, "gradient_accumulation_steps", lo=1)
        _int(self.train_batch_size, "train_batch_size", lo=1, allow_none=True)
        for name, cls, optional in (("optimizer", OptimizerConfig, False), ("scheduler", SchedulerConfig, True),
                                    ("fp16", FP16Config, False), ("moe", MoEEngineConfig, False)):
            value = getattr(self, name)
            if not isinstance(value, cls) and not (optional and value is None):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}: {value!r}")
        _bool(self.bf16, "bf16.enabled")
        if self.bf16 and self.fp16.enabled:
            raise ValueError("bf16.enabled and fp16.enabled are both true; enable at most one of them")
        _set(self, "gradient_clipping", _nonneg(self.gradient_clipping, "gradient_clipping"))
        _int(self.steps_per_print, "steps_per_print", lo=1)
        # Inconsistency visible without the world size: it must be a multiple of micro * gas.
        micro, gas, total = self.train_micro_batch_size_per_gpu, self.gradient_accumulation_steps, \
            self.train_batch_size
        if micro is not None and total is not None and total % (micro * gas):
            raise ValueError(f"train_batch_size ({total}) must be a multiple of train_micro_batch_size_per_gpu "
                             f"({micro}) * gradient_accumulation_steps ({gas})")

    @classmethod
    def from_dict(cls, value: Any) -> "EngineConfig":
        """Build from a DeepSpeed-style config mapping.

        Args:
            value: the whole config; unknown keys at any level are errors.

        Returns:
            The validated config.
        """
        _check_keys(value, _TOP_KEYS, "")
        kwargs = {k: v for k, v in value.items() if k not in ("optimizer", "scheduler", "bf16", "fp16", "moe")}
        if "optimizer" in value:
            kwargs["optimizer"] = OptimizerConfig.from_dict(value["optimizer"])
        if value.get("scheduler") is not None:
            kwargs["scheduler"] = SchedulerConfig.from_dict(value["scheduler"])
        if "bf16" in value:
            kwargs["bf16"] = _bool(_check_keys(value["bf16"], ("enabled",), "bf16").get("enabled", False),
                                   "bf16.enabled")
        if "fp16" in value:
            kwargs["fp16"] = FP16Config.from_dict(value["fp16"])
        if "moe" in value:
            kwargs["moe"] = MoEEngineConfig.from_dict(value["moe"])
        return cls(**kwargs)

    def check_batch(self, world_size: int) -> Tuple[int, int, int]:
        """Resolve and check the batch sizes for ``world_size`` data-parallel ranks.

        Args:
            world_size: number of data-parallel ranks.

        Returns:
            ``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)``.

        Raises:
            ValueError: neither batch size is set, or train_batch_size != micro * gas * world_size.
        """
        _int(world_size, "world_size", lo=1)
        micro, gas, total = self.train_micro_batch_size_per_gpu, self.gradient_accumulation_steps, \
            self.train_batch_size
        if micro is None and total is None:
            raise ValueError("set train_batch_size or train_micro_batch_size_per_gpu (both are missing)")
        if micro is None:
            micro = max(1, total // (gas * world_size))
        if total is None:
            total = micro * gas * world_size
        if total != micro * gas * world_size:
            raise ValueError(f"train_batch_size ({total}) != train_micro_batch_size_per_gpu ({micro}) * "
                             f"gradient_accumulation_steps ({gas}) * world_size ({world_size}) "
                             f"= {micro * gas * world_size}")
        return total, micro, gas

    def to_dict(self) -> Dict[str, Any]:
        """Return the config as plain data.

        Returns:
            A JSON-ready dict, DeepSpeed's layout, that :func:`load_config` reads back to an equal config.
        """
        out = super().to_dict()
        out["bf16"] = {"enabled": self.bf16}  # DeepSpeed nests the flag in a section
        return out


def _read_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ValueError(f"config file {str(path)!r} must end in .json or .toml, got suffix {suffix!r}")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        loads = json.loads
    else:
        try:
            import tomllib as toml  # Python 3.11+
        except ImportError:  # Python 3.10: the same parser ships as 'tomli'
            try:
                import tomli as toml
            except ImportError:
                raise ImportError("reading a TOML config on Python 3.10 needs the 'tomli' package "
                                  "(pip install tomli); or write the config as JSON") from None
        loads = toml.loads
    try:
        return loads(text)
    except ValueError as err:  # json.JSONDecodeError and TOMLDecodeError both derive from ValueError
        raise ValueError(f"{path}: invalid {suffix[1:].upper()}: {err}") from err


def load_config(config: Union[Mapping[str, Any], str, os.PathLike, EngineConfig]) -> EngineConfig:
    """Load and validate an engine config.

    Args:
        config: a mapping, a path (str or PathLike) to a ``.json`` or ``.toml`` file, or an EngineConfig.

    Returns:
        The validated :class:`EngineConfig`.
    """
    if isinstance(config, EngineConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        config = _read_file(Path(config))
    elif not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, a path to a .json/.toml file or an EngineConfig, "
                        f"got {type(config).__name__}")
    return EngineConfig.from_dict(config)
