"""``load`` and ``save``: Hugging Face MoE models in and out of moesaic layers, every tensor accounted for.

``load`` plans the whole conversion before it changes anything: it builds one moesaic layer per
sparse block, names the checkpoint tensor every tensor of the model comes from, and checks the
plan against the checkpoint in both directions (a checkpoint tensor nothing reads, or a model
tensor no checkpoint tensor fills, is an error naming it) and every shape. Only then are tensors
copied and the blocks swapped, so a bad input leaves a given model untouched.

The layout of each block's tensors (``families.BlockLayout``: the Hub's one tensor per expert, or
``transformers`` 5's fused tensors) is detected from the checkpoint and remembered on the model
(``model.moesaic_hf_layouts``); ``save`` writes the same names and layout back, so export after
load is bitwise the input. A model converted from memory is saved in the Hub layout, as
``save_pretrained`` writes it.

Under expert parallelism (``ep_size > 1``, torch.distributed initialised) each rank builds only its
experts and reads only their tensors (its rows of a stacked tensor); ``save`` has each first
replica of an expert-parallel group write its own shard (rank 0 adds the dense tensors and the
index), and stacked tensors are gathered to rank 0.

Shape legend: E = experts, L = local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._checks import check_int
from ..parallel.dtensor import full_parameters
from ..parallel.groups import default_registry
from .block import HFMoEBlock, install_token_mask
from .families import BlockLayout, Family, family_of
from .files import FolderSource, StateDictSource, TensorSource, open_folder, warn_custom_code, write_folder

# moesaic.MoE options a user may set on a converted model: they change how it trains, not what the
# checkpoint's model computes in evaluation (the family's routing options are fixed by its config)
TRAINING_OPTIONS = ("stacked_experts", "drop_tokens", "capacity_factor", "eval_capacity_factor", "min_capacity",
                    "drop_policy", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate")


def require_transformers():
    """``transformers``, or an ImportError saying how to install it (it is an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise ImportError("moesaic.hf needs Hugging Face transformers (an optional extra): "
                          "pip install 'moesaic[hf]'") from None
    return transformers


# --- the plan ---------------------------------------------------------------------------------------

@dataclass
class BlockPlan:
    """One sparse block: where it is, its moesaic layer, and where its tensors live in the checkpoint."""

    path: str  # module path, e.g. "model.layers.3.mlp" (also the layer's name)
    layer: HFMoEBlock
    layout: BlockLayout
    prefix: str  # the block's checkpoint prefix, e.g. "model.layers.3.block_sparse_moe"

    def dense_keys(self) -> Dict[str, str]:
        """checkpoint key -> the layer's state-dict name."""
        return {f"{self.prefix}.{k}": v for k, v in self.layout.dense.items()}

    def expert_keys(self, numbers) -> Dict[str, Tuple[int, str]]:
        """checkpoint key -> (expert, name inside it) for one-tensor-per-expert layouts."""
        return {f"{self.prefix}.{t.template.format(n=n)}": (n, t.name) for n in numbers for t in self.layout.per_expert}

    def fused_keys(self) -> Dict[str, object]:
        return {f"{self.prefix}.{f.key}": f for f in self.layout.fused}

    def all_keys(self) -> List[str]:
        E = self.layer.num_experts
        return [*self.dense_keys(), *self.expert_keys(range(E)), *self.fused_keys()]


def _block_prefix(path: str, layout: BlockLayout) -> str:
    parent = path.rpartition(".")[0]
    return f"{parent}.{layout.prefix}" if parent else layout.prefix


def hf_tensors(model: nn.Module, skip: Tuple[str, ...] = ()) -> Dict[str, Tensor]:
    """What ``save_pretrained`` writes of ``model``: parameters (tied ones once) and persistent buffers,
    leaving out the modules under the paths in ``skip``."""
    out: Dict[str, Tensor] = {}
    prefixes = tuple(p + "." for p in skip)
    for name, p in model.named_parameters():
        if not name.startswith(prefixes):
            out[name] = p
    for mod_name, module in model.named_modules():
        for b_name, b in module._buffers.items():
            if b is None or b_name in module._non_persistent_buffers_set:
                continue
            full = f"{mod_name}.{b_name}" if mod_name else b_name
            if not full.startswith(prefixes):
                out[full] = b
    return out


def check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(TRAINING_OPTIONS))
    if unknown:
        raise TypeError(f"moesaic.hf got unknown option(s) {unknown}; the options are moesaic.MoE's training "
                        f"options {list(TRAINING_OPTIONS)} (the routing options come from the model's config)")
    return options


def build_layer(family: Family, config, path: str, ep_size: int, options: dict, dtype, device) -> HFMoEBlock:
    """The moesaic layer computing what ``family``'s block at ``path`` computes."""
    kw = family.options(config)
    kw.update({"stacked_experts": True, **options})  # transformers' own layout, and moesaic's fastest on the CPU
    layer = HFMoEBlock(config.hidden_size, ep_size=ep_size, expert_group_name=path,
                       returns_router_scores=family.returns_router_scores,
                       jitter_noise=getattr(config, family.jitter_attr, 0.0) if family.jitter_attr else 0.0,
                       logits_fp32=family.logits_fp32, **kw)
    return layer.to(device=device, dtype=dtype)


def _find_blocks(model: nn.Module, family: Family) -> List[Tuple[str, nn.Module]]:
    blocks = [(path, m) for path, m in model.named_modules() if type(m).__name__ in family.block_classes]
    if not blocks:
        raise ValueError(f"the {type(model).__name__} has no {' / '.join(family.block_classes)} block to convert "
                         f"(model_type {family.model_type!r}); is it already converted?")
    return blocks


def _num_experts(family: Family, config) -> Tuple[str, int]:
    return family.experts_key, getattr(config, family.experts_key)


def _choose_layout(source: TensorSource, keys: set, path: str, candidates: List[Tuple[BlockLayout, str]], E: int,
                   preferred: str) -> Tuple[BlockLayout, str]:
    """The layout whose keys the checkpoint holds (else the most complete one's missing keys are the error)."""
    scored = []
    for layout, prefix in candidates:
        plan_keys = BlockPlan(path, _Sized(E), layout, prefix).all_keys()
        present = sum(k in keys for k in plan_keys)
        scored.append((present == len(plan_keys), layout.name == preferred, present, layout, prefix, plan_keys))
    scored.sort(key=lambda s: s[:3], reverse=True)
    complete, _, _, layout, prefix, plan_keys = scored[0]
    if not complete:
        missing = [k for k in plan_keys if k not in keys]
        where = sorted({source.where(k) for k in keys}) if keys else ["(no tensors)"]
        raise ValueError(f"config/weights mismatch: the checkpoint lacks tensor {missing[0]!r} of the MoE block "
                         f"{path!r} ({len(missing)} of its {len(plan_keys)} tensors missing in the "
                         f"{layout.name!r} layout, e.g. {missing[:3]}; read from {where[:2]})")
    return layout, prefix


@dataclass
class _Sized:
    num_experts: int


def _plan_blocks(model, family: Family, config, source: TensorSource, ep_size: int, options: dict, dtype,
                 preferred: str) -> List[BlockPlan]:
    keys = set(source.keys())
    E = _num_experts(family, config)[1]
    plans = []
    for path, block in _find_blocks(model, family):
        candidates = [(layout, _block_prefix(path, layout)) for layout in family.layouts(config)]
        layout, prefix = _choose_layout(source, keys, path, candidates, E, preferred)
        device = next(block.parameters()).device
        layer = build_layer(family, config, path, ep_size, options, dtype,
                            torch.device("cpu") if device.type == "meta" else device)
        plans.append(BlockPlan(path, layer, layout, prefix))
    return plans


def _check_plan(plans: List[BlockPlan], dense: Dict[str, Tensor], source: TensorSource) -> None:
    """Every checkpoint tensor read exactly once, every model tensor filled, every shape right."""
    keys = set(source.keys())
    claimed: Dict[str, str] = {}

    def claim(key: str, by: str) -> None:
        if key in claimed:
            raise ValueError(f"checkpoint tensor {key!r} would fill both {claimed[key]} and {by}")
        claimed[key] = by

    def want(key: str, shape, dtype: torch.dtype, what: str) -> None:
        if key not in keys:
            raise ValueError(f"config/weights mismatch: the checkpoint has no tensor {key!r} for {what} "
                             f"(expected shape {tuple(shape)})")
        if tuple(source.shape(key)) != tuple(shape):
            raise ValueError(f"config/weights mismatch: tensor {key!r} in {source.where(key)} has shape "
                             f"{tuple(source.shape(key))}, the model's {what} needs {tuple(shape)}")
        _check_dtype(source, key, dtype, what)

    for name, t in dense.items():
        want(name, t.shape, t.dtype, f"parameter {name!r}")
        claim(name, f"parameter {name!r}")
    for plan in plans:
        layer = plan.layer
        own = layer.state_dict()
        for key, target in plan.dense_keys().items():
            want(key, own[target].shape, own[target].dtype, f"{plan.path}.{target}")
            claim(key, f"{plan.path}.{target}")
        one = layer.experts.expert_state_dict(layer.experts.local_numbers[0])
        for key, (n, name) in plan.expert_keys(range(layer.num_experts)).items():
            want(key, one[name].shape, one[name].dtype, f"expert {n} {name} of {plan.path}")
            claim(key, f"expert {n} of {plan.path}")
        for key, fused in plan.fused_keys().items():
            shape = (layer.num_experts, *_fused_shape(fused, one))
            want(key, shape, next(iter(one.values())).dtype,
                 f"the stacked {fused.key} of {plan.path}'s {layer.num_experts} experts")
            claim(key, f"the experts of {plan.path}")
    unused = sorted(keys - set(claimed))
    if unused:
        raise ValueError(f"checkpoint tensor {unused[0]!r} in {source.where(unused[0])} is not used by the model "
                         f"({len(unused)} unused: {unused[:5]}); a config/weights mismatch or an architecture "
                         "variant moesaic.hf does not map")


def _check_dtype(source: TensorSource, key: str, dtype: torch.dtype, what: str) -> None:
    """A floating model tensor takes a floating checkpoint tensor (any width: the copy casts);
    any other takes exactly its own dtype. An int32 or bool "weight" is never cast silently."""
    got = source.dtype(key)
    if (got.is_floating_point if dtype.is_floating_point else got == dtype):
        return
    need = "a floating-point tensor" if dtype.is_floating_point else f"dtype {dtype}"
    raise ValueError(f"tensor {key!r} in {source.where(key)} has dtype {got}, the model's {what} needs {need} "
                     f"(the model is {dtype}); refusing to cast it (a corrupt, quantized or mislabelled checkpoint?)")


def _fill(plan: BlockPlan, source: TensorSource) -> None:
    layer = plan.layer
    own = layer.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, target in plan.dense_keys().items():
            own[target].copy_(source.get(key))
        if plan.layout.per_expert:
            for n in layer.experts.local_numbers:
                tensors = {name: source.get(key) for key, (m, name) in plan.expert_keys([n]).items()}
                layer.experts.load_expert_state_dict(n, tensors)
        first, L = layer.experts.first_expert_number, layer.num_local_experts
        fused = {key: source.get(key, rows=(first, first + L)) for key in plan.fused_keys()}
        for i, n in enumerate(layer.experts.local_numbers):
            tensors = {}
            for key, f in plan.fused_keys().items():
                for name, get in f.pieces:
                    tensors[name] = get(fused[key][i])
            if tensors:
                layer.experts.load_expert_state_dict(n, tensors)


def _swap(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, layer)


# --- load -------------------------------------------------------------------------------------------

def load(path_or_model, *, ep_size: int = 1, dtype: Optional[torch.dtype] = None, **options):
    """A ``transformers`` MoE model whose sparse blocks are moesaic layers holding the same weights.

    Args:
        path_or_model: a local Hugging Face model folder (``config.json`` + ``*.safetensors``) or a
            ``transformers`` ``PreTrainedModel`` of a supported family (converted in place).
        ep_size: expert-parallel size; > 1 needs torch.distributed initialised, and each rank then
            holds (and reads from the files) only its experts.
        dtype: the model's dtype (a folder only; default: the config's ``dtype``, else float32).
        **options: moesaic.MoE training options (:data:`TRAINING_OPTIONS`), e.g.
            ``stacked_experts`` (default True: every expert's tensors as slices of stacked
            tensors, per-expert identity kept; False: one module per expert), ``z_loss_coef``, ``bias_update_rate`` (DeepSeek-V3; default 0:
            the checkpoint's correction bias stays fixed).

    Returns:
        The ``transformers`` model; each block at module path ``P`` is an :class:`HFMoEBlock` named
        ``P`` (its experts tagged with their global numbers). Attention, norms, embeddings and the
        head stay ``transformers``', so ``generate()`` works.
    """
    transformers = require_transformers()
    check_int(ep_size, "ep_size", 1)
    check_options(options)
    if isinstance(path_or_model, nn.Module):
        if not isinstance(path_or_model, transformers.PreTrainedModel):
            raise TypeError(f"path_or_model must be a folder path or a transformers PreTrainedModel, got "
                            f"{type(path_or_model).__name__}")
        if dtype is not None:
            raise ValueError("dtype applies to a folder; cast a built model yourself (model.to(dtype))")
        model = path_or_model
        family = family_of(model.config)
        _check_ep(family, model.config, ep_size)
        blocks = [p for p, _ in _find_blocks(model, family)]
        source = StateDictSource(hf_tensors(model), f"the {type(model).__name__}'s state dict")
        dense = hf_tensors(model, skip=tuple(blocks))
        dtype = next(model.parameters()).dtype
        preferred, saved_layout = "fused", "hub"
    else:
        folder, raw = open_folder(path_or_model)
        family_of(raw, str(folder / "config.json"))  # before transformers reads it (and might ask to run code)
        warn_custom_code(raw, folder / "config.json")
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        family = family_of(config)
        _check_ep(family, config, ep_size)
        source = FolderSource(folder)
        dtype = _resolve_dtype(dtype, config)
        model = _skeleton(transformers, config, dtype)
        blocks = [p for p, _ in _find_blocks(model, family)]
        dense = hf_tensors(model, skip=tuple(blocks))
        preferred, saved_layout = "hub", None
    if ep_size > 1:
        default_registry().get(ep_size)  # fails early (collectively) without torch.distributed
    plans = _plan_blocks(model, family, model.config, source, ep_size, options, dtype, preferred)
    for plan in plans:
        if ep_size > 1:
            plan.layer.set_expert_parallel_groups()  # global expert numbers of this rank
    _check_plan(plans, dense, source)
    if isinstance(source, FolderSource):
        # our own skeleton: 1. swap the blocks in  2. give the rest storage  3. read the dense tensors, then the layers'
        for plan in plans:
            _swap(model, plan.path, plan.layer)
        _materialize(model)
        with torch.no_grad():
            for name, t in hf_tensors(model, skip=tuple(blocks)).items():
                t.copy_(source.get(name))
        for plan in plans:
            _fill(plan, source)
    else:
        # a built model holds its dense tensors already; it changes only once every layer is filled
        for plan in plans:
            _fill(plan, source)
        for plan in plans:
            _swap(model, plan.path, plan.layer)
    model.moesaic_hf_layouts = {p.path: (saved_layout or p.layout.name) for p in plans}
    install_token_mask(model)  # pads (attention_mask / token_mask) never reach an expert
    model.moesaic_hf_dtypes = _changed_dtypes(plans, source)
    return model


def _changed_dtypes(plans: List[BlockPlan], source: TensorSource) -> Dict[str, torch.dtype]:
    """Checkpoint keys a layer holds in another dtype (DeepSeek-V3's bias stays fp32 in a bf16 model):
    ``save`` writes them back in the checkpoint's."""
    out = {}
    for plan in plans:
        own = plan.layer.state_dict()
        for key, target in plan.dense_keys().items():
            if source.dtype(key) != own[target].dtype:
                out[key] = source.dtype(key)
    return out


def _skeleton(transformers, config, dtype) -> nn.Module:
    """``transformers``' model for ``config`` with no storage (meta tensors) where that can be undone exactly.

    Every parameter and persistent buffer is read from the checkpoint afterwards, so nothing needs
    storage now: the sparse blocks are replaced before anything is allocated, and a rank holds
    only its experts at any time. Non-persistent buffers cannot be read, they are recomputed by
    ``transformers``' own initialisation; a model with any other than rotary-embedding ones is
    built on the CPU instead.
    """
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    if any(m._non_persistent_buffers_set and not _is_rotary(m) for m in model.modules()):
        with no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # no_init_weights skips the tying post_init does
    return model


def _is_rotary(module: nn.Module) -> bool:
    return "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq")


def _materialize(model: nn.Module) -> None:
    """CPU storage for every meta tensor left (tied parameters stay tied); rotary buffers recomputed."""
    new: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]
        recompute = False
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device="cpu")
                recompute = recompute or name in module._non_persistent_buffers_set
        if recompute:
            with torch.no_grad():
                model._init_weights(module)  # transformers recomputes a rotary embedding's inv_freq here


def _resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    return dtype


def _check_ep(family: Family, config, ep_size: int) -> None:
    key, E = _num_experts(family, config)
    if E % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} does not divide the model's expert count (config.{key}={E}); "
                         f"pick an ep_size that divides {E}")


# --- save -------------------------------------------------------------------------------------------

def converted_layers(model: nn.Module) -> Dict[str, HFMoEBlock]:
    """``{module path: layer}`` of the moesaic blocks of a model converted by :func:`load`."""
    return {path: m for path, m in model.named_modules() if isinstance(m, HFMoEBlock)}


def save(model: nn.Module, out_dir) -> None:
    """Write ``model`` (converted by :func:`load` or :func:`~moesaic.hf.upcycle`) as a Hugging Face folder.

    ``config.json`` (and ``generation_config.json``) and safetensors with the checkpoint's original
    tensor names and layout: ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it
    with no missing or unexpected key. Under expert parallelism call it on every rank (see module
    docstring for who writes what).
    """
    require_transformers()
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model converted by moesaic.hf.load, got {type(model).__name__}")
    if not isinstance(out_dir, (str, Path)):
        raise TypeError(f"out_dir must be a folder path, got {type(out_dir).__name__}")
    with full_parameters(model):  # a model sharded by FSDP2 (ZeRO stage 3, moesaic.shard_model) is written whole
        _save(model, Path(out_dir))


def _save(model: nn.Module, out: Path) -> None:
    layers = converted_layers(model)
    if not layers:
        raise ValueError(f"the {type(model).__name__} has no moesaic MoE layer: convert it with moesaic.hf.load first "
                         "(or save it with save_pretrained)")
    family = family_of(model.config)
    layouts = getattr(model, "moesaic_hf_layouts", {})
    hub, fused = family.layouts(model.config)
    by_name = {"hub": hub, "fused": fused}
    plans = [BlockPlan(path, layer, by_name[layouts.get(path, "hub")],
                       _block_prefix(path, by_name[layouts.get(path, "hub")])) for path, layer in layers.items()]
    ep_sizes = {layer.ep_size for layer in layers.values()}
    if len(ep_sizes) != 1:
        raise ValueError(f"the model's MoE layers have different ep_size values {sorted(ep_sizes)}; save needs one")
    P = ep_sizes.pop()
    distributed = P > 1
    # data-parallel replicas (ep_size 1 under torch.distributed) hold the same tensors: rank 0 writes them
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    groups = next(iter(layers.values())).parallel_groups if distributed else None
    if distributed and groups is None:
        raise RuntimeError("the model's MoE layers have ep_size > 1 but no process groups; call "
                           "moesaic.setup_expert_parallel(model) (moesaic.hf.load does) first")
    first_replica = not distributed or groups.edp_ranks[0] == rank
    ep_rank = groups.ep_rank if distributed else 0

    # 1. this rank's tensors: dense ones on rank 0, each expert on the first replica holding it
    tensors: Dict[str, Tensor] = {}
    owner: Dict[str, int] = {}
    if rank == 0:
        dense = hf_tensors(model, skip=tuple(layers))
        tensors.update(dense)
    for plan in plans:
        layer = plan.layer
        own = layer.state_dict()
        for key, target in plan.dense_keys().items():
            owner[key] = 0
            if rank == 0:
                tensors[key] = own[target]
        L = layer.num_local_experts
        for key, (n, name) in plan.expert_keys(range(layer.num_experts)).items():
            owner[key] = n // L
            if first_replica and n // L == ep_rank:
                tensors[key] = layer.experts.expert_state_dict(n)[name]
        # 2. stacked tensors: gathered over the expert-parallel group, written by rank 0
        for key, f in plan.fused_keys().items():
            owner[key] = 0
            local = _join_fused(layer, f)
            if distributed:
                parts = [torch.empty_like(local) for _ in range(P)]
                dist.all_gather(parts, local.contiguous(), group=groups.ep_group)
                local = torch.cat(parts)
            if rank == 0:
                tensors[key] = local
    # 3. files: one, or one shard per expert-parallel rank and an index
    if rank == 0:
        model.config.save_pretrained(str(out))
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(str(out))
    dtypes = getattr(model, "moesaic_hf_dtypes", {})
    tensors = {k: (v.to(dtypes[k]) if k in dtypes else v) for k, v in tensors.items()}
    if not distributed:
        if rank == 0:
            write_folder(out, tensors)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return
    if first_replica:
        all_keys = None
        if rank == 0:
            all_keys = {k: 0 for k in hf_tensors(model, skip=tuple(layers))}
            all_keys.update(owner)
        write_folder(out, tensors, shard=(ep_rank, P), all_keys=all_keys)
    dist.barrier()


def _join_fused(layer: HFMoEBlock, f) -> Tensor:
    """The local experts' rows of one stacked checkpoint tensor, `(L, ...)`."""
    numbers = layer.experts.local_numbers
    first = layer.experts.expert_state_dict(numbers[0])
    shape = _fused_shape(f, first)
    out = torch.empty((len(numbers), *shape), dtype=next(iter(first.values())).dtype)
    for i, n in enumerate(numbers):
        mine = layer.experts.expert_state_dict(n)
        for name, get in f.pieces:
            get(out[i]).copy_(mine[name])
    return out


def _fused_shape(f, expert: Dict[str, Tensor]) -> Tuple[int, ...]:
    return tuple(f.slice_shape({name: tuple(t.shape) for name, t in expert.items()}))


__all__ = ["load", "save", "converted_layers", "hf_tensors", "TRAINING_OPTIONS", "require_transformers",
           "build_layer"]
