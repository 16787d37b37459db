"""From a model (and optional user groups) to the engine's capped, identity-named parameter groups.

1. start from the user's ``model_parameters`` (tensors or group dicts) or ``model.parameters()``;
2. freeze the experts the config names (``requires_grad = False``, left out of every group);
3. split MoE parameters per layer or per expert (:mod:`moesaic.optim.param_groups`) unless the
   caller already did;
4. cut dense groups into parts of at most ``max_group_size`` elements, so the full-precision
   working set of a step is bounded by the cap, never by the model;
5. attach ``lr_scale`` per layer or per expert;
6. check that every trainable parameter of the model is in exactly one group.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

from torch import Tensor, nn

from .param_groups import split_params_into_different_moe_groups_for_optimizer


def freeze_experts(model: nn.Module, spec: Sequence[Union[int, str]]) -> List[str]:
    """Freeze expert parameters by number (every layer) or by ``"layer_name/number"``.

    Returns the ``"layer/number"`` names frozen; a spec that matches no expert is an error.
    """
    from ..layer.moe import MoE

    frozen, matched = [], set()
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        for i, expert in enumerate(module.experts):
            number = module.experts.first_expert_number + i
            for s in spec:
                if s == number or s == f"{module.expert_group_name}/{number}":
                    matched.add(s)
                    for p in expert.parameters():
                        p.requires_grad_(False)
                    frozen.append(f"{module.expert_group_name}/{number}")
    unmatched = [s for s in spec if s not in matched]
    if unmatched:
        raise ValueError(f"moe.freeze_experts entries {unmatched} match no local expert; use an expert number "
                         "or 'expert_group_name/expert_number'")
    return frozen


def _chunk_dense(group: Dict, cap: Optional[int]) -> List[Dict]:
    params = group["params"]
    total = sum(p.numel() for p in params)
    if cap is None or total <= cap or len(params) < 2:
        return [group]
    parts, cur, size = [], [], 0
    for p in params:
        if cur and size + p.numel() > cap:
            parts.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p.numel()
    parts.append(cur)
    return [{**group, "params": part, "name": f"{group['name']}/part_{i}"} for i, part in enumerate(parts)]


def build_param_groups(model: nn.Module, model_parameters: Optional[Iterable] = None, *, split_by: str = "expert",
                       max_group_size: Optional[int] = None, lr_scale: Optional[Dict[str, float]] = None,
                       freeze: Sequence[Union[int, str]] = ()) -> List[Dict]:
    """The engine's parameter groups (see module docstring).

    Args:
        model: the model being trained.
        model_parameters: None, an iterable of parameters, or of group dicts.
        split_by: "expert" or "layer".
        max_group_size: cap in elements for every group (None: no cap).
        lr_scale: ``{"layer": s}`` or ``{"layer/number": s}``; multiplies that group's ``lr``.
        freeze: experts to freeze (see :func:`freeze_experts`).

    Returns:
        A list of group dicts, each with a unique ``name``.
    """
    if freeze:
        freeze_experts(model, list(freeze))
    if model_parameters is None:
        model_parameters = list(model.parameters())
    items = list(model_parameters)
    if not items:
        raise ValueError("model_parameters is empty")
    if all(isinstance(x, dict) for x in items):
        groups = [dict(g) for g in items]
    elif all(isinstance(x, Tensor) for x in items):
        groups = [{"params": items, "name": "params"}]
    else:
        raise TypeError("model_parameters must be all tensors or all param-group dicts, got a mix")
    for i, g in enumerate(groups):
        if "params" not in g:
            raise ValueError(f"model_parameters[{i}] has no 'params' entry")
        plist = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
        g["params"] = [p for p in plist if p.requires_grad]
        g.setdefault("name", f"group_{i}")
    if not any(g.get("moe") for g in groups):
        groups = split_params_into_different_moe_groups_for_optimizer(groups, max_group_size=max_group_size,
                                                                      split_by=split_by)
    out = []
    for g in groups:
        out.extend(_chunk_dense(g, max_group_size) if not g.get("moe") else [g])
    out = [g for g in out if g["params"]]
    for g in out:
        if g.get("moe") and lr_scale:
            key_expert = f"{g['expert_group_name']}/{g.get('expert_number')}"
            g["lr_scale"] = lr_scale.get(key_expert, lr_scale.get(g["expert_group_name"], g.get("lr_scale", 1.0)))
    _check_coverage(model, out)
    return out


def _check_coverage(model: nn.Module, groups: List[Dict]) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    where: Dict[int, int] = {}
    for gi, g in enumerate(groups):
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError(f"group {g['name']!r} holds a parameter of shape {tuple(p.shape)} that is not in "
                                 "the model")
            if id(p) in where:
                raise ValueError(f"parameter {names[id(p)]!r} is in two groups: {groups[where[id(p)]]['name']!r} "
                                 f"and {g['name']!r}")
            where[id(p)] = gi
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in where]
    if missing:
        raise ValueError(f"trainable parameters in no optimizer group: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; pass them in model_parameters or freeze them")
