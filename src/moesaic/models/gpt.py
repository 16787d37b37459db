"""A small decoder-only byte-level transformer LM with MoE feed-forwards (nanoGPT-like).

Bytes are tokens (vocabulary 256, no tokenizer). Every block is pre-LayerNorm: causal
self-attention, then a feed-forward that is a dense MLP or, every ``moe_every``-th block, a
:class:`moesaic.MoE` layer whose experts are that same MLP. The model uses only moesaic's public
layer, so it runs unchanged with expert parallelism (``ep_size > 1``) once
``moesaic.setup_expert_parallel(model)`` has been called on every rank.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_int, check_number, join_key
from .._config import Section, section, setting
from ..layer import MixtureOfExperts, MoEConfig, name_moe_layers


_int = partial(check_int, lo=1)
_nonneg_int = partial(check_int, lo=0)

# the GPT's MoE defaults where they differ from the layer's (DeepSpeed's)
MOE_DEFAULTS = {"num_experts": 4, "k": 2, "capacity_factor": 1.25, "eval_capacity_factor": 2.0}
# keys of [model] that moved into [model.moe]; refused in a config, read in a stored one (GPTConfig.upgrade)
MOVED_KEYS = {"num_experts": "moe.num_experts", "top_k": "moe.k", "capacity_factor": "moe.capacity_factor",
              "eval_capacity_factor": "moe.eval_capacity_factor", "min_capacity": "moe.min_capacity",
              "drop_tokens": "moe.drop_tokens", "use_residual": "moe.use_residual"}
# keys that fix a checkpoint's tensors or the function they compute (a resumed run must keep them)
FIXED_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_mult", "moe_every", "moe.num_experts",
              "moe.use_residual", "moe.router_bias", "moe.enable_expert_bias", "moe.shared_experts",
              "moe.shared_expert_gate")


@dataclass(frozen=True)
class GPTConfig(Section):
    """Shape of the GPT and of its MoE layers (the ``model`` section of a training config); checked on construction.

    ``moe_every = m`` puts an MoE feed-forward in blocks ``m-1, 2m-1, ...`` (2: blocks 1, 3, 5..;
    1: every block; 0: none). ``aux_loss_coef`` weighs the summed load-balancing loss in
    :meth:`GPT.objective`. ``moe`` (the ``[model.moe]`` table) holds every option of the MoE
    layers, the layer's own :class:`~moesaic.layer.config.MoEConfig`.
    """

    PATH = "model"

    vocab_size: int = setting(256, check=partial(check_int, lo=256),  # byte-level: every byte needs a token
                              doc="Vocabulary size; tokens are bytes, so at least 256.")
    block_size: int = setting(128, check=_int, doc="Context length in bytes (tokens).")
    n_layer: int = setting(4, check=_int, doc="Transformer blocks.")
    n_head: int = setting(4, check=_int, doc="Attention heads per block; must divide n_embd.")
    n_embd: int = setting(128, check=_int, doc="Model width.")
    ffn_mult: int = setting(4, check=_int, doc="Feed-forward (and expert) hidden width = ffn_mult * n_embd.")
    dropout: float = setting(0.0, check=partial(check_number, lo=0.0, hi=1.0, hi_open=True),
                             doc="Dropout on attention, residual and embedding outputs.")
    moe_every: int = setting(2, check=_nonneg_int,
                             doc="Every moe_every-th block has an MoE feed-forward (2: blocks 1, 3, ...; 0: none).")
    ep_size: int = setting(1, check=_int, doc="Expert-parallel size: processes that share one layer's experts; "
                                              "must divide num_experts and train.nproc.")
    aux_loss_coef: float = setting(0.01, check=partial(check_number, lo=0.0),
                                   doc="Weight of the summed load-balancing loss in the objective.")
    moe: MoEConfig = section(MoEConfig, defaults=MOE_DEFAULTS,
                             doc="Every option of the MoE layers (router, capacity, losses, balancing, the experts' "
                                 "layout, shared experts); the keys of moesaic.MoEConfig.")

    @classmethod
    def from_dict(cls, data: Any, path: Optional[str] = None) -> "GPTConfig":
        """Build from a mapping; a key that moved into ``moe`` is refused with its new place."""
        path = cls.PATH if path is None else path
        if isinstance(data, Mapping):
            moved = [f"{join_key(path, old)} = {data[old]!r} is now {join_key(path, new)}"
                     for old, new in MOVED_KEYS.items() if old in data]
            if moved:
                raise ValueError(f"{'; '.join(moved)} (every MoE layer option lives in the [{join_key(path, 'moe')}] "
                                 "table; see docs/config-reference.md)")
        return super().from_dict(data, path)

    @staticmethod
    def upgrade(data: Mapping[str, Any]) -> Dict[str, Any]:
        """A ``model`` mapping written before the ``moe`` table (a checkpoint's or run's stored config) in today's keys."""
        out = {k: v for k, v in data.items() if k not in MOVED_KEYS}
        moe = dict(out.get("moe") or {})
        for old, new in MOVED_KEYS.items():
            if old in data:
                moe.setdefault(new.split(".", 1)[1], data[old])
        if moe:
            out["moe"] = moe
        return out

    @classmethod
    def fixed_values(cls, data: Optional[Mapping[str, Any]], keys: Sequence[str] = FIXED_KEYS) -> Dict[str, Any]:
        """``{key: value}`` of ``keys`` (dotted below ``model``) in a stored ``model`` mapping (either layout;
        absent keys: defaults).

        These keys fix a checkpoint's tensors (names, shapes) or the function they compute; the
        rest (``ep_size``, capacity factors, ...) may change when a run is resumed.
        """
        values = cls.from_dict(cls.upgrade(data or {})).to_dict()
        return {key: values[key] if "." not in key else values["moe"][key.split(".", 1)[1]] for key in keys}

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        key = partial(join_key, path)
        if values["n_embd"] % values["n_head"]:
            raise ValueError(f"{key('n_embd')} ({values['n_embd']}) must be divisible by {key('n_head')} "
                             f"({values['n_head']}); allowed n_head values divide n_embd")
        num_experts = values["moe"].num_experts
        if num_experts % values["ep_size"]:
            raise ValueError(f"{key('moe.num_experts')} ({num_experts}) must be divisible by {key('ep_size')} "
                             f"({values['ep_size']}): each expert-parallel rank holds num_experts / ep_size experts")

    def is_moe_block(self, i: int) -> bool:
        """Whether block ``i`` (0-based) has an MoE feed-forward."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0


def make_mlp(n_embd: int, hidden: int) -> nn.Sequential:
    """The feed-forward (also the MoE expert): Linear(d, hidden) -> GELU -> Linear(hidden, d)."""
    return nn.Sequential(OrderedDict(fc=nn.Linear(n_embd, hidden), act=nn.GELU(), proj=nn.Linear(hidden, n_embd)))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over earlier positions only. ``x``: `(B, T, C)` -> `(B, T, C)`."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the feed-forward ``ffn`` is a dense MLP or an MoE layer."""

    def __init__(self, cfg: GPTConfig, use_moe: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        mlp = make_mlp(cfg.n_embd, cfg.ffn_mult * cfg.n_embd)
        self.use_moe = use_moe
        if use_moe:
            n_shared = cfg.moe.shared_experts  # one dense MLP as wide as that many experts
            shared = make_mlp(cfg.n_embd, n_shared * cfg.ffn_mult * cfg.n_embd) if n_shared else None
            self.ffn = MixtureOfExperts(cfg.n_embd, mlp, cfg.moe, ep_size=cfg.ep_size, shared_expert=shared)
        else:
            self.ffn = mlp
        self.ffn_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Returns ``(x, l_aux)``; ``l_aux`` is None in a dense block."""
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        l_aux = None
        if self.use_moe:
            h, l_aux, _ = self.ffn(h)
        else:
            h = self.ffn(h)
        return x + self.ffn_drop(h), l_aux


class GPT(nn.Module):
    """Byte-level decoder-only LM; ``forward(idx, targets)`` returns ``(logits, loss, aux)``.

    Args:
        config: the model shape; MoE layers are named by module path (``"blocks.1.ffn"``).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, config.is_moe_block(i)) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes bytes
        self._init_weights()
        self.moe_layers = name_moe_layers(self)

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere, zero biases, and the projections that add into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        # Runs after MoE deep-copied its expert, so every expert gets its own draw.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):  # attn.proj and every MLP / expert's proj
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters held by this process (tied weights once; local experts only when ep_size > 1).

        Args:
            exclude_embeddings: leave out the position embedding (the token embedding is also
                the LM head, so it stays).

        Returns:
            The parameter count.
        """
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_embeddings else n

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """Next-byte logits, mean cross-entropy and the summed MoE load-balancing loss.

        Args:
            idx: `(B, T)` int64 bytes, ``T <= block_size``.
            targets: optional `(B, T)` int64 next bytes.

        Returns:
            ``(logits, loss, aux)``: `(B, T, vocab)` logits; the mean cross-entropy in nats (None
            without targets); the 0-dim fp32 sum of ``l_aux`` over MoE layers (0 without any).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        aux = torch.zeros((), dtype=torch.float32, device=idx.device)
        for block in self.blocks:
            x, l_aux = block(x)
            if l_aux is not None:
                aux = aux + l_aux
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            # fp32 cross-entropy: under bf16 autocast the log-softmax would lose precision
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss, aux

    def objective(self, loss: Tensor, aux: Tensor) -> Tensor:
        """The training objective ``loss + aux_loss_coef * aux``."""
        return loss + self.config.aux_loss_coef * aux

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample ``max_new_tokens`` bytes after ``idx``, one at a time.

        Runs in eval mode (deterministic routing, no dropout) and restores the previous mode.
        With ``ep_size > 1`` every rank of the expert-parallel group must call it with the same
        shapes, since each forward exchanges tokens between ranks.

        Args:
            idx: `(B, T)` int64 prompt (``T >= 1``); only the last ``block_size`` bytes are seen.
            max_new_tokens: bytes to append.
            temperature: > 0 scales the logits; 0 picks the most likely byte (greedy).
            top_k: sample only among the ``top_k`` most likely bytes (None: all).
            generator: RNG for sampling, for reproducible output.

        Returns:
            `(B, T + max_new_tokens)` int64: the prompt followed by the new bytes.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must have shape (batch, time >= 1), got {tuple(idx.shape)}")
        check_int(max_new_tokens, "max_new_tokens", lo=0)
        check_number(temperature, "temperature", lo=0.0)
        check_int(top_k, "top_k", 1, self.config.vocab_size, none_word="None")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits, _, _ = self(idx[:, -self.config.block_size:])
                logits = logits[:, -1, :].float()
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
        finally:
            self.train(was_training)
        return idx


def unigram_baseline_loss(counts: Tensor) -> float:
    """Cross-entropy (nats/byte) of predicting each byte by its frequency: the unigram entropy.

    A model whose validation loss is not clearly below this has learned nothing beyond byte
    frequencies.

    Args:
        counts: 1-D non-negative byte counts (256 long for bytes), not all zero.

    Returns:
        ``-sum(p * ln p)`` over bytes with ``p = counts / counts.sum()`` (zero counts add nothing).
    """
    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    counts = counts.double()
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()) or counts.sum() <= 0:
        raise ValueError("counts must be finite, non-negative and not all zero")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
