"""The one group builder: parameter groups from identity, packed by one packer.

Every optimizer group moesaic makes comes from :func:`split_group`: a base group's dense tensors
stay in it, its expert tensors move into MoE groups, one per expert (``split_by="expert"``) or
per layer (``"layer"``), each packed to at most ``max_group_size`` elements by :func:`pack` and
named ``"<base>/<layer>[/expert_<n>][/part_<i>]"``. What differs between callers is only where
identity comes from:

* the engine (:func:`build_param_groups`) and ZeRO-3 (:func:`index_members`) read it from the
  model's :class:`~moesaic.layer.identity.ExpertIndex`, built once per model and passed in;
  the engine's groups hold :class:`~moesaic.layer.identity.ParamRef` s (a stacked expert tensor
  as one view per expert), so the optimizer and the ZeRO plan take them as they are;
* DeepSpeed's helpers (:mod:`moesaic.optim.param_groups`) read it from the tags on the tensors
  they are given (DeepSpeed's API has no model), and hand back tensors.

``build_param_groups`` then:

1. freezes the experts the config names (``requires_grad = False``, left out of every group);
2. splits each base group (the user's ``model_parameters``, or all of the model's) with
   :func:`split_group`, unless the caller already split it (DeepSpeed's helper before
   ``initialize``), in which case a group is split again only when it spans several layers;
3. cuts dense groups into parts of at most ``max_group_size`` elements (:func:`pack`), so the
   full-precision working set of a step is bounded by the cap, never by the model;
4. attaches ``lr_scale`` per layer or per expert;
5. checks that every trainable parameter of the model is in exactly one group.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from ..layer.identity import ExpertIndex, ExpertKey, ParamRef, require_index

DEFAULT_MAX_GROUP_SIZE = 178956971  # DeepSpeed's default cap, in elements
SPLIT_BY = ("expert", "layer")
#: The keys of a group that say what it holds (the rest are its settings: lr, betas, the user's own).
IDENTITY_KEYS = ("params", "name", "moe", "expert_group_name", "expert_number")
#: The unit of a stacked expert tensor kept whole (a torch optimizer steps whole tensors only).
STACKED_WHOLE = "stacked"

ParamGroup = Dict[str, Any]
#: (what goes into the group's ``params``, its layer or None for a dense tensor, its unit in the
#: layer: an expert number, :data:`STACKED_WHOLE`, or None for an expert tensor without a number).
Member = Tuple[Any, Optional[str], Any]


def check_cap(max_group_size: Any) -> Optional[float]:
    """``max_group_size``: elements > 0, or None for no size split."""
    if max_group_size is None:
        return None
    if isinstance(max_group_size, bool) or not isinstance(max_group_size, (int, float)):
        raise TypeError(f"max_group_size must be an int, a float or None, "
                        f"got {type(max_group_size).__name__} ({max_group_size!r})")
    if not max_group_size > 0:
        raise ValueError(f"max_group_size must be > 0 elements (or None for no size split), got {max_group_size!r}")
    return max_group_size


def check_split_by(split_by: Any) -> str:
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    return split_by


def numel(item: Any) -> int:
    """Elements of a tensor (a ZeRO-3 partitioned one's full size) or of a :class:`ParamRef`."""
    return int(item.ds_numel) if hasattr(item, "ds_numel") else item.numel()


def pack(units: List[List[Any]], cap: Optional[float]) -> List[List[Any]]:
    """Greedily pack units (lists of tensors kept together) into chunks of at most ``cap`` elements.

    A unit larger than ``cap`` is packed tensor by tensor on its own; a single tensor larger than
    ``cap`` forms a chunk alone. ``cap`` None: one chunk.
    """
    chunks: List[List[Any]] = []
    cur: List[Any] = []
    size = 0
    for unit in units:
        n = sum(numel(p) for p in unit)
        if cap is not None and n > cap and len(unit) > 1:
            if cur:
                chunks.append(cur)
                cur, size = [], 0
            chunks.extend(pack([[p] for p in unit], cap))
            continue
        if cur and cap is not None and size + n > cap:
            chunks.append(cur)
            cur, size = [], 0
        cur.extend(unit)
        size += n
    if cur:
        chunks.append(cur)
    return chunks


def split_group(group: ParamGroup, name: str, members: Iterable[Member], cap: Optional[float],
                split_by: str) -> List[ParamGroup]:
    """One base group -> ``[the group with its dense members, then its MoE groups]``.

    MoE groups come in order of (first appearance of the layer, expert number, part); each copies
    the base group's settings and adds ``moe=True``, ``expert_group_name``, ``expert_number``
    (None per layer) and ``name`` = ``"<name>/<layer>[/expert_<n>][/part_<i>]"``; stacked tensors
    kept whole form ``"<name>/<layer>/stacked"`` groups ahead of their layer's other experts.
    """
    dense: List[Any] = []
    layers: Dict[str, Dict[Any, List[Any]]] = {}
    whole: Dict[str, List[Any]] = {}
    for item, layer, unit in members:
        if layer is None:
            dense.append(item)
            continue
        experts = layers.setdefault(layer, {})
        if unit == STACKED_WHOLE:
            whole.setdefault(layer, []).append(item)
        else:  # an expert tensor without a number is its own unit
            experts.setdefault(unit if unit is not None else ("untagged", len(experts)), []).append(item)
    hyper = {k: v for k, v in group.items() if k != "params"}
    out = [{**group, "params": dense}]

    def add(chunks: List[List[Any]], layer: str, number: Optional[int], stem: str) -> None:
        for i, chunk in enumerate(chunks):
            out.append({**hyper, "params": chunk, "moe": True, "expert_group_name": layer, "expert_number": number,
                        "name": stem + (f"/part_{i}" if len(chunks) > 1 else "")})

    for layer, experts in layers.items():
        if layer in whole:
            add(pack([[p] for p in whole[layer]], cap), layer, None, f"{name}/{layer}/{STACKED_WHOLE}")
        if split_by == "expert":
            for number in sorted(experts):
                add(pack([[p] for p in experts[number]], cap), layer, number, f"{name}/{layer}/expert_{number}")
        elif experts:
            add(pack(list(experts.values()), cap), layer, None, f"{name}/{layer}")
    return out


def saved_settings(saved: Dict[str, Dict[str, Any]], group: ParamGroup) -> Optional[Dict[str, Any]]:
    """The saved settings (by group name) for ``group``: its own, or, for an MoE group of a checkpoint
    written before stage 3 formed per-expert groups for stacked experts, its layer's
    ``"<base>/<layer>/stacked"`` group's (that group held the layer's experts with the layer's settings)."""
    own = saved.get(group.get("name"))
    if own is not None or not group.get("moe"):
        return own
    layer, number, name = group.get("expert_group_name"), group.get("expert_number"), str(group.get("name"))
    for tail in ((f"/{layer}/expert_{number}",) if number is not None else ()) + (f"/{layer}",):
        if name.endswith(tail):
            return saved.get(f"{name[:-len(tail)]}/{layer}/{STACKED_WHOLE}")
    return None


def index_members(params: Iterable[Any], index: ExpertIndex, where: str, *, views: bool = True) -> List[Member]:
    """Each tensor (or :class:`ParamRef`) of ``params`` placed by the index.

    ``views``: a stacked expert tensor becomes one ref per expert (moesaic's optimizer steps
    views); otherwise it stays whole (:data:`STACKED_WHOLE`, for a torch optimizer), and every
    other tensor stays the tensor itself.
    """
    out: List[Member] = []
    for p in params:
        if isinstance(p, ParamRef):
            refs = [p]
        elif not isinstance(p, Tensor):
            raise TypeError(f"{where} holds a {type(p).__name__}; allowed: the model's parameters (Tensors) or "
                            "ParamRefs")
        elif p in index:
            refs = index.refs_of(p)
        else:
            raise ValueError(f"{where} holds a parameter of shape {tuple(p.shape)} that is not in the model; "
                             "allowed: the model's parameters")
        if not views and refs[0].index is not None:
            out.append((p, refs[0].expert.layer, STACKED_WHOLE))
            continue
        for r in refs:
            item = r if views else p
            out.append((item, None, None) if r.expert is None else (item, r.expert.layer, r.expert.number))
    return out


def freeze_experts(model: nn.Module, spec: Sequence[Union[int, str]], index: ExpertIndex) -> List[str]:
    """Freeze expert parameters by number (every layer) or by ``"layer_name/number"``.

    Args:
        model: the model.
        spec: expert numbers (that expert in every MoE layer) and/or ``"<layer>/<number>"`` strings.
        index: the model's index (``ExpertIndex.build(model)``, built once per model).

    Returns:
        The ``"layer/number"`` names frozen on this rank; a spec entry that matches no local
        expert is an error.
    """
    require_index(index, "freeze_experts(index=...)")
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


def check_lr_scale(lr_scale: Dict[str, float], index: ExpertIndex) -> None:
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


def _base_groups(model: nn.Module, model_parameters: Optional[Iterable], index: ExpertIndex) -> List[ParamGroup]:
    """The caller's groups (or one of the whole model) with their trainable tensors as refs."""
    if model_parameters is None:
        model_parameters = list(model.parameters())
    items = list(model_parameters)
    if not items:
        raise ValueError("model_parameters is empty; allowed: parameters or parameter-group dicts of the model")
    if all(isinstance(x, dict) for x in items):
        groups = [dict(g) for g in items]
    elif all(isinstance(x, Tensor) for x in items):
        groups = [{"params": items, "name": "params"}]
    else:
        raise TypeError("model_parameters must be all tensors or all param-group dicts, got a mix")
    for i, g in enumerate(groups):
        if "params" not in g:
            raise ValueError(f"model_parameters[{i}] has no 'params' entry (keys: {sorted(map(str, g))})")
        g.setdefault("name", f"group_{i}")
        plist = [g["params"]] if isinstance(g["params"], (Tensor, ParamRef)) else list(g["params"])
        refs = [m[0] for m in index_members(plist, index, f"model_parameters[{i}] (group {g['name']!r})")]
        g["params"] = [r for r in refs if r.requires_grad]
    return groups


def _split_again(group: ParamGroup, cap: Optional[float], split_by: str) -> List[ParamGroup]:
    """A group already split by the client, split again when it spans several MoE layers.

    DeepSpeed's splitter groups experts by ``group_name`` (``ep_size_<n>``), shared by every layer
    of one ``ep_size`` until ``initialize`` names the layers; a script that splits before
    ``initialize`` (DeepSpeedExamples' cifar ``--moe-param-group``) hands over groups holding the
    same expert number of several layers. Each layer gets its own groups here, the client's keys kept.
    """
    if not group.get("moe") or len({r.expert.layer for r in group["params"] if r.expert is not None}) <= 1:
        return [group]
    plain = {k: v for k, v in group.items() if k not in ("moe", "expert_group_name", "expert_number")}
    members = [(r, None, None) if r.expert is None else (r, r.expert.layer, r.expert.number) for r in plain["params"]]
    return split_group(plain, plain["name"], members, cap, split_by)


def _unique_names(groups: List[ParamGroup]) -> None:
    """Groups of different client groups that came out with one name get ``[<client group>.<position>]``."""
    count: Dict[str, int] = {}
    for g in groups:
        count[g["name"]] = count.get(g["name"], 0) + 1
    for i, g in enumerate(groups):
        if count[g["name"]] > 1:
            g["name"] = f"{g['name']}[{g['client_group']}.{i}]"


def _cap_dense(group: ParamGroup, cap: Optional[float]) -> List[ParamGroup]:
    chunks = pack([[p] for p in group["params"]], cap)
    if len(chunks) <= 1:
        return [group]
    return [{**group, "params": chunk, "name": f"{group['name']}/part_{i}"} for i, chunk in enumerate(chunks)]


def build_param_groups(model: nn.Module, model_parameters: Optional[Iterable] = None, *, index: ExpertIndex,
                       split_by: str = "expert", max_group_size: Optional[int] = None,
                       lr_scale: Optional[Dict[str, float]] = None, freeze: Sequence[Union[int, str]] = (),
                       each_group_apart: bool = False) -> List[ParamGroup]:
    """The engine's parameter groups (see module docstring), their tensors as :class:`ParamRef` s.

    Args:
        model: the model being trained.
        model_parameters: None, an iterable of parameters, or of group dicts.
        index: the model's index (``ExpertIndex.build(model)``, built once per model).
        split_by: "expert" or "layer".
        max_group_size: cap in elements for every group (None: no cap).
        lr_scale: ``{"layer": s}`` or ``{"layer/number": s}``; multiplies that group's ``lr``.
        freeze: experts to freeze (see :func:`freeze_experts`).
        each_group_apart: a client optimizer's groups (each with its ``client_group``): each is
            followed by its own MoE groups, and names made twice are made unique.

    Returns:
        A list of group dicts, each with a unique ``name``.
    """
    require_index(index, "build_param_groups(index=...)")
    check_split_by(split_by)
    cap = check_cap(max_group_size)
    if lr_scale:
        check_lr_scale(lr_scale, index)
    if freeze:
        freeze_experts(model, list(freeze), index)
    groups = _base_groups(model, model_parameters, index)
    if any(g.get("moe") for g in groups):
        groups = [h for g in groups for h in _split_again(g, cap, split_by)]
    else:
        names = [f"group_{gi}" if g["name"] is None else str(g["name"]) for gi, g in enumerate(groups)]
        parts = [split_group(g, name if names.count(name) == 1 or each_group_apart else f"{name}[{gi}]",
                             [(r, None, None) if r.expert is None else (r, r.expert.layer, r.expert.number)
                              for r in g["params"]], cap, split_by)
                 for gi, (g, name) in enumerate(zip(groups, names))]
        groups = ([h for part in parts for h in part] if each_group_apart else
                  [part[0] for part in parts] + [h for part in parts for h in part[1:]])
    groups = [g for g in groups if g["params"]]
    if each_group_apart:
        _unique_names(groups)
    groups = [h for g in groups for h in (_cap_dense(g, cap) if not g.get("moe") else [g])]
    for g in groups:
        if g.get("moe") and lr_scale:
            key_expert = f"{g['expert_group_name']}/{g.get('expert_number')}"
            g["lr_scale"] = lr_scale.get(key_expert, lr_scale.get(g["expert_group_name"], g.get("lr_scale", 1.0)))
    _check_coverage(index, groups)
    return groups


def _check_coverage(index: ExpertIndex, groups: List[ParamGroup]) -> None:
    where: Dict[tuple, int] = {}  # (parameter, slice of a stacked one or None) -> group
    for gi, g in enumerate(groups):
        for r in g["params"]:
            if r.name not in index:
                raise ValueError(f"group {g['name']!r} holds a tensor {r.name!r} that is not in the model")
            at = (id(r.param), r.index)
            if at in where:
                raise ValueError(f"parameter {r.name!r} is in two groups: "
                                 f"{groups[where[at]]['name']!r} and {g['name']!r}")
            where[at] = gi
    missing = [r.name for r in index.refs(trainable_only=True) if (id(r.param), r.index) not in where]
    if missing:
        raise ValueError(f"trainable parameters in no optimizer group: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; pass them in model_parameters or freeze them")
