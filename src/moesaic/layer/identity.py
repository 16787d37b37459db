"""Parameter identity: which MoE layer and global expert a tensor belongs to, in one object.

Every expert parameter is tagged once, by the experts container that owns it
(:func:`tag_expert_param`), with

* ``allreduce = False``, ``group_name`` and ``expert_number``: DeepSpeed's names, which its
  helpers (and ours of the same names) read;
* ``moe_expert``: an :class:`ExpertKey` ``(layer, number)``;
* ``moe_param_name``: the parameter's name inside its expert (``"fc.weight"``).

:class:`ExpertIndex` is built from those tags and answers, for a whole model, "who is this
tensor" (:class:`ParamRef`: a stable name and an optional :class:`ExpertKey`) and "which tensors
form expert (layer, n)". Gradient sync, optimizer groups, freezing, ``lr_scale``, the optimizer's
``state_dict``, checkpoints and telemetry all read the index; none walks modules or parses
module paths to find experts.

Stable names do not depend on the world size or the expert-parallel layout:

* a dense parameter is called by its name in ``model.named_parameters()``;
* an expert parameter is called ``"<layer>/<number>/<name inside the expert>"``
  (``"blocks.1.ffn/3/fc.weight"``), the same on every rank that holds that expert.

A ref may also stand for one expert's slice of a stacked parameter (``index`` set): experts
stored as ``[E_local, ...]`` tensors are still addressed expert by expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..parallel.dtensor import local_rows

if TYPE_CHECKING:  # pragma: no cover
    from ..parallel.groups import ExpertParallelGroups


@dataclass(frozen=True, order=True)
class ExpertKey:
    """One expert of one MoE layer: the layer's ``expert_group_name`` and the global expert number."""

    layer: str
    number: int

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"ExpertKey.layer must be a non-empty str, got {self.layer!r}")
        if isinstance(self.number, bool) or not isinstance(self.number, int) or self.number < 0:
            raise ValueError(f"ExpertKey.number must be an int >= 0, got {self.number!r}")

    def __str__(self) -> str:
        return f"{self.layer}/{self.number}"

    @classmethod
    def parse(cls, text: str) -> "ExpertKey":
        """``"layers.1.mlp/3"`` -> ``ExpertKey("layers.1.mlp", 3)``."""
        if not isinstance(text, str):
            raise TypeError(f"an expert reference must be a str '<layer>/<number>', got {type(text).__name__}")
        layer, slash, number = text.rpartition("/")
        if not slash or not layer or not (number.isascii() and number.isdigit()):
            raise ValueError(f"an expert reference must look like '<expert_group_name>/<expert_number>', got {text!r}")
        return cls(layer, int(number))


def tag_expert_param(param: Tensor, key: ExpertKey, name: str) -> None:
    """Stamp ``param`` as tensor ``name`` of expert ``key`` (the only place tags are written)."""
    if not isinstance(key, ExpertKey):
        raise TypeError(f"key must be an ExpertKey, got {type(key).__name__}")
    param.allreduce = False
    param.group_name = key.layer
    param.expert_number = key.number
    param.moe_expert = key
    param.moe_param_name = name


def tag_stacked_param(param: Tensor, layer: str, first_number: int, name: str) -> None:
    """Stamp a stacked ``[E_local, ...]`` parameter: slice ``i`` is expert ``first_number + i``."""
    param.allreduce = False
    param.group_name = layer
    param.expert_number = None  # many experts: addressed slice by slice
    param.moe_expert = None
    param.moe_stacked = (layer, first_number)
    param.moe_param_name = name


def expert_key_of(param: Tensor) -> Optional[ExpertKey]:
    """The expert a (whole) parameter belongs to, or None for a dense or stacked parameter."""
    return getattr(param, "moe_expert", None)


@dataclass(frozen=True)
class ParamRef:
    """One tensor the optimizer, gradient sync and checkpoints address by identity.

    Attributes:
        name: the stable name (see module docstring).
        param: the model parameter holding the data.
        expert: the expert it belongs to, or None for a dense tensor.
        index: for one expert's slice of a stacked parameter, the slice along dim 0; else None.
    """

    name: str
    param: nn.Parameter = field(compare=False, repr=False)
    expert: Optional[ExpertKey] = None
    index: Optional[int] = None

    @property
    def data(self) -> Tensor:
        """The tensor's values (a view for a stacked slice); never tracked by autograd."""
        d = self.param.detach()
        return d if self.index is None else d[self.index]

    @property
    def grad(self) -> Optional[Tensor]:
        """Its gradient (a view of the stacked gradient for a slice), or None."""
        g = self.param.grad
        if g is None or self.index is None:
            return g
        return g[self.index]

    @property
    def shape(self) -> torch.Size:
        return self.param.shape if self.index is None else self.param.shape[1:]

    def numel(self) -> int:
        # from the shape: indexing a sharded (DTensor) parameter would be a collective
        return self.param.numel() if self.index is None else self.param.shape[1:].numel()

    @property
    def requires_grad(self) -> bool:
        return self.param.requires_grad


@dataclass(frozen=True)
class LayerInfo:
    """What the index knows about one MoE layer.

    Attributes:
        name: ``expert_group_name``.
        path: the module path in the model (for messages only).
        num_experts: E, over all expert-parallel ranks.
        ep_size: expert-parallel size P.
        local_numbers: global numbers of the experts this rank holds, in local order.
        groups: the layer's process groups, or None before ``setup_expert_parallel``.
        module: the layer itself.
    """

    name: str
    path: str
    num_experts: int
    ep_size: int
    local_numbers: Tuple[int, ...]
    groups: Optional["ExpertParallelGroups"] = field(default=None, compare=False, repr=False)
    module: Optional[nn.Module] = field(default=None, compare=False, repr=False)


class ExpertIndex:
    """Identity of every parameter of a model (see module docstring).

    Build it with :meth:`build`; it is a snapshot: rebuild after renaming layers, moving
    experts to other ranks or replacing parameters.
    """

    def __init__(self, refs: List[ParamRef], layers: Dict[str, LayerInfo]) -> None:
        self._refs = list(refs)
        self.layers: Dict[str, LayerInfo] = dict(layers)
        self._by_name: Dict[str, ParamRef] = {}
        self._by_param: Dict[int, List[ParamRef]] = {}
        self._by_expert: Dict[ExpertKey, List[ParamRef]] = {}
        for ref in self._refs:
            if ref.name in self._by_name:
                raise ValueError(f"two tensors of the model are both called {ref.name!r}; expert layers need unique "
                                 "names: call moesaic.name_moe_layers(model)")
            self._by_name[ref.name] = ref
            self._by_param.setdefault(id(ref.param), []).append(ref)
            if ref.expert is not None:
                self._by_expert.setdefault(ref.expert, []).append(ref)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module) -> "ExpertIndex":
        """Read the tags of every parameter of ``model`` (tied parameters once, first name wins)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layers: Dict[str, LayerInfo] = {}
        for name, (path, layer) in moe_layers(model).items():
            layers[name] = LayerInfo(name=name, path=path, num_experts=layer.num_experts, ep_size=layer.ep_size,
                                     local_numbers=tuple(layer.experts.local_numbers),
                                     groups=layer.parallel_groups, module=layer)
        refs: List[ParamRef] = []
        for fqn, p in model.named_parameters():
            stacked = getattr(p, "moe_stacked", None)
            key = expert_key_of(p)
            if stacked is not None:
                layer, first = stacked
                for i in range(p.shape[0]):
                    k = ExpertKey(layer, first + i)
                    refs.append(ParamRef(f"{k}/{p.moe_param_name}", p, k, i))
            elif key is not None:
                refs.append(ParamRef(f"{key}/{p.moe_param_name}", p, key))
            elif getattr(p, "allreduce", True) is False:
                raise ValueError(f"parameter {fqn!r} is marked allreduce=False (an expert parameter) but carries no "
                                 "expert identity; build experts with moesaic's Experts/MoE")
            else:
                refs.append(ParamRef(fqn, p))
        for ref in refs:
            if ref.expert is not None and ref.expert.layer not in layers:
                raise ValueError(f"tensor {ref.name!r} is tagged for MoE layer {ref.expert.layer!r}, which is not in "
                                 f"the model (layers: {sorted(layers)})")
        return cls(refs, layers)

    # --- queries --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ParamRef]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def refs(self, trainable_only: bool = False) -> List[ParamRef]:
        """Every ref, in model order (a stacked parameter's slices in expert order)."""
        return [r for r in self._refs if r.requires_grad or not trainable_only]

    def dense(self, trainable_only: bool = False) -> List[ParamRef]:
        """Refs of dense (non-expert) tensors, in model order."""
        return [r for r in self.refs(trainable_only) if r.expert is None]

    def experts(self) -> List[ExpertKey]:
        """The experts held by this rank, sorted by (layer, number)."""
        return sorted(self._by_expert)

    def expert_refs(self, key: ExpertKey) -> List[ParamRef]:
        """The tensors that form expert ``key`` (a KeyError-free empty list never: unknown keys raise)."""
        try:
            return list(self._by_expert[key])
        except KeyError:
            raise KeyError(f"expert {key} is not held here (local experts: "
                           f"{[str(k) for k in self.experts()][:8]}...)") from None

    def ref(self, name: str) -> ParamRef:
        """The ref called ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor called {name!r} in this model") from None

    def refs_of(self, param: Tensor) -> List[ParamRef]:
        """The refs a parameter holds (one, or one per expert for a stacked parameter)."""
        try:
            return list(self._by_param[id(param)])
        except KeyError:
            raise KeyError(f"a tensor of shape {tuple(param.shape)} is not a parameter of this model") from None

    def held_refs(self, params) -> List[ParamRef]:
        """The refs of ``params`` whose rows this rank holds: all of them for plain tensors; for a
        ``DTensor`` sharded by FSDP2, a stacked expert only where its slice is local."""
        out = []
        for p in params:
            rows = local_rows(p)
            for ref in self.refs_of(p):
                if ref.index is None or rows is None or rows[0] <= ref.index < rows[1]:
                    out.append(ref)
        return out

    def ref_of(self, param: Tensor) -> ParamRef:
        """The single ref of a whole parameter (an error for stacked parameters)."""
        refs = self.refs_of(param)
        if len(refs) != 1:
            raise ValueError(f"parameter {refs[0].param.moe_param_name!r} stacks {len(refs)} experts; address its "
                             "experts' slices through ExpertIndex.expert_refs")
        return refs[0]

    def __contains__(self, item) -> bool:
        if isinstance(item, str):
            return item in self._by_name
        if isinstance(item, ExpertKey):
            return item in self._by_expert
        return id(item) in self._by_param

    def layer_of(self, key: ExpertKey) -> LayerInfo:
        return self.layers[key.layer]

    def expert_state_dict(self, key: ExpertKey) -> Dict[str, Tensor]:
        """Every tensor of expert ``key`` (parameters and buffers) by its name inside the expert."""
        return self._experts_of(key).expert_state_dict(key.number)

    def load_expert_state_dict(self, key: ExpertKey, tensors: Dict[str, Tensor]) -> None:
        """Copy ``tensors`` into expert ``key`` (strict: the names must match)."""
        self._experts_of(key).load_expert_state_dict(key.number, tensors)

    def _experts_of(self, key: ExpertKey):
        if key not in self._by_expert:
            raise KeyError(f"expert {key} is not held here")
        return self.layers[key.layer].module.experts

    def dense_state_dict(self, model: nn.Module) -> Dict[str, Tensor]:
        """``model.state_dict()`` without the tensors of any expert held here (buffers included)."""
        expert_ids = {id(t) for key in self._by_expert
                      for t in self._experts_of(key).expert_state_dict(key.number, keep_vars=True).values()}
        # a stacked parameter answers with views of itself: leave out the parameter behind them too
        expert_ids.update(id(r.param) for r in self._refs if r.expert is not None)
        return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if id(v) not in expert_ids}


class MoELayerBase(nn.Module):
    """What the walks below recognise as an MoE layer (:class:`moesaic.layer.moe.MixtureOfExperts`).

    Defined here, under the layer, so that identity finds layers without importing the layer's
    module (which imports the experts, which import identity).
    """

    expert_group_name: str


def iter_moe_modules(model: nn.Module):
    """``(module path, layer)`` for every MoE layer of ``model``, in module order (names may repeat)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for path, module in model.named_modules():
        if isinstance(module, MoELayerBase):
            yield path, module


def moe_layers(model: nn.Module) -> Dict[str, Tuple[str, MoELayerBase]]:
    """``{expert_group_name: (module path, layer)}`` of every MoE layer, in module order.

    The one walk over a model's modules that looks for MoE layers; everything else asks
    :class:`ExpertIndex`. Two layers with the same name are an error: identity (optimizer groups,
    checkpoints, telemetry) is keyed by layer name.
    """
    out: Dict[str, Tuple[str, MoELayerBase]] = {}
    for path, module in iter_moe_modules(model):
        name = module.expert_group_name
        if name in out:
            raise ValueError(f"MoE layers {out[name][0] or '<root>'!r} and {path or '<root>'!r} are both named "
                             f"{name!r}; identity is keyed by layer name: call moesaic.name_moe_layers(model)")
        out[name] = (path, module)
    return out


def require_index(index: object, where: str) -> "ExpertIndex":
    """``index`` must be the model's :class:`ExpertIndex`: built once per model by the caller, never here."""
    if not isinstance(index, ExpertIndex):
        raise TypeError(f"{where} must be the model's ExpertIndex (build it once per model with moesaic."
                        f"ExpertIndex.build(model) and pass it), got {type(index).__name__}")
    return index
