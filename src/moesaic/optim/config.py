"""The optimizer room's config sections, with DeepSpeed's key names and defaults.

``optimizer``, ``scheduler``, ``fp16``, ``bf16``, ``zero_optimization`` and ``moe`` are sections of
the engine config (:class:`moesaic.engine.EngineConfig`), built by the machinery of
:mod:`moesaic._config`: unknown keys are errors at every level, messages name the full key path
(``engine.optimizer.params.betas[1]`` under ``moesaic train``, ``optimizer.params.betas[1]`` in
``moesaic.initialize``'s dict), the value and what is allowed.

The optimizer's hyperparameter defaults live here, in :data:`OPTIMIZER_PARAMS`, and nowhere else;
the scheduler params mirror the constructors of :mod:`moesaic.optim.schedulers` (a unit test pins
that the two agree).

Differences from DeepSpeed's config, on purpose: only the keys moesaic implements are accepted
(``fp16.auto_cast``, ``zero_optimization.offload_param`` ... are unknown keys, not silently
ignored); ``fp16`` values are checked even when fp16 is off; ``optimizer`` defaults to AdamW.
``moe.lr_scale`` and ``moe.freeze_experts`` name experts as ``"<expert_group_name>/<expert_number>"``
(a group name may not itself contain ``/``); a bare group name in ``lr_scale`` covers the whole
layer, a bare int in ``freeze_experts`` that expert number in every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Dict, Optional, Tuple, Type, Union

from .._checks import check_bool, check_choice, check_int, check_list, check_mapping, check_number, join_key
from .._config import Section, section, setting
from .param_groups import DEFAULT_MAX_GROUP_SIZE, SPLIT_BY

OPTIMIZER_TYPES = ("AdamW", "Adam", "SGD")
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
WARMUP_TYPES = ("log", "linear")
OFFLOAD = ("none", "cpu")
ZERO_STAGES = (0, 1, 2)  # 3 (parameter sharding) is refused with its own message

_positive = partial(check_number, lo=0.0, lo_open=True)
_nonneg = partial(check_number, lo=0.0)
_ratio = partial(check_number, lo=0.0, hi=1.0)
_beta = partial(check_number, lo=0.0, hi=1.0, hi_open=True)
_betas = partial(check_list, item=_beta, length=2, what="2 numbers in [0, 1)")
_steps = partial(check_int, lo=1)
_steps_or_none = partial(check_int, lo=1, none_word="null")
_last_iter = partial(check_int, lo=-1)
_warmup_type = partial(check_choice, choices=WARMUP_TYPES)


def _lrs(value: Any, key: str, allow_none: bool = False) -> Union[None, float, Tuple[float, ...]]:
    # DeepSpeed takes one lr for every param group or a list with one lr per group; the list
    # length can only be checked against the optimizer, which the scheduler does.
    if value is None and allow_none:
        return None
    if isinstance(value, (list, tuple)):
        return check_list(value, key, _nonneg, min_length=1, what="numbers >= 0")
    return _nonneg(value, key)


# --- optimizer ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdamParams(Section):
    """``optimizer.params`` of ``Adam`` (torch.optim.Adam's names and defaults)."""

    PATH = "optimizer.params"

    lr: float = setting(1e-3, doc="Learning rate (the peak, when a scheduler warms it up).", check=_positive)
    betas: Tuple[float, float] = setting((0.9, 0.999), doc="Coefficients of the running averages of the gradient "
                                                           "and of its square.", check=_betas)
    eps: float = setting(1e-8, doc="Added to the denominator for numerical stability.", check=_positive)
    weight_decay: float = setting(0.0, doc="L2 penalty: weight_decay * weight is added to the gradient.",
                                  check=_nonneg)


@dataclass(frozen=True)
class AdamWParams(AdamParams):
    """``optimizer.params`` of ``AdamW``: Adam's keys, decoupled weight decay 0.01 by default."""

    weight_decay: float = setting(0.01, doc="Decoupled weight decay: each step first scales the weights by "
                                            "1 - lr * weight_decay.", check=_nonneg)


@dataclass(frozen=True)
class SGDParams(Section):
    """``optimizer.params`` of ``SGD`` (torch.optim.SGD's names and defaults)."""

    PATH = "optimizer.params"

    lr: float = setting(1e-3, doc="Learning rate.", check=_positive)
    momentum: float = setting(0.0, doc="Momentum factor (0: plain SGD).", check=_nonneg)
    dampening: float = setting(0.0, doc="Dampening of the momentum.", check=_nonneg)
    weight_decay: float = setting(0.0, doc="L2 penalty added to the gradient.", check=_nonneg)
    nesterov: bool = setting(False, doc="Nesterov momentum (needs momentum > 0 and dampening 0).", check=check_bool)

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        # torch.optim.SGD rejects this combination only when the optimizer is built; fail at load time.
        if values["nesterov"] and (values["momentum"] <= 0 or values["dampening"] != 0):
            raise ValueError(f"{join_key(path, 'nesterov')}=True requires momentum > 0 and dampening == 0, "
                             f"got momentum={values['momentum']!r}, dampening={values['dampening']!r}")


OPTIMIZER_PARAMS: Dict[str, Type[Section]] = {"AdamW": AdamWParams, "Adam": AdamParams, "SGD": SGDParams}


def _values(obj: Section) -> Dict[str, Any]:
    """A section's fields as a dict of its own (normalised) values, tuples kept."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def optimizer_defaults(kind: str) -> Dict[str, Any]:
    """Every hyperparameter of optimizer ``kind`` ("AdamW", "Adam", "SGD") with its default."""
    return _values(OPTIMIZER_PARAMS[check_choice(kind, "optimizer", OPTIMIZER_TYPES)]())


@dataclass(frozen=True)
class OptimizerConfig(Section):
    """The ``optimizer`` section: a type and its params, every default filled in."""

    PATH = "optimizer"

    type: str = setting("AdamW", doc=f"One of {', '.join(OPTIMIZER_TYPES)} (any case).",
                        check=partial(check_choice, choices=OPTIMIZER_TYPES, fold_case=True))
    params: Dict[str, Any] = setting(default_factory=dict, type_text="table",
                                     doc="Hyperparameters of the chosen type; missing ones take the defaults below.",
                                     variants=OPTIMIZER_PARAMS)

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        spec = OPTIMIZER_PARAMS[values["type"]]
        values["params"] = _values(spec.from_dict(values["params"], join_key(path, "params")))


# --- scheduler ------------------------------------------------------------------------------------------------

_TOTAL_DOC = ("Steps of the whole schedule. Required in moesaic.initialize's config; under `moesaic train`, "
              "absent (null) means train.steps.")


@dataclass(frozen=True)
class WarmupLRParams(Section):
    """``scheduler.params`` of ``WarmupLR``: warm up, then hold the peak."""

    PATH = "scheduler.params"

    warmup_min_lr: Union[float, Tuple[float, ...]] = setting(0.0, check=_lrs, type_text="float or list of float",
                                                             doc="Learning rate at step 0 (one, or one per group).")
    warmup_max_lr: Optional[Union[float, Tuple[float, ...]]] = setting(
        None, check=partial(_lrs, allow_none=True), type_text="float, list of float or null",
        doc="Peak learning rate (one, or one per group); null takes each group's optimizer lr.")
    warmup_num_steps: int = setting(1000, doc="Steps of the warmup.", check=_steps)
    warmup_type: str = setting("log", doc="Warmup curve: 'log' or 'linear'.", check=_warmup_type)
    last_batch_iteration: int = setting(-1, doc="Step the schedule starts after (-1: a fresh start).",
                                        check=_last_iter)


@dataclass(frozen=True)
class WarmupDecayLRParams(WarmupLRParams):
    """``scheduler.params`` of ``WarmupDecayLR``: warm up, then decay linearly to 0 at ``total_num_steps``."""

    total_num_steps: Optional[int] = setting(None, doc=_TOTAL_DOC, check=_steps_or_none)
    warmup_max_lr: Union[float, Tuple[float, ...]] = setting(0.001, check=_lrs, type_text="float or list of float",
                                                             doc="Peak learning rate (one, or one per group).")


@dataclass(frozen=True)
class WarmupCosineLRParams(Section):
    """``scheduler.params`` of ``WarmupCosineLR``: ratios of each group's optimizer lr."""

    PATH = "scheduler.params"

    total_num_steps: Optional[int] = setting(None, doc=_TOTAL_DOC, check=_steps_or_none)
    warmup_min_ratio: float = setting(0.0, doc="lr at step 0, as a fraction of the optimizer lr.", check=_ratio)
    warmup_num_steps: int = setting(1000, doc="Steps of the warmup.", check=_steps)
    cos_min_ratio: float = setting(0.0001, doc="lr at total_num_steps, as a fraction of the optimizer lr.",
                                   check=_ratio)
    warmup_type: str = setting("log", doc="Warmup curve: 'log' or 'linear'.", check=_warmup_type)
    last_batch_iteration: int = setting(-1, doc="Step the schedule starts after (-1: a fresh start).",
                                        check=_last_iter)


SCHEDULER_PARAMS: Dict[str, Type[Section]] = {"WarmupLR": WarmupLRParams, "WarmupDecayLR": WarmupDecayLRParams,
                                              "WarmupCosineLR": WarmupCosineLRParams}


@dataclass(frozen=True)
class SchedulerConfig(Section):
    """The ``scheduler`` section: a DeepSpeed lr schedule name and its params, defaults filled in."""

    PATH = "scheduler"

    type: str = setting(doc=f"One of {', '.join(SCHEDULER_TYPES)}.",
                        check=partial(check_choice, choices=SCHEDULER_TYPES))
    params: Dict[str, Any] = setting(default_factory=dict, type_text="table",
                                     doc="Parameters of the chosen schedule; missing ones take the defaults below.",
                                     variants=SCHEDULER_PARAMS)

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        spec = SCHEDULER_PARAMS[values["type"]]
        values["params"] = _values(spec.from_dict(values["params"], join_key(path, "params")))

    def needs_total(self) -> bool:
        """Whether the schedule needs ``total_num_steps`` and has none yet."""
        return "total_num_steps" in self.params and self.params["total_num_steps"] is None

    def with_total(self, total_num_steps: int) -> "SchedulerConfig":
        """This schedule with ``total_num_steps`` set where it is absent (a copy; self when nothing changes)."""
        if not self.needs_total():
            return self
        return SchedulerConfig(self.type, {**self.params, "total_num_steps": total_num_steps})


# --- precision ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FP16Config(Section):
    """The ``fp16`` section; ``loss_scale`` 0 means dynamic loss scaling (DeepSpeed's keys and defaults)."""

    PATH = "fp16"

    enabled: bool = setting(False, doc="Train with fp16 weights and a loss scale.", check=check_bool)
    loss_scale: float = setting(0.0, doc="0: dynamic loss scaling; > 0: this static scale.", check=_nonneg)
    initial_scale_power: int = setting(16, doc="The dynamic scale starts at 2**initial_scale_power.",
                                       check=partial(check_int, lo=0, hi=127))  # 2**power must be a finite fp32
    loss_scale_window: int = setting(1000, doc="Overflow-free steps before the dynamic scale doubles.",
                                     check=_steps)  # used as a modulus
    hysteresis: int = setting(2, doc="Overflows tolerated before the dynamic scale halves.",
                              check=_steps)  # 0 would never lower the scale at all
    min_loss_scale: float = setting(1.0, doc="Floor of the dynamic scale.", check=_positive)
    consecutive_hysteresis: bool = setting(False, doc="Refill the hysteresis after every overflow-free step.",
                                           check=check_bool)

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        # A floor above the start would make the first overflow *raise* the scale.
        start = 2.0 ** values["initial_scale_power"]
        if values["loss_scale"] == 0 and values["min_loss_scale"] > start:
            raise ValueError(f"{join_key(path, 'min_loss_scale')} must be <= 2**"
                             f"{join_key(path, 'initial_scale_power')} ({start:g}), got {values['min_loss_scale']!r}")

    @property
    def dynamic(self) -> bool:
        """True when the loss scale is dynamic (``loss_scale == 0``)."""
        return self.loss_scale == 0


@dataclass(frozen=True)
class BF16Config(Section):
    """The ``bf16`` section (DeepSpeed's nesting of one flag)."""

    PATH = "bf16"

    enabled: bool = setting(False, doc="Train with bf16 weights (fp32 master weights in the optimizer).",
                            check=check_bool)


# --- ZeRO -----------------------------------------------------------------------------------------------------

def _zero_stage(value: Any, key: str) -> int:
    check_int(value, key)
    if value == 3:
        raise ValueError(f"{key}=3 (ZeRO-3, parameter sharding) is not supported by moesaic; allowed stages: "
                         f"{', '.join(map(str, ZERO_STAGES))} (2 shards gradients and optimizer state)")
    return check_choice(value, key, ZERO_STAGES)


@dataclass(frozen=True)
class ZeroConfig(Section):
    """The ``zero_optimization`` section (DeepSpeed's key): how optimizer state is sharded over ranks."""

    PATH = "zero_optimization"

    stage: int = setting(0, check=_zero_stage,
                         doc="DeepSpeed's ZeRO stage. 0: every rank keeps the whole optimizer state; 1: optimizer "
                             "state sharded over the data-parallel ranks; 2: gradients too; 3 (parameters) is "
                             "refused. Until sharding lands (#10), 1 and 2 run as 0 with a warning.")


# --- MoE parameter groups -------------------------------------------------------------------------------------

def _expert_ref(value: Any, key: str, allow_group: bool) -> Union[str, int]:
    """Check an expert reference: ``"<group>/<n>"``, a bare group name, or (freeze) an int."""
    form = "'<expert_group_name>/<expert_number>'" + (" or '<expert_group_name>'" if allow_group else "")
    if not allow_group and isinstance(value, int) and not isinstance(value, bool):
        return check_int(value, key, lo=0)
    if not isinstance(value, str):
        extra = "" if allow_group else " or an int >= 0"
        raise TypeError(f"{key} must be a str {form}{extra}, got {type(value).__name__}: {value!r}")
    group, slash, number = value.rpartition("/")
    if slash:
        if not group or not (number.isascii() and number.isdigit()):
            raise ValueError(f"{key} must look like {form} with expert_number an int >= 0, got {value!r}")
        return f"{group}/{int(number)}"  # "g/03" and "g/3" name the same expert
    if not allow_group or not value:
        raise ValueError(f"{key} must look like {form}, got {value!r}")
    return value


def _lr_scale(value: Any, key: str) -> Dict[str, float]:
    check_mapping(value, key)
    scales = {}
    for ref, scale in value.items():
        item = f"{key}[{ref!r}]"
        scales[_expert_ref(ref, item, allow_group=True)] = _positive(scale, item)
    return scales


def _freeze(value: Any, key: str) -> Tuple[Union[str, int], ...]:
    return check_list(value, key, partial(_expert_ref, allow_group=False),
                      what="expert numbers or '<expert_group_name>/<expert_number>' str")


@dataclass(frozen=True)
class MoEOptimConfig(Section):
    """The ``moe`` section: how expert parameters are grouped, offloaded, scaled and frozen in the optimizer."""

    PATH = "moe"

    split_by: str = setting("expert", check=partial(check_choice, choices=SPLIT_BY),
                            doc="'expert': one optimizer group per expert; 'layer': the experts of one layer "
                                "packed together (never two layers in one group).")
    max_group_size: Optional[int] = setting(DEFAULT_MAX_GROUP_SIZE, check=partial(check_int, lo=1, none_word="null"),
                                            doc="Most elements per parameter group (DeepSpeed's default); bounds "
                                                "the fp32 working set of a step. null: no size split.")
    offload: str = setting("none", check=partial(check_choice, choices=OFFLOAD),
                           doc="'cpu' keeps fp32 master weights and optimizer state in CPU memory.")
    lr_scale: Dict[str, float] = setting(default_factory=dict, check=_lr_scale,
                                         doc="lr multipliers: {'<expert_group_name>': s} for a layer's experts, "
                                             "{'<expert_group_name>/<n>': s} for one expert.")
    freeze_experts: Tuple[Union[str, int], ...] = setting(
        default_factory=tuple, check=_freeze, type_text="list of int or str",
        doc="Experts left out of training: n (expert n of every MoE layer) or '<expert_group_name>/<n>'.")
