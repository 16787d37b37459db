"""The optimizer room's config sections, with DeepSpeed's key names and defaults.

``optimizer``, ``scheduler``, ``fp16``, ``bf16``, ``zero_optimization`` and ``moe`` are sections of
the engine config (:class:`moesaic.engine.EngineConfig`), built by the machinery of
:mod:`moesaic._config`: unknown keys are errors at every level, messages name the full key path
(``engine.optimizer.params.betas[1]`` under ``moesaic train``, ``optimizer.params.betas[1]`` in
``moesaic.initialize``'s dict), the value and what is allowed.

The optimizer's hyperparameter defaults live here, in :data:`OPTIMIZER_PARAMS`, and nowhere else;
the scheduler params mirror the constructors of :mod:`moesaic.optim.schedulers` (a unit test pins
that the two agree).

DeepSpeed's keys moesaic does not implement are never silently ignored: a key that describes
what moesaic's update always does is a setting checked by :func:`moesaic._checks.only`
(``optimizer.params.amsgrad`` accepts false, as torch's Adam names it); keys that only choose between
DeepSpeed's own implementations (``fp16.auto_cast``, ``zero_optimization.contiguous_gradients``) are
the DeepSpeed bridge's (:mod:`moesaic.deepspeed.accepted`; each section's ``MOVED`` names them), and
the rest are refused by name with the reason (:mod:`moesaic.deepspeed.keys`). Differences on
purpose: ``fp16`` values are checked even when fp16 is off; optimizer and scheduler names DeepSpeed
accepts but moesaic does not implement are refused with the reason and the supported names by the
DeepSpeed bridge (:func:`moesaic.deepspeed.keys.refuse_deepspeed_names`).
``moe.lr_scale`` and ``moe.freeze_experts`` name experts as ``"<expert_group_name>/<expert_number>"``
(a group name may not itself contain ``/``); a bare group name in ``lr_scale`` covers the whole
layer, a bare int in ``freeze_experts`` that expert number in every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Dict, Optional, Tuple, Type, Union

from .._checks import (check_bool, check_choice, check_elements, check_int, check_list, check_mapping, check_number,
                       check_str, join_key, only)
from .._config import Section, section, setting
from .build_groups import DEFAULT_MAX_GROUP_SIZE, SPLIT_BY

OPTIMIZER_TYPES = ("AdamW", "Adam", "SGD")
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")

SCHEDULER_ALLOWED = f"{', '.join(SCHEDULER_TYPES)} or a torch.optim.lr_scheduler class name (StepLR, OneCycleLR, ...)"
WARMUP_TYPES = ("log", "linear")
OFFLOAD = ("none", "cpu")
ZERO_STAGES = (0, 1, 2, 3)  # 3: parameters sharded too, on torch's FSDP2 (optim/fsdp.py, optim/zero3.py)

#: What a section says of a DeepSpeed-only key given to it directly: such keys choose between DeepSpeed's own
#: implementations, so the DeepSpeed bridge checks and drops them (:mod:`moesaic.deepspeed.accepted`).
DEEPSPEED_ONLY = ("is a key of DeepSpeed's config, not a setting of moesaic's engine: the DeepSpeed bridge accepts it "
                  "(moesaic.initialize and moesaic.deepspeed.load_config, and `moesaic train`'s [engine] section, "
                  "which reads through the same bridge; see moesaic.deepspeed.accepted); leave it out of a config "
                  "built directly as EngineConfig")


def deepspeed_only(*names: str) -> Dict[str, str]:
    """A section's ``MOVED`` table for DeepSpeed-only keys (see :data:`DEEPSPEED_ONLY`)."""
    return {name: DEEPSPEED_ONLY for name in names}


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
    MOVED = deepspeed_only("torch_adam")

    lr: float = setting(1e-3, doc="Learning rate (the peak, when a scheduler warms it up).", check=_positive)
    betas: Tuple[float, float] = setting((0.9, 0.999), doc="Coefficients of the running averages of the gradient "
                                                           "and of its square.", check=_betas)
    eps: float = setting(1e-8, doc="Added to the denominator for numerical stability.", check=_positive)
    weight_decay: float = setting(0.0, doc="Weight decay: decoupled (each step first scales the weights by "
                                           "1 - lr * weight_decay) when adam_w_mode is true, else an L2 penalty "
                                           "added to the gradient.", check=_nonneg)
    adam_w_mode: bool = setting(True, check=check_bool,
                                doc="DeepSpeed's switch, on by default as in DeepSpeed: type Adam applies weight "
                                    "decay decoupled (AdamW); false: torch's Adam (L2 added to the gradient).")
    bias_correction: bool = setting(True, doc="Adam's bias correction (always applied by moesaic).",
                                    check=only((True,), "moesaic's Adam always applies bias correction"))
    amsgrad: bool = setting(False, doc="AMSGrad (not implemented).",
                            check=only((False,), "moesaic's Adam has no AMSGrad variant"))

    def kind(self) -> str:
        """The update moesaic runs: ``"AdamW"`` (decoupled decay) or ``"Adam"`` (L2)."""
        return "AdamW" if self.adam_w_mode else "Adam"


@dataclass(frozen=True)
class AdamWParams(AdamParams):
    """``optimizer.params`` of ``AdamW``: Adam's keys; weight decay is always decoupled (DeepSpeed's defaults)."""

    adam_w_mode: bool = setting(True, doc="Always true for type AdamW (DeepSpeed ignores a false here; moesaic "
                                          "refuses it).",
                                check=only((True,), "type AdamW always decouples weight decay; for L2 use type "
                                                    "Adam with adam_w_mode false"))


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
#: The hyperparameters each update reads (the rest of ``optimizer.params`` chooses the update or is fixed).
UPDATE_HYPERPARAMETERS = {"AdamW": ("lr", "betas", "eps", "weight_decay"),
                          "Adam": ("lr", "betas", "eps", "weight_decay"),
                          "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov")}


def _values(obj: Section) -> Dict[str, Any]:
    """A section's fields as a dict of its own (normalised) values, tuples kept."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def optimizer_defaults(kind: str) -> Dict[str, Any]:
    """Every hyperparameter the update ``kind`` ("AdamW", "Adam", "SGD") reads, with its default."""
    values = _values(OPTIMIZER_PARAMS[check_choice(kind, "optimizer", OPTIMIZER_TYPES)]())
    return {k: values[k] for k in UPDATE_HYPERPARAMETERS[kind]}


def optimizer_type(value: Any, key: str) -> Optional[str]:
    """The name in :data:`OPTIMIZER_TYPES` that ``value`` spells (any case), or None."""
    check_str(value, key)
    return next((name for name in OPTIMIZER_TYPES if value.lower() == name.lower()), None)


def _optimizer_type(value: Any, key: str) -> str:
    """One of :data:`OPTIMIZER_TYPES` (any case). DeepSpeed's other names are refused with the reason by the
    DeepSpeed bridge, which reads every config first (:mod:`moesaic.deepspeed.keys`)."""
    name = optimizer_type(value, key)
    if name is None:
        raise ValueError(f"{key} must be one of {list(OPTIMIZER_TYPES)} (any case), got {value!r}")
    return name


@dataclass(frozen=True)
class OptimizerConfig(Section):
    """The ``optimizer`` section: a type and its params, every default filled in."""

    PATH = "optimizer"

    type: str = setting("AdamW", doc=f"One of {', '.join(OPTIMIZER_TYPES)} (any case). As in DeepSpeed, Adam "
                                     "decouples weight decay unless params.adam_w_mode is false; DeepSpeed's other "
                                     "optimizers (Lamb, OneBitAdam, Lion, ...) are refused with the reason (by the "
                                     "DeepSpeed bridge, which moesaic.initialize and moesaic train read through).",
                        check=_optimizer_type)
    params: Dict[str, Any] = setting(default_factory=dict, type_text="table",
                                     doc="Hyperparameters of the chosen type; missing ones take the defaults below.",
                                     variants=OPTIMIZER_PARAMS)

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        spec = OPTIMIZER_PARAMS[values["type"]]
        values["params"] = _values(spec.from_dict(values["params"], join_key(path, "params")))

    def update(self) -> Tuple[str, Dict[str, Any]]:
        """``(kind, hyperparameters)`` of the update to run: Adam with ``adam_w_mode`` runs AdamW's."""
        params = OPTIMIZER_PARAMS[self.type](**self.params)
        kind = params.kind() if isinstance(params, AdamParams) else self.type
        return kind, {k: self.params[k] for k in UPDATE_HYPERPARAMETERS[kind]}


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


def torch_scheduler_class(name: str):
    """The ``torch.optim.lr_scheduler`` class called ``name``, or None (DeepSpeed accepts these names too)."""
    import torch.optim.lr_scheduler as torch_schedulers

    cls = getattr(torch_schedulers, name, None) if isinstance(name, str) and not name.startswith("_") else None
    base = getattr(torch_schedulers, "LRScheduler", torch_schedulers._LRScheduler)
    return cls if isinstance(cls, type) and issubclass(cls, base) and cls is not base else None


def _scheduler_type(value: Any, key: str) -> str:
    check_str(value, key)
    if value in SCHEDULER_TYPES or torch_scheduler_class(value) is not None:
        return value
    raise ValueError(f"{key} must be one of {SCHEDULER_ALLOWED}, got {value!r}")


def _torch_scheduler_params(cls, params: Any, key: str) -> Dict[str, Any]:
    """``params`` checked against the constructor of torch scheduler ``cls`` (each key one of its arguments)."""
    import inspect

    check_mapping(params, key)
    allowed = [n for n, p in inspect.signature(cls.__init__).parameters.items()
               if n not in ("self", "optimizer") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in params:
        if name not in allowed:
            raise ValueError(f"unknown key {join_key(key, name)!r}; torch.optim.lr_scheduler.{cls.__name__} takes: "
                             f"{', '.join(allowed)}")
    return dict(params)


@dataclass(frozen=True)
class SchedulerConfig(Section):
    """The ``scheduler`` section: a DeepSpeed lr schedule name (or a torch one) and its params, defaults filled in."""

    PATH = "scheduler"

    type: str = setting(doc=f"One of {', '.join(SCHEDULER_TYPES)} (DeepSpeed's, step-for-step identical), or, as in "
                            "DeepSpeed, the name of a torch.optim.lr_scheduler class (its constructor's arguments "
                            "go in params). DeepSpeed's OneCycle and LRRangeTest are refused with the reason (by the "
                            "DeepSpeed bridge).",
                        check=_scheduler_type)
    params: Dict[str, Any] = setting(default_factory=dict, type_text="table",
                                     doc="Parameters of the chosen schedule; missing ones take the defaults below.",
                                     variants=SCHEDULER_PARAMS)

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        spec = SCHEDULER_PARAMS.get(values["type"])
        if spec is None:
            values["params"] = _torch_scheduler_params(torch_scheduler_class(values["type"]), values["params"],
                                                       join_key(path, "params"))
            return
        values["params"] = _values(spec.from_dict(values["params"], join_key(path, "params")))

    def needs_total(self) -> bool:
        """Whether the schedule needs ``total_num_steps`` and has none yet."""
        return (self.type in SCHEDULER_PARAMS and "total_num_steps" in self.params
                and self.params["total_num_steps"] is None)

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
    MOVED = deepspeed_only("auto_cast", "fp16_master_weights_and_grads")

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
    """The ``bf16`` section: one flag (DeepSpeed's variants of bf16 training are the DeepSpeed bridge's keys)."""

    PATH = "bf16"
    MOVED = deepspeed_only("check_grad_overflow", "immediate_grad_update", "bf16_master_weights_and_grads",
                           "bf16_optimizer_states")

    enabled: bool = setting(False, doc="Train with bf16 weights (fp32 master weights in the optimizer).",
                            check=check_bool)


# --- ZeRO -----------------------------------------------------------------------------------------------------

def _opt_bool(value: Any, key: str) -> Optional[bool]:
    return None if value is None else check_bool(value, key)


def _zero_stage(value: Any, key: str) -> int:
    check_int(value, key)
    return check_choice(value, key, ZERO_STAGES)


_BUCKET_DOC = ("Most elements per collective of {what} (DeepSpeed's key; 5e8 is accepted). null: moesaic's "
               "default, 8M elements (32 MiB of fp32).")


@dataclass(frozen=True)
class OffloadOptimizerConfig(Section):
    """``zero_optimization.offload_optimizer``: where fp32 master weights and optimizer state live."""

    PATH = "zero_optimization.offload_optimizer"
    MOVED = deepspeed_only("pin_memory")

    device: str = setting("none", doc="'cpu': master weights and optimizer state in CPU memory (as moe.offload "
                                      "'cpu'); 'none': on the parameters' device. DeepSpeed's 'nvme' is refused.",
                          check=only(("none", "cpu"), "moesaic offloads to CPU memory only, not to NVMe"))


@dataclass(frozen=True)
class ZeroConfig(Section):
    """The ``zero_optimization`` section (DeepSpeed's key): how optimizer state is sharded over ranks."""

    PATH = "zero_optimization"
    MOVED = deepspeed_only("contiguous_gradients", "round_robin_gradients", "allgather_partitions",
                           "load_from_fp32_weights", "elastic_checkpoint", "ignore_unused_parameters", "cpu_offload",
                           "stage3_max_reuse_distance", "max_reuse_distance", "stage3_param_persistence_threshold",
                           "param_persistence_threshold")

    stage: int = setting(0, check=_zero_stage,
                         doc="DeepSpeed's ZeRO stage. 0: every rank keeps the whole optimizer state; 1: fp32 master "
                             "weights and optimizer state sharded over the data-parallel ranks (each optimizer group "
                             "owned by one rank of its replica group); 2: gradients too; 3: parameters too, on torch's FSDP2 "
                             "(fp32 sharded parameters, bf16/fp16 compute, a torch optimizer; checkpoints in row pieces, format 3).")
    reduce_bucket_size: Optional[int] = setting(None, check=partial(check_elements, none_word="null"),
                                                doc=_BUCKET_DOC.format(what="the gradient reduction"))
    allgather_bucket_size: Optional[int] = setting(
        None, check=partial(check_elements, none_word="null"),
        doc=_BUCKET_DOC.format(what="the owners' broadcast of updated weights (stages 1-2)"))
    reduce_scatter: bool = setting(True, check=check_bool,
                                   doc="Stage 2: reduce each gradient onto its owner only (true), or all-reduce it "
                                       "and let the other ranks drop their copy (false).")
    overlap_comm: Optional[bool] = setting(
        None, check=_opt_bool,
        doc="Reduce gradient buckets while the accumulation boundary's backward still runs, each as soon as all its "
            "gradients are final (launched in a fixed order, identical on every rank); the results equal the "
            "reduction after backward. Costs up to one fp32 copy of the gradients in flight. null: false.")
    offload_optimizer: OffloadOptimizerConfig = section(OffloadOptimizerConfig,
                                                        doc="DeepSpeed's ZeRO-Offload of the optimizer.")
    reshard_after_forward: bool = setting(
        True, check=check_bool,
        doc="Stage 3: FSDP2's reshard_after_forward (torchtitan's policy of the same name) for every unit but the "
            "model's root: free each unit's gathered parameters after its forward and gather them again for "
            "backward (true: ZeRO-3's memory), or keep them from forward to backward (false: one all-gather per "
            "unit per step instead of two, every unit's gathered parameters held through the step). Stages 0-2: "
            "true only.")
    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        keep = not values["reshard_after_forward"]
        if keep and values["stage"] != 3:
            raise ValueError(f"{path}.reshard_after_forward=false is a stage-3 setting (FSDP2), but {path}.stage="
                             f"{values['stage']}; stages 0-2 never shard parameters: leave it true")

    def offload_device(self) -> str:
        """``"cpu"`` when ``offload_optimizer.device`` asks for CPU offload, else ``"none"``."""
        return "cpu" if self.offload_optimizer.device == "cpu" else "none"


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
