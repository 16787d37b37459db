"""DeepSpeed's parameter-group helpers (``deepspeed.moe.utils``), as adapters over the one group builder.

DeepSpeed's API hands over tensors and no model, so these helpers read each tensor's identity
from its tags (``allreduce``, ``group_name``, ``expert_number``; moesaic's stacking tag) and pass
the placed tensors to :func:`moesaic.optim.build_groups.split_group`, which groups, packs and
names them exactly as it does the engine's groups. The engine itself never goes through these
helpers: it places tensors with the model's ``ExpertIndex``.

Same names and meaning as ``deepspeed.moe.utils``; the differences are deliberate:

* the caller's group dicts are never mutated: new dicts are returned;
* a base group needs no ``name`` (DeepSpeed raises ``KeyError``);
* an MoE group holds one expert (``split_by="expert"``) or whole experts of one layer
  (``split_by="layer"``), never two layers, and carries ``expert_group_name``, ``expert_number``
  and a unique readable ``name`` such as ``"decay/layers.1.mlp/expert_3"``;
* malformed input (non-tensors, a parameter in two groups, untagged expert parameters) fails
  with a message naming the culprit instead of producing a silently wrong optimizer.

Stacked experts (one ``[E_local, ...]`` tensor holding many experts, ``moesaic.StackedExperts``):
a torch optimizer can only step whole tensors, so by default (``stacked="whole"``) each stacked
tensor stays whole, in a group per layer named ``"<base>/<layer>/stacked"`` (``expert_number``
None). moesaic's own optimizer steps views, and with ``stacked="views"`` each stacked tensor is
cut into one :class:`~moesaic.layer.identity.ParamRef` per expert, grouped exactly as per-module
experts are (same group names, same tensor names), as the engine's groups hold them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..layer.identity import ExpertKey, ParamRef
from ..layer.moe import iter_moe_modules
from .build_groups import (DEFAULT_MAX_GROUP_SIZE, IDENTITY_KEYS, SPLIT_BY, STACKED_WHOLE, Member, ParamGroup,
                           check_cap, check_split_by, numel, split_group)

STACKED = ("whole", "views")


def is_moe_param(param: torch.Tensor) -> bool:
    """Tell whether ``param`` is an expert parameter (tagged ``allreduce = False``).

    Args:
        param: a tensor or parameter.

    Returns:
        True for expert parameters, False for dense ones.
    """
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a torch.Tensor, got {type(param).__name__}")
    return hasattr(param, "allreduce") and not param.allreduce


def has_moe_layers(model: nn.Module) -> Tuple[bool, int]:
    """Tell whether ``model`` contains an MoE layer.

    Args:
        model: the module to search.

    Returns:
        ``(True, num_experts of the first MoE layer)``, or ``(False, 0)``.
    """
    for _, module in iter_moe_modules(model):
        return True, module.num_experts
    return False, 0


def _param_list(params: Any, where: str) -> List[torch.Tensor]:
    """Normalise a tensor or an ordered iterable of tensors to a list, checking every entry."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (dict, str, bytes, set, frozenset)) or not isinstance(params, Iterable):
        raise TypeError(f"{where} must be a Tensor or an ordered iterable of Tensors (list, tuple, generator), "
                        f"got {type(params).__name__}")
    out = list(params)
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return out


def split_params_into_shared_and_expert_params(
        params: Iterable[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Split parameters into dense (shared) and expert parameters, keeping their order.

    Args:
        params: a tensor or an iterable of tensors.

    Returns:
        ``(shared_params, expert_params)``.
    """
    shared: List[torch.Tensor] = []
    expert: List[torch.Tensor] = []
    for p in _param_list(params, "params"):
        (expert if is_moe_param(p) else shared).append(p)
    return shared, expert


def split_params_grads_into_shared_and_expert_params(
        group: Iterable[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Split the gradients of ``group`` into dense and expert gradients (for norms and clipping).

    Args:
        group: a tensor or an iterable of tensors; those without ``.grad`` are skipped.

    Returns:
        ``(shared_grads, expert_grads)``, each gradient cast to its parameter's dtype.
    """
    shared: List[torch.Tensor] = []
    expert: List[torch.Tensor] = []
    for p in _param_list(group, "group"):
        if p.grad is not None:
            (expert if is_moe_param(p) else shared).append(p.grad.to(p.dtype))
    return shared, expert


def is_moe_param_group(group: ParamGroup) -> bool:
    """Tell whether an optimizer parameter group is an MoE group (``group["moe"]`` is true).

    Args:
        group: a parameter-group dict.

    Returns:
        True for MoE groups.
    """
    if not isinstance(group, dict):
        raise TypeError(f"group must be a dict (an optimizer parameter group), got {type(group).__name__}")
    return bool(group.get("moe", False))


def _normalise_groups(param_groups: Any, arg: str = "param_groups") -> List[ParamGroup]:
    if isinstance(param_groups, dict):
        raw = [param_groups]
    elif isinstance(param_groups, (list, tuple)):
        raw = list(param_groups)
    else:
        raise TypeError(f"{arg} must be a dict, list or tuple of dicts, got {type(param_groups).__name__}")
    groups = []
    for gi, group in enumerate(raw):
        if not isinstance(group, dict):
            raise TypeError(f"{arg}[{gi}] must be a dict, got {type(group).__name__}")
        if "params" not in group:
            raise ValueError(f"{arg}[{gi}] has no 'params' key (keys: {sorted(map(str, group))}); "
                             "every parameter group needs one")
        groups.append({**group, "params": _param_list(group["params"], f"{arg}[{gi}]['params']")})
    owner: Dict[int, int] = {}
    for gi, group in enumerate(groups):
        for p in group["params"]:
            if id(p) in owner:
                prev = owner[id(p)]
                where = f"twice in {arg}[{gi}]" if prev == gi else f"in both {arg}[{prev}] and {arg}[{gi}]"
                raise ValueError(f"a parameter of shape {tuple(p.shape)} appears {where}; "
                                 "every parameter must belong to exactly one group")
            owner[id(p)] = gi
    return groups


def _tag_members(group: ParamGroup, gi: int, split_by: str, stacked: str) -> List[Member]:
    """Each tensor of a group placed by the tags it carries (DeepSpeed's ``group_name``, moesaic's stacking)."""
    out: List[Member] = []
    for p in group["params"]:
        if not is_moe_param(p):
            out.append((p, None, None))
        elif getattr(p, "moe_stacked", None) is None:
            layer, number = _identity(p, gi, split_by)
            out.append((p, layer, number))
        elif stacked == "whole":
            out.append((p, p.moe_stacked[0], STACKED_WHOLE))
        else:  # one view per expert, named as ExpertIndex names them
            layer, first = p.moe_stacked
            for i in range(p.shape[0]):
                key = ExpertKey(layer, first + i)
                out.append((ParamRef(f"{key}/{p.moe_param_name}", p, key, i), layer, key.number))
    return out


def _identity(p: torch.Tensor, gi: int, split_by: str) -> Tuple[str, Optional[int]]:
    layer = getattr(p, "group_name", None)
    if not isinstance(layer, str) or not layer:
        got = "none" if not hasattr(p, "group_name") else repr(layer)
        raise ValueError(f"an MoE parameter (allreduce=False) of shape {tuple(p.shape)} in param_groups[{gi}] "
                         f"needs a non-empty str group_name, got {got}; build experts with moesaic Experts/MoE")
    number = getattr(p, "expert_number", None)
    if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
        raise ValueError(f"an MoE parameter of shape {tuple(p.shape)} in param_groups[{gi}] has expert_number="
                         f"{number!r}; it must be an int")
    if number is None and split_by == "expert":
        raise ValueError(f"an MoE parameter of shape {tuple(p.shape)} in layer {layer!r} (param_groups[{gi}]) has "
                         "no expert_number, so split_by='expert' cannot place it; tag it or use split_by='layer'")
    return layer, number


def split_params_into_different_moe_groups_for_optimizer(
        param_groups: Union[ParamGroup, Sequence[ParamGroup]],
        max_group_size: Union[int, float, None] = DEFAULT_MAX_GROUP_SIZE, *,
        split_by: str = "expert", stacked: str = "whole") -> List[ParamGroup]:
    """Move expert parameters out of their groups into MoE groups, one per expert or per layer.

    Every base group is kept (as a new dict, in input order) with only its dense parameters, even
    when none are left, so lists of per-group hyperparameters stay aligned. Then come the MoE
    groups, ordered by (base group, first appearance of the layer, expert_number, part). Each
    copies its base group's hyperparameters and adds ``moe=True``, ``expert_group_name``,
    ``expert_number`` (None with ``split_by="layer"``) and ``name`` =
    ``"<base name>/<layer>[/expert_<n>][/part_<i>]"``; a base group without a name is called
    ``"group_<index>"``, and base names used twice get ``"[<index>]"`` appended.

    Args:
        param_groups: a group dict, or a list or tuple of them; ``params`` may be a tensor or any
            ordered iterable of tensors. Never mutated.
        max_group_size: most elements per MoE group (a lone larger parameter gets a group of its
            own); None for no size split. Parameters are packed greedily in order.
        split_by: ``"expert"``: a group never mixes experts; ``"layer"``: whole experts of one
            layer are packed together, and only an expert larger than the cap is split (alone).
        stacked: what to do with stacked expert tensors (see module docstring): ``"whole"``
            keeps each in a per-layer group ``"<base>/<layer>/stacked"`` (for torch optimizers);
            ``"views"`` cuts it into per-expert :class:`ParamRef` views grouped like per-module
            experts (for moesaic's optimizer).

    Returns:
        The new list of groups: base groups first, then MoE groups.
    """
    groups = _normalise_groups(param_groups)
    cap = check_cap(max_group_size)
    check_split_by(split_by)
    if stacked not in STACKED:
        raise ValueError(f"stacked must be one of {STACKED}, got {stacked!r}")
    names = [f"group_{gi}" if g.get("name") is None else str(g["name"]) for gi, g in enumerate(groups)]
    counts = Counter(names)
    names = [n if counts[n] == 1 else f"{n}[{gi}]" for gi, n in enumerate(names)]
    parts = [split_group(g, names[gi], _tag_members(g, gi, split_by, stacked), cap, split_by)
             for gi, g in enumerate(groups)]
    return [part[0] for part in parts] + [g for part in parts for g in part[1:]]


def configure_moe_param_groups(model_parameters: Iterable[Any], *,
                               max_group_size: Union[int, float, None] = DEFAULT_MAX_GROUP_SIZE,
                               split_by: str = "expert") -> List[Any]:
    """Make optimizer input MoE-aware, as DeepSpeed's engine does before building the optimizer.

    Args:
        model_parameters: parameters (one base group named ``"dense-params"`` is made of them) or
            parameter-group dicts; a generator such as ``model.parameters()`` is accepted.
        max_group_size / split_by: passed to ``split_params_into_different_moe_groups_for_optimizer``.

    Returns:
        Split groups; or, when some group dict already has a ``"moe"`` key, the groups unchanged.
    """
    if isinstance(model_parameters, (torch.Tensor, dict, str, bytes, set, frozenset)) or \
            not isinstance(model_parameters, Iterable):
        raise TypeError(f"model_parameters must be a list (or iterable) of Tensors or of dicts, "
                        f"got {type(model_parameters).__name__}")
    items = list(model_parameters)
    if not items:
        raise ValueError("model_parameters is empty; the optimizer needs at least one parameter or group")
    kind = torch.Tensor if isinstance(items[0], torch.Tensor) else dict
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise TypeError(f"model_parameters[{i}] must be a {kind.__name__} like model_parameters[0] "
                            f"(all Tensors or all dicts), got {type(item).__name__}")
    if kind is torch.Tensor:
        base = {"params": items, "name": "dense-params"}
        return split_params_into_different_moe_groups_for_optimizer(base, max_group_size, split_by=split_by)
    if any("moe" in group for group in items):
        return items
    return split_params_into_different_moe_groups_for_optimizer(items, max_group_size, split_by=split_by)


def describe_param_groups(groups: Union[ParamGroup, Sequence[ParamGroup]]) -> List[str]:
    """Summarise parameter groups, one line each, e.g. ``"decay/l.0/expert_3: 4 tensors, 1,234 params, lr=0.001"``.

    Args:
        groups: a group dict or a list/tuple of them (e.g. ``optimizer.param_groups``).

    Returns:
        One line per group: name (or ``group_<i>``), tensor and element counts, and every
        numeric hyperparameter (bools and identity keys such as ``expert_number`` left out).
    """
    lines = []
    for gi, group in enumerate(_normalise_groups(groups, "groups")):
        params = group["params"]
        name = group.get("name")
        line = (f"{f'group_{gi}' if name is None else name}: {len(params)} tensor{'' if len(params) == 1 else 's'}, "
                f"{sum(numel(p) for p in params):,} params")
        hyper = [f"{k}={v!r}" for k, v in group.items() if k not in IDENTITY_KEYS
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
        lines.append(", ".join([line] + hyper))
    return lines
