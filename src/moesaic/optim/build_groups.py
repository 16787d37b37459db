"""From a model (and optional user groups) to the engine's capped, identity-named parameter groups.

1. start from the user's ``model_parameters`` (tensors or group dicts) or ``model.parameters()``;
2. freeze the experts the config names (``requires_grad = False``, left out of every group);
3. split MoE parameters per layer or per expert (:mod:`moesaic.optim.param_groups`) unless the
   caller already did;
4. cut dense groups into parts of at most ``max_group_size`` elements, so the full-precision
   working set of a step is bounded by the cap, never by the model;
5. attach ``lr_scale`` per layer or per expert;
6. check that every trainable parameter of the model is in exactly one group.

Every question of identity (is this an expert, which one, what is it called) is answered by the
model's :class:`~moesaic.layer.identity.ExpertIndex`. Stacked experts enter the groups as
per-expert :class:`~moesaic.layer.identity.ParamRef` views (``stacked="views"``), so their groups
are named and sized exactly as per-module experts' are.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

from torch import Tensor, nn

from ..layer.identity import ExpertIndex, ExpertKey, ParamRef
from .param_groups import split_params_into_different_moe_groups_for_optimizer


def freeze_experts(model: nn.Module, spec: Sequence[Union[int, str]], index: Optional[ExpertIndex] = None) -> List[str]:
    """Freeze expert parameters by number (every layer) or by ``"layer_name/number"``.

    Args:
        model: the model.
        spec: expert numbers (that expert in every MoE layer) and/or ``"<layer>/<number>"`` strings.
        index: the model's index (built when None).

    Returns:
        The ``"layer/number"`` names frozen on this rank; a spec entry that matches no local
        expert is an error.
    """
    index = index if index is not None else ExpertIndex.build(model)
    frozen, matched, refs = [], set(), []
    for key in index.experts():
        for s in spec:
            if s == key.number or s == str(key):
                matched.add(s)
                refs.extend(index.expert_refs(key))
                frozen.append(str(key))
    unmatched = [s for s in spec if s not in matched]
    if unmatched:
        raise ValueError(f"moe.freeze_experts entries {unmatched} match no local expert; use an expert number "
                         "or 'expert_group_name/expert_number'")
    # requires_grad is per tensor: a stacked tensor freezes all its experts or none
    chosen = {(id(r.param), r.index) for r in refs}
    for r in refs:
        if r.index is not None and any((id(o.param), o.index) not in chosen for o in index.refs_of(r.param)):
            held = index.layers[r.expert.layer].local_numbers
            raise ValueError(f"moe.freeze_experts would freeze only some experts of stacked tensor {r.name!r} "
                             f"(layer {r.expert.layer!r} stores its experts {held} in one tensor); freeze all of "
                             "them, or build the layer with per-module experts")
    for r in refs:
        r.param.requires_grad_(False)
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


def _check_lr_scale(lr_scale: Dict[str, float], index: ExpertIndex) -> None:
    """Every key must name a layer of the model, or an expert of one of its layers."""
    for key in lr_scale:
        if key in index.layers:
            continue
        try:
            ek = ExpertKey.parse(key)
        except ValueError:
            ek = None
        if ek is not None and ek.layer in index.layers and 0 <= ek.number < index.layers[ek.layer].num_experts:
            continue
        raise ValueError(f"moe.lr_scale key {key!r} names no MoE layer or expert of the model; layers: "
                         f"{sorted(index.layers)} (each with experts 0..num_experts-1), written '<layer>' or "
                         "'<layer>/<number>'")


def build_param_groups(model: nn.Module, model_parameters: Optional[Iterable] = None, *, split_by: str = "expert",
                       max_group_size: Optional[int] = None, lr_scale: Optional[Dict[str, float]] = None,
                       freeze: Sequence[Union[int, str]] = (), index: Optional[ExpertIndex] = None) -> List[Dict]:
    """The engine's parameter groups (see module docstring).

    Args:
        model: the model being trained.
        model_parameters: None, an iterable of parameters, or of group dicts.
        split_by: "expert" or "layer".
        max_group_size: cap in elements for every group (None: no cap).
        lr_scale: ``{"layer": s}`` or ``{"layer/number": s}``; multiplies that group's ``lr``.
        freeze: experts to freeze (see :func:`freeze_experts`).
        index: the model's index (built when None).

    Returns:
        A list of group dicts, each with a unique ``name``.
    """
    index = index if index is not None else ExpertIndex.build(model)
    if lr_scale:
        _check_lr_scale(lr_scale, index)
    if freeze:
        freeze_experts(model, list(freeze), index)
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
                                                                      split_by=split_by, stacked="views")
    else:
        groups = [h for g in groups for h in _resplit_mixed(g, index, split_by, max_group_size)]
    out = []
    for g in groups:
        out.extend(_chunk_dense(g, max_group_size) if not g.get("moe") else [g])
    out = [g for g in out if g["params"]]
    for g in out:
        if g.get("moe") and lr_scale:
            key_expert = f"{g['expert_group_name']}/{g.get('expert_number')}"
            g["lr_scale"] = lr_scale.get(key_expert, lr_scale.get(g["expert_group_name"], g.get("lr_scale", 1.0)))
    _check_coverage(index, out)
    return out


def _resplit_mixed(group: Dict, index: ExpertIndex, split_by: str, max_group_size: Optional[int]) -> List[Dict]:
    """A group already split by the client, split again when it spans several MoE layers.

    DeepSpeed's splitter groups experts by ``group_name`` (``ep_size_<n>``), shared by every layer
    of one ``ep_size`` until ``initialize`` names the layers; a script that splits before
    ``initialize`` (DeepSpeedExamples' cifar ``--moe-param-group``) hands over groups holding the
    same expert number of several layers. Each layer gets its own groups here, the client's keys kept.
    """
    if not group.get("moe"):
        return [group]
    layers = set()
    for p in group["params"]:
        refs = [p] if isinstance(p, ParamRef) else (index.refs_of(p) if p in index else [])
        layers.update(r.expert.layer for r in refs if r.expert is not None)
    if len(layers) <= 1:
        return [group]
    plain = {k: v for k, v in group.items() if k not in ("moe", "expert_group_name", "expert_number")}
    return [g for g in split_params_into_different_moe_groups_for_optimizer([plain], max_group_size=max_group_size,
                                                                            split_by=split_by, stacked="views")
            if g["params"]]


def _check_coverage(index: ExpertIndex, groups: List[Dict]) -> None:
    where: Dict[tuple, int] = {}  # (parameter, slice of a stacked one or None) -> group
    for gi, g in enumerate(groups):
        for p in g["params"]:
            if isinstance(p, ParamRef):
                if p.name not in index:
                    raise ValueError(f"group {g['name']!r} holds a tensor {p.name!r} that is not in the model")
                at, name = (id(p.param), p.index), p.name
            else:
                if p not in index:
                    raise ValueError(f"group {g['name']!r} holds a parameter of shape {tuple(p.shape)} that is not "
                                     "in the model")
                at, name = (id(p), None), index.refs_of(p)[0].name
            if at in where:
                raise ValueError(f"parameter {name!r} is in two groups: "
                                 f"{groups[where[at]]['name']!r} and {g['name']!r}")
            where[at] = gi
    missing = [r.name for r in index.refs(trainable_only=True) if (id(r.param), r.index) not in where]
    if missing:
        raise ValueError(f"trainable parameters in no optimizer group: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; pass them in model_parameters or freeze them")
