"""``upcycle``: a dense Llama/Mistral/Qwen2/Qwen3 model becomes an MoE whose experts start as its MLP.

Sparse upcycling, Komatsuzaki et al. 2022.

The dense model's architecture has an MoE sibling in ``transformers`` with the same attention,
norms and embeddings and the same tensor names outside the MLP: Llama and Mistral -> Mixtral,
Qwen2 -> Qwen2-MoE (its shared expert given width 0, so it adds exactly 0), Qwen3 -> Qwen3-MoE.
``upcycle`` builds that sibling from the dense config, copies every non-MLP tensor by name (each
one checked: same names, same shapes, nothing left over), converts its blocks to moesaic layers
(:func:`moesaic.hf.load`) and fills every expert with a copy of its layer's dense MLP. The router
starts random (``N(0, router_init_std)``) and the top-k weights are renormalised to sum to 1, so
every token's MoE output is its dense MLP output: the logits equal the dense model's up to fp32
round-off at initialisation, and the copies drift apart as training breaks the symmetry. The
result is an ordinary converted model: it trains with the engine and ``moesaic.hf.save`` writes
a folder of the MoE architecture.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import check_int, check_number
from .convert import check_options, hf_tensors, load, require_transformers
from .families import DENSE_FAMILIES, FAMILIES
from .files import FolderSource, open_folder, warn_custom_code

# dense model_type -> its MoE sibling in transformers
_SIBLING = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def _moe_config(dense_config, num_experts: int, top_k: int, router_aux_loss_coef: float):
    transformers = require_transformers()
    sibling = _SIBLING[dense_config.model_type]
    d = dense_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        d.pop(key, None)
    if dense_config.model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config.{flag}=True: Mixtral, the MoE sibling of Llama, has no such biases; "
                                 f"only Llama models with {flag}=False upcycle")
    F = dense_config.intermediate_size
    common = dict(num_experts_per_tok=top_k, router_aux_loss_coef=router_aux_loss_coef, output_router_logits=False)
    if sibling == "mixtral":
        d.update(common, num_local_experts=num_experts, intermediate_size=F)
        cls = transformers.MixtralConfig
    elif sibling == "qwen2_moe":
        d.update(common, num_experts=num_experts, moe_intermediate_size=F, shared_expert_intermediate_size=0,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                 qkv_bias=True)  # Qwen2's q/k/v projections always carry biases
        cls = transformers.Qwen2MoeConfig
    else:
        d.update(common, num_experts=num_experts, moe_intermediate_size=F, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[])
        cls = transformers.Qwen3MoeConfig
    return cls(**d)


def upcycle(path_or_model, num_experts: int, top_k: int, *, router_init_std: Optional[float] = None,
            router_aux_loss_coef: float = 0.01, ep_size: int = 1, **options):
    """An MoE model whose experts are copies of ``path_or_model``'s dense MLPs (see module docstring).

    Args:
        path_or_model: a local folder or a ``transformers`` model of type :data:`DENSE_FAMILIES`
            (left unchanged).
        num_experts: E, experts per layer (>= 2).
        top_k: experts per token, in ``[1, num_experts]``.
        router_init_std: the routers' initial std (default: ``config.initializer_range``).
        router_aux_loss_coef: the new config's balance-loss coefficient (Mixtral's default 0.01 is
            this default; Qwen-MoE uses 0.001).
        ep_size, **options: as :func:`moesaic.hf.load`.

    Returns:
        The MoE sibling's ``transformers`` model with moesaic layers (Mixtral for Llama/Mistral,
        Qwen2-MoE for Qwen2, Qwen3-MoE for Qwen3).
    """
    transformers = require_transformers()
    check_int(num_experts, "num_experts", 2)
    check_int(top_k, "top_k", 1, num_experts, hi_text=f"num_experts={num_experts}")
    router_aux_loss_coef = check_number(router_aux_loss_coef, "router_aux_loss_coef", 0.0)
    router_init_std = check_number(router_init_std, "router_init_std", 0.0, allow_none=True)
    check_options(options)
    if isinstance(path_or_model, nn.Module):
        if not isinstance(path_or_model, transformers.PreTrainedModel):
            raise TypeError(f"path_or_model must be a folder path or a transformers PreTrainedModel, got "
                            f"{type(path_or_model).__name__}")
        dense = path_or_model
    else:
        folder, raw = open_folder(path_or_model)
        _check_dense_type(raw.get("model_type"), folder)
        warn_custom_code(raw, folder / "config.json")
        source = FolderSource(folder)  # the files are checked (truncation, headers) before transformers reads them
        for key in source.keys():  # transformers would cast an integer "weight" silently
            if not source.dtype(key).is_floating_point:
                raise ValueError(f"tensor {key!r} in {source.where(key)} has dtype {source.dtype(key)}; every tensor "
                                 "of a dense model upcycle takes is a floating-point weight (a corrupt, quantized or "
                                 "mislabelled checkpoint?)")
        dense = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
    _check_dense_type(dense.config.model_type, type(dense).__name__)
    if any(type(m).__name__ == "HFMoEBlock" for m in dense.modules()):
        raise ValueError(f"the {type(dense).__name__} already has MoE layers; upcycle takes a dense model")
    if num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide num_experts={num_experts}")

    # 1. the MoE sibling, every non-MLP tensor copied by name (names and shapes must agree one to one)
    config = _moe_config(dense.config, num_experts, top_k, router_aux_loss_coef)
    dtype = next(dense.parameters()).dtype
    from transformers.initialization import no_init_weights

    with no_init_weights():
        moe = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    moe.tie_weights()
    mlps = [p for p, m in dense.named_modules() if p.endswith(".mlp") and hasattr(m, "gate_proj")]
    blocks = [p for p, m in moe.named_modules() if p.endswith(".mlp")]
    if mlps != blocks:
        raise ValueError(f"the dense model's MLPs {mlps[:3]}... do not match the MoE sibling's blocks {blocks[:3]}...")
    src, dst = hf_tensors(dense, skip=tuple(mlps)), hf_tensors(moe, skip=tuple(blocks))
    if set(src) != set(dst):
        extra, missing = sorted(set(src) - set(dst)), sorted(set(dst) - set(src))
        raise ValueError(f"cannot upcycle the {type(dense).__name__}: tensors {extra[:3]} have no place in "
                         f"{type(moe).__name__}, which needs {missing[:3]}")
    with torch.no_grad():
        for name, t in dst.items():
            if t.shape != src[name].shape:
                raise ValueError(f"cannot upcycle: tensor {name!r} is {tuple(src[name].shape)} in the dense model "
                                 f"and {tuple(t.shape)} in {type(moe).__name__}")
            t.copy_(src[name])
        # 2. the blocks: router N(0, std), shared expert (Qwen2-MoE's, width 0) empty, experts filled below
        std = router_init_std if router_init_std is not None else getattr(dense.config, "initializer_range", 0.02)
        for path in blocks:
            block = moe.get_submodule(path)
            for p in block.parameters():
                p.zero_()
            (block.gate.weight.normal_(0.0, std))
    model = load(moe, ep_size=ep_size, **options)
    # 3. every expert a copy of its layer's dense MLP
    with torch.no_grad():
        for path in blocks:
            mlp, layer = dense.get_submodule(path), model.get_submodule(path)
            weights = {f"{p}.weight": getattr(mlp, p).weight.detach() for p in ("gate_proj", "up_proj", "down_proj")}
            for n in layer.experts.local_numbers:
                layer.experts.load_expert_state_dict(n, weights)
    return model


def _check_dense_type(model_type, where) -> None:
    if model_type in FAMILIES:
        raise ValueError(f"{where}: model_type={model_type!r} is already an MoE model; upcycle takes a dense "
                         f"{list(DENSE_FAMILIES)} model (load this one with moesaic.hf.load)")
    if model_type not in _SIBLING:
        raise ValueError(f"{where}: upcycle supports dense model_type {list(_SIBLING)}, got {model_type!r}")
