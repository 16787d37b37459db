"""How much memory ``moesaic train --hf`` needs, estimated from the model folder before anything is loaded.

The same refusal as ``moesaic train``'s (:mod:`.memory`): a micro-batch whose step cannot fit in
the machine's memory is refused up front, naming the key and both figures, instead of a process
that grows until the machine kills it. The estimate, per process:

* parameters: the sizes in the folder's safetensors headers (nothing is read but the headers),
  expert tensors (names holding ``.experts.``) divided by ``model.ep_size``; gradients of the same
  size; with bf16/fp16 the fp32 master copies; AdamW/Adam two fp32 moments per parameter;
* activations saved for backward by one micro-batch, per token and decoder layer, in elements:
  ``8 D + 4 KV hd`` for attention (norm outputs, q/k/v, rotary outputs, attention output,
  residuals), ``2 E`` for the router, ``k (2 F + D)`` for the routed experts (the gate and up
  projections' outputs and the expert output the combine keeps), ``3 Fs`` for shared experts;
  plus ``3 V`` per token for the language-model head (the logits, their fp32 copy in the loss,
  the log-softmax). D = hidden size, KV x hd = key/value width, E = experts, k = experts per token,
  F = expert hidden size, Fs = shared experts' hidden size, V = vocabulary.

Measured against what one forward adds to a fresh process (large buffers mmapped, so RSS follows
the tensors): 0.99x (per-module experts) and 0.93x (stacked) on the OLMoE-shaped model of
``benchmarks/bench_hf.py`` (8 layers, 64 experts, k=8, D=256, 4 x 256 tokens, fp32); 0.89x / 0.92x
on a 3-layer, 16-expert one, which ``tests/integration/test_train_hf_cli.py`` holds within 25%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from moesaic.hf.files import FolderSource, open_folder

from . import memory
from .config import TrainConfig

_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_F_KEYS = ("moe_intermediate_size", "intermediate_size")


def _first(raw: dict, keys, default=None):
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return default


def activation_elements_per_token(raw_config: dict, recompute: str = "none") -> int:
    """Elements one token saves for backward across the whole model (see module docstring).

    ``recompute`` (``train.recompute``): "block" keeps each layer's input (D) plus one layer's
    activations; "moe" keeps each MoE's input instead of its activations, plus one MoE's; "experts"
    drops the experts' ``k 2 F`` but for one layer.
    """
    D = int(raw_config["hidden_size"])
    L = int(raw_config["num_hidden_layers"])
    V = int(raw_config["vocab_size"])
    H = int(_first(raw_config, ("num_attention_heads",), 1))
    KV = int(_first(raw_config, ("num_key_value_heads",), H))
    hd = int(_first(raw_config, ("head_dim",), D // max(H, 1)))
    E = int(_first(raw_config, _EXPERTS_KEYS, 1))
    k = int(_first(raw_config, ("num_experts_per_tok", "experts_per_token"), 1))
    F = int(_first(raw_config, _F_KEYS, 4 * D))
    shared = int(raw_config.get("shared_expert_intermediate_size") or 0)
    shared += int(raw_config.get("n_shared_experts") or 0) * int(raw_config.get("moe_intermediate_size") or 0)
    attention = 8 * D + 4 * KV * hd
    moe = 2 * E + k * (2 * F + D) + 3 * shared
    if recompute == "block":
        return L * D + attention + moe + 3 * V
    if recompute == "moe":
        return L * (attention + D) + moe + 3 * V
    if recompute == "experts":
        return L * (attention + moe - k * 2 * F) + k * 2 * F + 3 * V
    return L * (attention + moe) + 3 * V


def estimate(folder, cfg: TrainConfig) -> memory.MemoryEstimate:
    """One process's training memory for fine-tuning the model in ``folder`` with ``cfg``."""
    folder, raw = open_folder(folder)
    source = FolderSource(folder)
    e = cfg.engine
    ep_size = cfg.model.ep_size
    dense = experts = 0
    for key in source.keys():
        numel = 1
        for n in source.shape(key):
            numel *= n
        if ".experts." in key:
            experts += numel
        else:
            dense += numel
    params = dense + experts // ep_size
    dtype_bytes = 2 if (e.bf16.enabled or e.fp16.enabled) else 4
    optimizer = (e.optimizer.type if e.optimizer is not None else "AdamW").lower()
    momentum = bool((dict(e.optimizer.params) if e.optimizer is not None else {}).get("momentum", 0.0))
    moments = 2 if optimizer in ("adamw", "adam") else (1 if momentum else 0)
    tokens = cfg.batch()[1] * cfg.model.block_size
    activations = activation_elements_per_token(raw, cfg.train.recompute) * tokens * dtype_bytes
    return memory.MemoryEstimate(params=params * dtype_bytes, grads=params * dtype_bytes,
                                 master=params * 4 if dtype_bytes < 4 else 0, optimizer=moments * 4 * params,
                                 activations=activations)


def check_hf_memory(folder, cfg: TrainConfig, device: torch.device, processes_here: int) -> Optional[str]:
    """Refuse a micro-batch that cannot fit (ValueError naming the key); a warning text when it may not fit now."""
    need = estimate(Path(folder), cfg)
    return memory.check_fits(need, processes_here if device.type == "cpu" else 1, device,
                             key="engine.train_micro_batch_size_per_gpu")


__all__ = ["activation_elements_per_token", "check_hf_memory", "estimate"]
