"""The six supported Hugging Face MoE families: which block to replace, the layer's options, the tensor names.

A :class:`Family` answers three questions for one ``config.model_type``:

* which modules of the ``transformers`` model are sparse MoE blocks (by class name);
* the ``moesaic.MoE`` arguments that compute exactly what that block computes
  (``docs/modern-layers.md`` has the table, ``tests/unit/test_hf_reference.py`` checks it block
  against block);
* how the block's tensors are named and laid out in a checkpoint (:class:`BlockLayout`).

Two layouts exist per block. The *hub* layout is what ``save_pretrained`` writes and what the
Hub's checkpoints hold: one tensor per expert (``experts.<n>.gate_proj.weight``; Mixtral's
``block_sparse_moe.experts.<n>.w1.weight``), except GPT-OSS, which stores experts stacked on disk.
The *fused* layout is ``transformers`` 5's in-memory one (``experts.gate_up_proj`` `(E, 2F, D)`,
gate rows first, ``experts.down_proj`` `(E, D, F)`); a built model's state dict uses it, and a
folder written without the reverse conversion may too.

Shape legend: E = experts, D = hidden size, F = expert hidden size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from ..layer.ffn import ACTIVATIONS, GLUExpert

# transformers' activation names -> moesaic's (only functions moesaic computes identically)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}


def activation_of(config) -> str:
    """moesaic's name for ``config.hidden_act`` (a ValueError naming the supported ones otherwise)."""
    act = getattr(config, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.hidden_act={act!r} has no exact moesaic equivalent; supported: "
                         f"{sorted(_ACTIVATIONS)} (moesaic activations: {sorted(ACTIVATIONS)})")
    return _ACTIVATIONS[act]


class _EmptyGLU(nn.Module):
    """A gate/up/down MLP of width 0: it adds exactly 0 (a Qwen2-MoE upcycled from dense Qwen2 has one)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        with warnings.catch_warnings():  # torch warns that initialising an empty tensor does nothing
            warnings.simplefilter("ignore", UserWarning)
            self.gate_proj = nn.Linear(hidden_size, 0, bias=False)
            self.up_proj = nn.Linear(hidden_size, 0, bias=False)
            self.down_proj = nn.Linear(0, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gate_proj(x) * self.up_proj(x))


def _shared_glu(hidden_size: int, width: int, activation: str) -> nn.Module:
    return _EmptyGLU(hidden_size) if width == 0 else GLUExpert(hidden_size, width, activation)


# --- tensor layouts ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PerExpertTensor:
    """One checkpoint tensor per expert: ``template.format(n=n)`` is expert n's ``name``, unchanged."""

    template: str  # relative to the block's checkpoint prefix, e.g. "experts.{n}.w1.weight"
    name: str  # the tensor's name inside a moesaic expert, e.g. "gate_proj.weight"


@dataclass(frozen=True)
class FusedTensor:
    """One checkpoint tensor holding every expert along dim 0.

    ``pieces`` maps moesaic names to a function that, given expert n's slice ``t[n]``, returns the
    view of it holding that tensor; the views cover the slice exactly once, so splitting and joining
    are copies (bitwise).
    """

    key: str  # relative to the block's checkpoint prefix, e.g. "experts.gate_up_proj"
    pieces: Tuple[Tuple[str, Callable[[Tensor], Tensor]], ...]
    slice_shape: Callable[[Dict[str, Tuple[int, ...]]], Tuple[int, ...]]  # expert's shapes -> t[n].shape


@dataclass(frozen=True)
class BlockLayout:
    """How one block's tensors are named in a checkpoint.

    Attributes:
        name: ``"hub"`` or ``"fused"``.
        prefix: the block's checkpoint prefix relative to its decoder layer (``"mlp"``, Mixtral's
            hub ``"block_sparse_moe"``).
        dense: checkpoint name -> the moesaic layer's state-dict name (router, shared expert, ...).
        per_expert / fused: the expert tensors (one of the two is empty).
    """

    name: str
    prefix: str
    dense: Dict[str, str]
    per_expert: Tuple[PerExpertTensor, ...] = ()
    fused: Tuple[FusedTensor, ...] = ()


def _rows(lo: Optional[int], hi: Optional[int]) -> Callable[[Tensor], Tensor]:
    return lambda t: t[lo:hi]


def _glu_fused(F_: int) -> Tuple[FusedTensor, ...]:
    # transformers 5: gate_up_proj (E, 2F, D) with the gate's rows first, down_proj (E, D, F)
    return (FusedTensor("experts.gate_up_proj", (("gate_proj.weight", _rows(None, F_)),
                                                 ("up_proj.weight", _rows(F_, None))),
                        lambda s: (2 * s["gate_proj.weight"][0], s["gate_proj.weight"][1])),
            FusedTensor("experts.down_proj", (("down_proj.weight", lambda t: t),), lambda s: s["down_proj.weight"]))


def _gpt_oss_fused() -> Tuple[FusedTensor, ...]:
    # GPT-OSS: gate_up_proj (E, D, 2F) with gate / up interleaved in even / odd columns, down_proj (E, F, D)
    return (FusedTensor("experts.gate_up_proj", (("gate_proj.weight", lambda t: t[:, 0::2].t()),
                                                 ("up_proj.weight", lambda t: t[:, 1::2].t())),
                        lambda s: (s["gate_proj.weight"][1], 2 * s["gate_proj.weight"][0])),
            FusedTensor("experts.gate_up_proj_bias", (("gate_proj.bias", lambda t: t[0::2]),
                                                      ("up_proj.bias", lambda t: t[1::2])),
                        lambda s: (2 * s["gate_proj.bias"][0],)),
            FusedTensor("experts.down_proj", (("down_proj.weight", lambda t: t.t()),),
                        lambda s: s["down_proj.weight"][::-1]),
            FusedTensor("experts.down_proj_bias", (("down_proj.bias", lambda t: t),), lambda s: s["down_proj.bias"]))


_GLU_PER_EXPERT = tuple(PerExpertTensor(f"experts.{{n}}.{p}.weight", f"{p}.weight")
                        for p in ("gate_proj", "up_proj", "down_proj"))
_MIXTRAL_PER_EXPERT = (PerExpertTensor("experts.{n}.w1.weight", "gate_proj.weight"),
                       PerExpertTensor("experts.{n}.w3.weight", "up_proj.weight"),
                       PerExpertTensor("experts.{n}.w2.weight", "down_proj.weight"))


def _shared_names(hf_name: str, gated: bool) -> Dict[str, str]:
    out = {f"{hf_name}.{p}.weight": f"shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    if gated:
        out["shared_expert_gate.weight"] = "shared_expert_gate.weight"
    return out


# --- the families -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """One supported ``model_type`` (see module docstring).

    Attributes:
        model_type: ``config.model_type``.
        block_classes: class names of the sparse MoE blocks in ``transformers``' model.
        options: ``config -> moesaic.MoE`` keyword arguments (``expert`` included, ``num_experts``,
            ``k``; not ``ep_size``).
        layouts: ``config -> (hub layout, fused layout)``.
        returns_router_scores: the decoder layer unpacks ``(hidden, router_scores)`` from the block (GPT-OSS).
        aux_loss: the ``ForCausalLM`` adds ``router_aux_loss_coef * aux_loss`` when asked for router logits.
        jitter_attr: config attribute of the block's multiplicative input jitter (Mixtral), or None.
        experts_key: the config attribute holding E.
        logits_fp32: ``transformers``' router computes its logits in fp32 whatever the model's dtype.
    """

    model_type: str
    block_classes: Tuple[str, ...]
    options: Callable[[object], dict]
    layouts: Callable[[object], Tuple[BlockLayout, BlockLayout]]
    returns_router_scores: bool = False
    aux_loss: bool = True
    jitter_attr: Optional[str] = None
    experts_key: str = "num_experts"
    logits_fp32: bool = False


def _mixtral_options(c) -> dict:
    return dict(expert=GLUExpert(c.hidden_size, c.intermediate_size, activation_of(c)),
                num_experts=c.num_local_experts, k=c.num_experts_per_tok, drop_tokens=False, norm_topk_prob=True,
                top2_2nd_expert_sampling=False)


def _mixtral_layouts(c):
    dense = {"gate.weight": "gate.wg.weight"}
    return (BlockLayout("hub", "block_sparse_moe", dense, per_expert=_MIXTRAL_PER_EXPERT),
            BlockLayout("fused", "mlp", dense, fused=_glu_fused(c.intermediate_size)))


def _qwen_options(shared: bool, f_attr: str = "moe_intermediate_size") -> Callable[[object], dict]:
    def options(c) -> dict:
        out = dict(expert=GLUExpert(c.hidden_size, getattr(c, f_attr), activation_of(c)),
                   num_experts=c.num_experts, k=c.num_experts_per_tok, drop_tokens=False,
                   norm_topk_prob=bool(c.norm_topk_prob), top2_2nd_expert_sampling=False)
        if shared:
            out.update(shared_expert=_shared_glu(c.hidden_size, c.shared_expert_intermediate_size, activation_of(c)),
                       shared_expert_gate=True)
        return out
    return options


def _qwen_layouts(shared: bool, f_attr: str = "moe_intermediate_size"):
    def layouts(c):
        dense = {"gate.weight": "gate.wg.weight"}
        if shared:
            dense.update(_shared_names("shared_expert", gated=True))
        return (BlockLayout("hub", "mlp", dense, per_expert=_GLU_PER_EXPERT),
                BlockLayout("fused", "mlp", dense, fused=_glu_fused(getattr(c, f_attr))))
    return layouts


def _deepseek_v3_options(c) -> dict:
    return dict(expert=GLUExpert(c.hidden_size, c.moe_intermediate_size, activation_of(c)),
                num_experts=c.n_routed_experts, k=c.num_experts_per_tok, drop_tokens=False, score_func="sigmoid",
                norm_topk_prob=bool(c.norm_topk_prob), routed_scaling_factor=float(c.routed_scaling_factor),
                n_group=c.n_group, topk_group=c.topk_group, enable_expert_bias=True, bias_update_rate=0.0,
                top2_2nd_expert_sampling=False,
                shared_expert=GLUExpert(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts,
                                        activation_of(c)))


def _deepseek_v3_layouts(c):
    dense = {"gate.weight": "gate.wg.weight",
             "gate.e_score_correction_bias": "gate.expert_bias",
             **_shared_names("shared_experts", gated=False)}
    return (BlockLayout("hub", "mlp", dense, per_expert=_GLU_PER_EXPERT),
            BlockLayout("fused", "mlp", dense, fused=_glu_fused(c.moe_intermediate_size)))


def _gpt_oss_options(c) -> dict:
    # transformers hard-codes alpha = 1.702 in GptOssExperts
    return dict(expert=GLUExpert(c.hidden_size, c.intermediate_size, bias=True, swiglu_limit=float(c.swiglu_limit),
                                 swiglu_alpha=1.702),
                num_experts=c.num_local_experts, k=c.num_experts_per_tok, drop_tokens=False, softmax_after_topk=True,
                router_bias=True, top2_2nd_expert_sampling=False)


def _gpt_oss_layouts(c):
    dense = {"router.weight": "gate.wg.weight", "router.bias": "gate.wg.bias"}
    layout = BlockLayout("hub", "mlp", dense, fused=_gpt_oss_fused())
    return layout, BlockLayout("fused", "mlp", dense, fused=_gpt_oss_fused())


FAMILIES: Dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", ("MixtralSparseMoeBlock",), _mixtral_options, _mixtral_layouts, jitter_attr="router_jitter_noise",
           experts_key="num_local_experts"),
    Family("qwen2_moe", ("Qwen2MoeSparseMoeBlock",), _qwen_options(True), _qwen_layouts(True)),
    Family("qwen3_moe", ("Qwen3MoeSparseMoeBlock",), _qwen_options(False), _qwen_layouts(False)),
    Family("olmoe", ("OlmoeSparseMoeBlock",), _qwen_options(False, "intermediate_size"),
           _qwen_layouts(False, "intermediate_size")),
    Family("deepseek_v3", ("DeepseekV3MoE",), _deepseek_v3_options, _deepseek_v3_layouts, aux_loss=False,
           experts_key="n_routed_experts", logits_fp32=True),
    Family("gpt_oss", ("GptOssMLP",), _gpt_oss_options, _gpt_oss_layouts, returns_router_scores=True,
           experts_key="num_local_experts"),
)}

SUPPORTED = tuple(FAMILIES)

# dense families upcycle() accepts (their MLP is gate/up/down: a GLUExpert)
DENSE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def family_of(config, where: Optional[str] = None) -> Family:
    """The :class:`Family` of a ``transformers`` config or a raw ``config.json`` dict.

    Any other ``model_type`` is a ValueError listing the supported ones (prefixed with ``where``,
    e.g. the config file); one whose config asks for the folder's own code (``auto_map``) says
    that moesaic never runs it.
    """
    if isinstance(config, dict):
        model_type, auto_map = config.get("model_type"), config.get("auto_map")
    else:
        model_type, auto_map = getattr(config, "model_type", None), getattr(config, "auto_map", None)
    if model_type not in FAMILIES:
        hint = (" (a dense model: moesaic.hf.upcycle turns it into an MoE)" if model_type in DENSE_FAMILIES else "")
        code = (f"; its auto_map asks to run the folder's own code ({describe_auto_map(auto_map)}), which moesaic "
                "never does (trust_remote_code=False)" if auto_map else "")
        raise ValueError(f"{where + ': ' if where else ''}unsupported architecture: config.model_type={model_type!r}"
                         f"{hint}; moesaic.hf supports {list(SUPPORTED)}{code}")
    return FAMILIES[model_type]


def describe_auto_map(auto_map) -> str:
    """``auto_map`` of a config (``{"AutoConfig": "configuration_x.XConfig", ...}``) in one line, for messages."""
    if isinstance(auto_map, dict):
        return ", ".join(f"{k}: {v}" for k, v in auto_map.items())
    return repr(auto_map)
