"""How much memory a training run needs, estimated before anything is allocated, and what the machine has.

A typo such as ``--set engine.train_micro_batch_size_per_gpu=100000000`` used to grow a process at
~90 MB/s with no output until the machine gave up. :func:`check_run` compares an estimate of one
process's training memory times the processes sharing the device with what the device has, and
refuses a run that cannot fit on it (more than its total memory) with both figures in the message.

One estimate (:func:`training_memory`) for every kind of run, from per-model parts
(:class:`ModelParts`: the parameters each process holds, dense and expert, and the activation
elements one micro-batch saves for backward):

* parameters and their gradients, in the model dtype; with bf16/fp16 also the fp32 master copies;
* optimizer state: AdamW/Adam two fp32 moments per parameter, SGD with momentum one (ZeRO stage >= 1
  shards the dense part over the replicas);
* activations, from the model's part:

  - the byte-level GPT (:func:`gpt_parts`), counted layer by layer from its config. Measured
    against the memory a forward of the GPT adds to a fresh process (``tests/unit/
    test_train_memory.py``), the count is within about 15% for dense, MoE, dropless and wider shapes;
  - a Hugging Face model folder (:func:`hf_parts`): parameter counts from its safetensors headers
    (nothing is read but the headers; tensors named ``.experts.`` are divided by ``model.ep_size``),
    activations per token and decoder layer (:func:`hf_activation_elements_per_token`), in elements:
    ``8 D + 4 KV hd`` for attention (norm outputs, q/k/v, rotary outputs, attention output,
    residuals), ``2 E`` for the router, ``k (2 F + D)`` for the routed experts (the gate and up
    projections' outputs and the expert output the combine keeps), ``3 Fs`` for shared experts; plus
    ``3 V`` per token for the language-model head (the logits, their fp32 copy in the loss, the
    log-softmax). D = hidden size, KV x hd = key/value width, E = experts, k = experts per token,
    F = expert hidden size, Fs = shared experts' hidden size, V = vocabulary. Measured against what
    one forward adds to a fresh process: 0.99x (per-module experts) and 0.93x (stacked) on the
    OLMoE-shaped model of ``benchmarks/bench_hf.py`` (8 layers, 64 experts, k=8, D=256, 4 x 256
    tokens, fp32); 0.89x / 0.92x on a 3-layer, 16-expert one, which
    ``tests/integration/test_train_hf_cli.py`` holds within 25%.

  Both follow the run's recompute policy (``train.recompute``, resolved: ``"auto"`` is never seen here).

Only a run whose estimate exceeds the device's total memory is refused (it cannot fit however idle the
machine is); one that exceeds what is free right now gets a warning. When the parameters, gradients
and optimizer state alone exceed it, the refusal says that (and by how much) instead of naming the
micro-batch, which no value of could make the run fit. The Python runtime, allocator
slack and the data buffer come on top of the estimate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..layer.recompute_policy import POLICIES
from ..models.gpt import GPTConfig

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process needs, by kind."""

    params: int
    grads: int
    master: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.optimizer + self.activations

    @property
    def model_state(self) -> int:
        """What the model takes whatever the micro-batch: parameters, gradients, master copies, optimizer state."""
        return self.params + self.grads + self.master + self.optimizer

    def describe(self) -> str:
        parts = [("activations", self.activations), ("parameters", self.params + self.grads + self.master),
                 ("optimizer state", self.optimizer)]
        return f"{_gib(self.total)} (" + ", ".join(f"{name} {_gib(n)}" for name, n in parts) + ")"


def _gib(n: float) -> str:
    if n >= 1000 * GIB:
        return f"{n / GIB:.0f} GiB"  # not 1.73e+03
    return f"{n / GIB:.3g} GiB" if n >= 0.1 * GIB else f"{n / (1 << 20):.3g} MiB"


def _check_policy(recompute: str) -> None:
    if recompute not in POLICIES:
        raise ValueError(f"recompute must be one of {list(POLICIES)} (a resolved train.recompute), got {recompute!r}")


def param_counts(model: GPTConfig) -> Tuple[int, int]:
    """``(dense, per-expert)`` parameter counts of the GPT (tied embedding once)."""
    D, F, V = model.n_embd, model.ffn_mult * model.n_embd, model.vocab_size
    mlp = D * F + F + F * D + D
    attn = D * 3 * D + 3 * D + D * D + D
    norms = 2 * 2 * D
    n_moe = sum(model.is_moe_block(i) for i in range(model.n_layer))
    dense = V * D + model.block_size * D + 2 * D  # wte (= lm_head), wpe, ln_f
    dense += model.n_layer * (attn + norms) + (model.n_layer - n_moe) * mlp
    dense += n_moe * (D * model.num_experts + (mlp + D * 2 + 2 if model.use_residual else 0))  # gates (+ residual)
    return dense, mlp


def activation_elements(model: GPTConfig, micro_batch: int, recompute: str = "none") -> Tuple[int, int]:
    """``(model-dtype elements, fp32 elements)`` autograd saves for one micro-batch of ``block_size`` tokens.

    ``recompute`` (``train.recompute``): under "block" each block keeps only its input, plus one
    block's activations while it is recomputed; under "moe" each MoE layer keeps only its input
    plus one layer's activations; under "experts" each MoE layer drops its experts' hidden
    activations (``2 F`` per route) but for one layer being recomputed.
    """
    _check_policy(recompute)
    T = micro_batch * model.block_size
    D, F, V, H = model.n_embd, model.ffn_mult * model.n_embd, model.vocab_size, model.n_head
    # 1. per block: layer-norm inputs (2 x D), qkv (3 D), attention output (D), proj input (D), residual sums;
    #    the attention kernel keeps its log-sum-exp (H per token)
    per_block = T * (2 * D + 3 * D + D + D + D) + T * H
    dense_mlp = T * (D + 2 * F)  # fc input, fc output, GELU output
    # 2. an MoE feed-forward: each token's k routes (at most capacity_factor times an even share per
    #    expert, at least every token's k routes when dropless) pass through fc, GELU and proj
    routes = model.top_k * T * (1.0 if not model.drop_tokens else min(1.0, model.capacity_factor))
    moe = int(routes * (D + 2 * F + D)) + T * D  # gathered input, fc out, GELU out, expert output; combine
    n_moe = sum(model.is_moe_block(i) for i in range(model.n_layer))
    hidden = int(routes * 2 * F)  # the experts' hidden activations (fc out, GELU out) of one MoE layer
    probs = T * model.num_experts  # one MoE layer's fp32 gate probabilities
    if recompute == "block":  # block inputs kept; one block's activations live while it is recomputed
        lowp = model.n_layer * T * D + per_block + (moe if n_moe else dense_mlp) + T * 2 * D
        fp32 = T * V + (probs if n_moe else 0)
    elif recompute == "moe":  # MoE layers keep their input; one is recomputed at a time
        lowp = model.n_layer * per_block + (model.n_layer - n_moe) * dense_mlp + n_moe * T * D + \
            (moe if n_moe else 0) + T * 2 * D
        fp32 = T * V + (probs if n_moe else 0)
    else:
        if recompute == "experts":  # one layer's hidden activations at a time
            moe -= hidden
        lowp = model.n_layer * per_block + (model.n_layer - n_moe) * dense_mlp + n_moe * moe + T * 2 * D  # + ln_f
        lowp += hidden if recompute == "experts" and n_moe else 0
        fp32 = n_moe * probs + T * V  # gate probabilities (fp32 router); log-softmax
    # 3. the LM head: logits, and the fp32 log-softmax the loss keeps
    lowp += T * V
    return lowp, fp32


@dataclass(frozen=True)
class ModelParts:
    """The per-model part of a run's memory estimate (what differs between the GPT and a Hugging Face model).

    Attributes:
        dense: parameters every process holds whole.
        experts: parameters of this process's experts (``num_experts / ep_size`` of each MoE layer).
        activations: model-dtype elements one micro-batch saves for backward.
        fp32_activations: fp32 elements it saves (router probabilities, the loss's log-softmax).
    """

    dense: int
    experts: int
    activations: int
    fp32_activations: int = 0


def training_memory(parts: ModelParts, *, dtype_bytes: int = 4, optimizer: str = "AdamW", momentum: bool = False,
                    zero_stage: int = 0, replicas: int = 1) -> MemoryEstimate:
    """One process's training memory from a model's parts (see the module docstring).

    Args:
        parts: the model's parameters and one micro-batch's activations.
        dtype_bytes: 4 (fp32), or 2 (bf16/fp16: fp32 master copies are added).
        optimizer: the optimizer type (AdamW/Adam: two moments; SGD: one with momentum, else none).
        momentum: SGD's momentum is not zero.
        zero_stage: ZeRO stage; >= 1 shards the dense optimizer state over ``replicas``.
        replicas: processes holding a copy of the dense parameters (the world size).
    """
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 or 4, got {dtype_bytes!r}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas!r}")
    params = parts.dense + parts.experts
    moments = 2 if optimizer.lower() in ("adamw", "adam") else (1 if momentum else 0)
    sharded = parts.dense * (1 - 1 / replicas) if zero_stage >= 1 else 0
    return MemoryEstimate(params=params * dtype_bytes, grads=params * dtype_bytes,
                          master=params * 4 if dtype_bytes < 4 else 0,
                          optimizer=int(moments * 4 * (params - sharded)),
                          activations=parts.activations * dtype_bytes + parts.fp32_activations * 4)


def engine_settings(cfg) -> dict:
    """The keyword arguments of :func:`training_memory` a ``TrainConfig`` sets (dtype, optimizer, ZeRO, replicas)."""
    e = cfg.engine
    params = dict(e.optimizer.params) if e.optimizer is not None else {}
    return dict(dtype_bytes=2 if (e.bf16.enabled or e.fp16.enabled) else 4,
                optimizer=e.optimizer.type if e.optimizer is not None else "AdamW",
                momentum=bool(params.get("momentum", 0.0)), zero_stage=e.zero_optimization.stage,
                replicas=cfg.train.nproc)


def gpt_parts(model: GPTConfig, micro_batch: int, recompute: str = "none") -> ModelParts:
    """The byte-level GPT's part: parameters from its config, activations counted layer by layer."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    dense, per_expert = param_counts(model)
    n_moe = sum(model.is_moe_block(i) for i in range(model.n_layer))
    lowp, fp32 = activation_elements(model, micro_batch, recompute)
    return ModelParts(dense=dense, experts=n_moe * per_expert * (model.num_experts // model.ep_size),
                      activations=lowp, fp32_activations=fp32)


def estimate(model: GPTConfig, micro_batch: int, *, dtype_bytes: int = 4, optimizer: str = "AdamW",
             momentum: bool = False, zero_stage: int = 0, replicas: int = 1, recompute: str = "none") -> MemoryEstimate:
    """One process's training memory for the GPT ``model`` (:func:`gpt_parts` + :func:`training_memory`).

    Args:
        model: the GPT's config (its ``ep_size`` sets the experts each process holds).
        micro_batch: sequences per micro-batch (``engine.train_micro_batch_size_per_gpu``).
        recompute: the recompute policy (``train.recompute``, resolved).
        others: see :func:`training_memory`.
    """
    return training_memory(gpt_parts(model, micro_batch, recompute), dtype_bytes=dtype_bytes, optimizer=optimizer,
                           momentum=momentum, zero_stage=zero_stage, replicas=replicas)


_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_F_KEYS = ("moe_intermediate_size", "intermediate_size")


def _first(raw: dict, keys, default=None):
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return default


def hf_activation_elements_per_token(raw_config: dict, recompute: str = "none") -> int:
    """Elements one token saves for backward across a Hugging Face model (see the module docstring).

    ``recompute`` (``train.recompute``, resolved): "block" keeps each layer's input (D) plus one layer's
    activations; "moe" keeps each MoE's input instead of its activations, plus one MoE's; "experts"
    drops the experts' ``k 2 F`` but for one layer.
    """
    _check_policy(recompute)
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


def hf_parts(folder, tokens: int, ep_size: int = 1, recompute: str = "none") -> ModelParts:
    """A Hugging Face model folder's part: parameter counts from its safetensors headers, activations of
    ``tokens`` tokens (one micro-batch) from its ``config.json``."""
    from moesaic.hf.files import FolderSource, open_folder

    if tokens < 1 or ep_size < 1:
        raise ValueError(f"tokens and ep_size must be >= 1, got tokens={tokens!r}, ep_size={ep_size!r}")
    folder, raw = open_folder(folder)
    source = FolderSource(folder)
    dense = experts = 0
    for key in source.keys():
        numel = 1
        for n in source.shape(key):
            numel *= n
        if ".experts." in key:
            experts += numel
        else:
            dense += numel
    return ModelParts(dense=dense, experts=experts // ep_size,
                      activations=hf_activation_elements_per_token(raw, recompute) * tokens)


def machine_memory(device: torch.device) -> Tuple[int, Optional[int], str]:
    """``(total, available or None, what)`` bytes of the memory a process on ``device`` draws from.

    CPU: physical memory, or a smaller cgroup limit (containers); available = ``MemAvailable``.
    CUDA: the GPU's total and free memory.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free, f"GPU {device.index} ({torch.cuda.get_device_name(device)})"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    what = "this machine's memory"
    try:  # cgroup v2 limit of a container
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit() and int(limit) < total:
            total, what = int(limit), "this container's memory limit"
    except OSError:
        pass
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = min(total, int(line.split()[1]) * 1024)
    except OSError:
        pass
    return total, available, what


def check_fits(need: MemoryEstimate, processes: int, device: torch.device, *, key: str,
               model_keys: Optional[str] = None) -> Optional[str]:
    """Refuse a run that cannot fit in the device's memory; returns a warning text when it may not fit now.

    When the parameters, gradients and optimizer state alone exceed the memory, the message says so
    (no micro-batch can fit then); otherwise it names the micro-batch size's key.

    Args:
        need: one process's estimate.
        processes: processes drawing from the same memory (the processes on this machine for the CPU,
            1 per GPU).
        device: the run's device.
        key: the setting to name (the micro-batch size's key path).
        model_keys: the settings that size the model, named when the model alone does not fit
            (e.g. ``"model.n_layer, model.n_embd, model.num_experts"``); None when the model is given.

    Raises:
        ValueError: the estimate exceeds the total memory; the message gives both.
    """
    total, available, what = machine_memory(device)
    want = need.total * processes
    per = f"{processes} processes x " if processes > 1 else ""
    state = need.model_state * processes
    if state > total:
        parts = (f"parameters and gradients {_gib(need.params + need.grads + need.master)}, "
                 f"optimizer state {_gib(need.optimizer)}")
        smaller = f"a smaller model ({model_keys})" if model_keys else "a smaller model"
        if device.type == "cuda":
            smaller += " or its experts split over more GPUs (model.ep_size)"
        raise ValueError(f"the model does not fit in {what} ({_gib(total)}): its parameters, gradients and optimizer "
                         f"state alone need about {per}{_gib(need.model_state)} ({parts}) = {_gib(state)}, "
                         f"{_gib(state - total)} more than there is, before any activations; lowering {key} cannot "
                         f"help: train {smaller}, or on a machine with more memory")
    if want > total:
        raise ValueError(f"{key} is too large for this machine: a training step needs about {per}{need.describe()}"
                         f" = {_gib(want)}, but {what} is {_gib(total)}; lower {key} (or the model size) and raise "
                         "engine.gradient_accumulation_steps to keep the global batch")
    if available is not None and want > available:
        return (f"a training step needs about {_gib(want)} ({per}{need.describe()}) but only {_gib(available)} of "
                f"{what} is free now; the run may swap or be killed")
    return None


def check_run(need: MemoryEstimate, device: torch.device, processes_here: int,
              model_keys: Optional[str] = None) -> Optional[str]:
    """:func:`check_fits` for a run of ``moesaic train``: the micro-batch size's key, and the processes drawing
    from the same memory (those on this machine on the CPU, one per GPU)."""
    return check_fits(need, processes_here if device.type == "cpu" else 1, device,
                      key="engine.train_micro_batch_size_per_gpu", model_keys=model_keys)
