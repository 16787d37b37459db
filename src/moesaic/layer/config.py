"""``MoEConfig``: every option of an MoE layer in one typed config section.

The router (scores, top-k, group limit, noise, random token selection, the aux-loss-free bias),
the capacity, the losses, the balancing, the experts' layout and the shared experts are fields of
this one frozen :class:`~moesaic._config.Section`. The same object is

* what :class:`~moesaic.layer.moe.MoE` is built from (``MoE.from_config``; DeepSpeed's keyword
  arguments read into it),
* the gate's ``config`` and the ``config`` of every :class:`~moesaic.layer.routing.Routing`,
* the ``[model.moe]`` table of ``moesaic train`` (``GPTConfig.moe``; ``--set model.moe.score_func=sigmoid``),
* what the expert-parallel agreement check fingerprints (``config_fingerprint``: a CRC of its
  ``repr``), so a new field needs nothing there.

Adding an option is one :func:`~moesaic._config.setting` line here (its default keeps today's
behaviour; joint rules go in :meth:`MoEConfig.check_values`) plus its use in ``routing.py``
(docs/architecture.md, "Where to change things"). Every message names the key path (``k`` for a
layer built directly, ``model.moe.k`` inside a training config), the value and what is allowed.

``RouterConfig`` is the former name of this class and stays as an alias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Dict, Optional

from .._checks import check_int, check_number, join_key
from .._config import Section, setting

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
DROP_POLICIES = (None, "position", "probs")
SCORE_FUNCS = ("softmax", "sigmoid")
ROUTING_TYPES = ("token_choice", "expert_choice")
DEFAULT_BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's bias update speed (Megatron-Core's default too)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be a bool, got {type(value).__name__}: {value!r}")
    return value


def _optional_flag(value: Any, key: str) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{key} must be None or a bool, got {type(value).__name__}: {value!r}")
    return value


def _one_of(choices, value: Any, key: str) -> Any:
    if value not in choices or isinstance(value, bool):
        raise ValueError(f"Unknown {key} {value!r}; choose one of {list(choices)}")
    return value


def _optional_int(value: Any, key: str) -> Optional[int]:
    return check_int(value, key, 1, none_word="None")


_positive = partial(check_number, lo=0.0, lo_open=True)
_nonneg = partial(check_number, lo=0.0)


@dataclass(frozen=True)
class MoEConfig(Section):
    """Every option of an MoE layer; checked on construction, immutable afterwards.

    Router options default to DeepSpeed's ``TopKGate``; with every newer option off the routing
    path is DeepSpeed's, unchanged (:attr:`default_selection`, :attr:`default_weights`).
    docs/modern-layers.md has the formulas. To change an option of a built router, replace its
    config: ``gate.config = dataclasses.replace(gate.config, capacity_factor=2.0)``.
    """

    PATH = ""

    # --- the router -------------------------------------------------------------------------------
    num_experts: int = setting(check=partial(check_int, lo=1),
                               doc="E, experts of the layer over all expert-parallel ranks.")
    k: int = setting(1, doc="Experts per token (top-k), in [1, num_experts].")  # checked with num_experts
    noisy_gate_policy: Optional[str] = setting(None, check=partial(_one_of, NOISY_GATE_POLICIES),
                                               doc="null, 'None', 'Jitter' (multiplicative input noise) or 'RSample' "
                                                   "(Gumbel-perturbed choice); both act in training only.")
    use_rts: bool = setting(True, check=_flag,
                            doc="Random token selection for k=1 when an expert overflows (training only).")
    top2_2nd_expert_sampling: bool = setting(True, check=_flag,
                                             doc="Sample the 2nd expert (k=2) with the Gumbel-max trick "
                                                 "(training only).")
    score_func: str = setting("softmax", check=partial(_one_of, SCORE_FUNCS),
                              doc="'softmax' (DeepSpeed) or 'sigmoid' (DeepSeek-V3: one independent score per "
                                  "expert).")
    softmax_after_topk: bool = setting(False, check=_flag,
                                       doc="Choose the top-k logits first, then weight by a softmax over those k "
                                           "(Mixtral, GPT-OSS); softmax scores only.")
    router_bias: bool = setting(False, check=_flag, doc="The router's linear layer has a bias (GPT-OSS).")
    norm_topk_prob: Optional[bool] = setting(None, check=_optional_flag,
                                             doc="null: DeepSpeed's weights (k=1 the raw probability, k>=2 "
                                                 "renormalised over the routes kept); true: each token's k scores "
                                                 "divided by their sum; false: the raw scores.")
    routed_scaling_factor: float = setting(1.0, check=_positive,
                                           doc="Multiplies every combine weight (DeepSeek-V3).")
    n_group: Optional[int] = setting(None, check=_optional_int,
                                     doc="Group-limited top-k (DeepSeek-V2/V3): the experts form n_group equal "
                                         "groups; with topk_group, null for both: off.")
    topk_group: Optional[int] = setting(None, check=_optional_int,
                                        doc="Only the topk_group best groups (by the sum of their two best scores) "
                                            "are eligible.")
    routing_type: str = setting("token_choice", check=partial(_one_of, ROUTING_TYPES),
                                doc="'token_choice' (each token picks k experts) or 'expert_choice' (each expert "
                                    "picks its capacity of tokens).")
    # --- capacity ---------------------------------------------------------------------------------
    capacity_factor: float = setting(1.0, check=_positive,
                                     doc="Training slots per expert: max(ceil(S / E * capacity_factor * k), "
                                         "min_capacity).")
    eval_capacity_factor: float = setting(1.0, check=_positive, doc="The same, in evaluation.")
    min_capacity: int = setting(4, check=partial(check_int, lo=0), doc="Least slots per expert.")
    drop_tokens: bool = setting(True, check=_flag,
                                doc="Drop routes over capacity (false: dropless, every route is computed).")
    drop_policy: Optional[str] = setting(None, check=partial(_one_of, DROP_POLICIES),
                                         doc="Which routes survive an over-full expert: 'position' or 'probs'; "
                                             "null is DeepSpeed's default for k (position for k <= 2), stored "
                                             "resolved.")
    # --- losses and balancing ---------------------------------------------------------------------
    z_loss_coef: float = setting(0.0, check=_nonneg,
                                 doc="ST-MoE router z-loss coefficient (0: off); exposed as the layer's z_loss, "
                                     "not folded into l_aux.")
    seq_aux_loss_coef: float = setting(0.0, check=_nonneg,
                                       doc="DeepSeek-V3's sequence-wise balance loss coefficient (0: off).")
    enable_expert_bias: bool = setting(False, check=_flag,
                                       doc="Aux-loss-free balancing (DeepSeek-V3): a per-expert bias (buffer "
                                           "gate.expert_bias) added to the scores for selection only.")
    bias_update_rate: Optional[float] = setting(None, check=partial(check_number, lo=0.0, allow_none=True),
                                                doc="The bias step per optimizer step; null is 1e-3 when the bias "
                                                    "is on (0 keeps it fixed).")
    # --- the experts ------------------------------------------------------------------------------
    stacked_experts: bool = setting(False, check=_flag,
                                    doc="Store the local experts as [E_local, ...] tensors (grouped matmul); "
                                        "identity, groups, checkpoints and numbers are those of per-module "
                                        "experts.")
    shared_experts: int = setting(0, check=partial(check_int, lo=0),
                                  doc="Dense experts every token passes through, added to the routed output "
                                      "(Qwen2-MoE, DeepSeek-V3); one module (a model builds it this many "
                                      "experts wide). 0: none.")
    shared_expert_gate: bool = setting(False, check=_flag,
                                       doc="Multiply the shared experts' output by sigmoid(Linear(D, 1)(x)) "
                                           "(Qwen2-MoE).")
    use_residual: bool = setting(False, check=_flag,
                                 doc="Residual MoE (PR-MoE): mix a dense copy of the expert in by a learned "
                                     "2-way softmax coefficient.")

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        key = partial(join_key, path)
        E = values["num_experts"]
        k = values["k"] = check_int(values["k"], key("k"), 1, E, hi_text=f"{key('num_experts')}={E}")
        if values["drop_policy"] is None:
            values["drop_policy"] = "position" if k <= 2 else "probs"
        _check_router(values, key)
        if values["shared_expert_gate"] and not values["shared_experts"]:
            raise ValueError(f"{key('shared_expert_gate')}=True gates shared experts; set {key('shared_experts')} "
                             f">= 1 too (got {values['shared_experts']})")
        if values["shared_experts"] and values["use_residual"]:
            raise ValueError(f"{key('shared_experts')}={values['shared_experts']} cannot be combined with "
                             f"{key('use_residual')}=True (Residual MoE already mixes in a dense expert); pick one")

    @classmethod
    def from_options(cls, options: Dict[str, Any], *, who: str, has_shared_expert: bool = False) -> "MoEConfig":
        """The config of keyword ``options`` (field names); an unknown one is named with the allowed ones.

        Args:
            options: ``{field: value}``.
            who: the constructor taking them, for the message (``"MoE"``, ``"TopKGate"``).
            has_shared_expert: a shared expert's module was passed, so ``shared_experts`` is 1
                unless ``options`` says how many experts wide it is.
        """
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"{who} got unknown options {unknown}; the options are the fields of moesaic.MoEConfig "
                            f"(formerly RouterConfig): {allowed}")
        if has_shared_expert:
            options = {"shared_experts": 1, **options}
        return cls(**options)

    @property
    def default_selection(self) -> bool:
        """True when experts are chosen exactly as DeepSpeed's gate chooses them."""
        return self.score_func == "softmax" and not self.enable_expert_bias and self.n_group is None

    @property
    def default_weights(self) -> bool:
        """True when combine weights are DeepSpeed's (raw for k=1, renormalised over kept routes for k>=2)."""
        return self.norm_topk_prob is None and not self.softmax_after_topk and self.routed_scaling_factor == 1.0

    def capacity(self, num_tokens: int, training: bool) -> Optional[int]:
        """Slots per expert for ``num_tokens`` tokens (None when dropless)."""
        if not self.drop_tokens:
            return None
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, factor, self.k, self.min_capacity)


RouterConfig = MoEConfig  # the former name


def _check_router(v: Dict[str, Any], key) -> None:
    """The rules that join router options (group limit, bias, the noisy policies, expert choice)."""
    E, k = v["num_experts"], v["k"]
    if v["softmax_after_topk"]:
        if v["score_func"] != "softmax":
            raise ValueError(f"{key('softmax_after_topk')}=True needs {key('score_func')}='softmax', got "
                             f"{key('score_func')}={v['score_func']!r}")
        if v["norm_topk_prob"] is not None:
            raise ValueError(f"{key('softmax_after_topk')}=True already normalises each token's k weights; leave "
                             f"{key('norm_topk_prob')}=None, got norm_topk_prob={v['norm_topk_prob']!r}")
    if (v["n_group"] is None) != (v["topk_group"] is None):
        raise ValueError(f"{key('n_group')} and {key('topk_group')} go together (both None: no group limit), got "
                         f"n_group={v['n_group']!r}, topk_group={v['topk_group']!r}")
    if v["n_group"] is not None:
        check_int(v["n_group"], key("n_group"), 1, E, hi_text=f"num_experts={E}")
        if E % v["n_group"]:
            raise ValueError(f"{key('n_group')} must divide num_experts={E} (experts are split into equal groups), "
                             f"got n_group={v['n_group']}; pick one of {[g for g in range(1, E + 1) if E % g == 0]}")
        check_int(v["topk_group"], key("topk_group"), 1, v["n_group"], hi_text=f"n_group={v['n_group']}")
        eligible = v["topk_group"] * (E // v["n_group"])
        if k > eligible:
            raise ValueError(f"{key('k')} must be at most the experts eligible under the group limit, topk_group x "
                             f"num_experts / n_group = {v['topk_group']} x {E // v['n_group']} = {eligible}, "
                             f"got k={k}")
    if v["bias_update_rate"] is not None:
        if not v["enable_expert_bias"]:
            raise ValueError(f"{key('bias_update_rate')}={v['bias_update_rate']!r} needs "
                             f"{key('enable_expert_bias')}=True (there is no expert bias to update otherwise)")
    elif v["enable_expert_bias"]:
        v["bias_update_rate"] = DEFAULT_BIAS_UPDATE_RATE
    # the noisy policies of DeepSpeed's softmax gate draw from softmax(logits); they cannot honour
    # a selection changed by sigmoid scores, an expert bias or a group limit
    changed = [f"{n}={v[n]!r}" for n, off in (("score_func", "softmax"), ("enable_expert_bias", False),
                                              ("n_group", None)) if v[n] != off]
    if changed and v["routing_type"] == "token_choice":
        if v["noisy_gate_policy"] == "RSample":
            raise ValueError(f"{key('noisy_gate_policy')}='RSample' samples from softmax(logits) and cannot be "
                             f"combined with {', '.join(changed)}; use None or 'Jitter'")
        if k == 2 and v["top2_2nd_expert_sampling"]:
            raise ValueError(f"{key('top2_2nd_expert_sampling')}=True (DeepSpeed's default) samples the 2nd expert "
                             f"from softmax(logits) and cannot be combined with {', '.join(changed)}; pass "
                             "top2_2nd_expert_sampling=False")
    if v["routing_type"] == "expert_choice":
        refused = [f"{n}={v[n]!r}" for n, off in
                   (("drop_tokens", True), ("n_group", None), ("enable_expert_bias", False),
                    ("seq_aux_loss_coef", 0.0), ("norm_topk_prob", None), ("softmax_after_topk", False))
                   if v[n] != off]
        if v["noisy_gate_policy"] == "RSample":
            refused.append("noisy_gate_policy='RSample'")
        if refused:
            raise ValueError(f"{key('routing_type')}='expert_choice' cannot honour {', '.join(refused)}: each expert "
                             "picks its capacity of tokens (always capacity-bound, balanced by construction, a token "
                             "has no fixed k). Allowed with it: score_func, router_bias, routed_scaling_factor, "
                             "capacity_factor/eval_capacity_factor/min_capacity (with k: slots per expert = "
                             "ceil(S / E * capacity_factor * k)), z_loss_coef, noisy_gate_policy None or 'Jitter'")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """Slots per expert: ``max(ceil(S / E * capacity_factor * k), min_capacity)``.

    Evaluated exactly as DeepSpeed does, in float32: DeepSpeed multiplies ``S / E`` (a Python
    float, which torch rounds to float32) by ``capacity_factor * k`` held in a float32 tensor, so
    both factors are rounded to float32 and so is their product. Here the same roundings are done
    on Python floats (:func:`_to_float32`; the product of two float32 values is exact in a double,
    so rounding it once gives float32's product), and the capacity agrees to the last slot
    (``tests/unit/test_layer_compile.py`` checks it against the tensor form). Pure Python, with no
    tensor and no ``.item()``: under ``torch.compile`` a static token count gives a constant
    capacity, not a graph break.
    """
    product = _to_float32(_to_float32(num_tokens / num_experts) * _to_float32(capacity_factor * k))
    return max(math.ceil(product), int(min_capacity))


def _to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), as ``torch.tensor(x, dtype=torch.float32)`` does.

    For the normal float32 range (capacities are far inside it): the 24 significant bits of the
    mantissa are kept, with Python's round() breaking ties to even.
    """
    if x == 0.0 or not math.isfinite(x):
        return x
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return math.ldexp(round(mantissa * 2.0 ** 24), exponent - 24)
