"""moesaic layers against Hugging Face ``transformers``' own MoE blocks (the independent reference).

For each family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS) a tiny block is built
offline from its config class with random weights, the weights are copied into ``moesaic.MoE``
built with that family's options (docs/modern-layers.md has the table), and router logits, top-k
weights, the block's output (routed experts, shared experts and their gate, biases, GPT-OSS's
clamped SwiGLU) and the gradients of the input and of every weight must agree to fp32 round-off,
with per-module and with stacked experts. transformers is an optional extra (``.[hf]``).

Weight layouts (transformers 5 stores experts stacked): Mixtral, Qwen and OLMoE, DeepSeek-V3 keep
``gate_up_proj`` `(E, 2F, D)` (gate rows first) and ``down_proj`` `(E, D, F)`; GPT-OSS keeps
``gate_up_proj`` `(E, D, 2F)` with gate and up interleaved (even / odd columns), ``down_proj``
`(E, F, D)` and biases.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import moesaic  # noqa: E402

D, F, FS, E, S_BATCH, S_SEQ = 16, 12, 20, 8, 2, 6


@dataclass
class Family:
    name: str
    build: Callable[[], Tuple[nn.Module, moesaic.MoE]]  # (hf block, moesaic layer with copied weights)
    weight_map: Callable[[nn.Module, moesaic.MoE], List[Tuple[str, torch.Tensor, Callable]]]


def _randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _glu_slices(gate_up_EFD, down_EDF, n):
    """The per-expert (gate, up, down) weights of a (gate rows first) fused layout."""
    return {"gate_proj.weight": gate_up_EFD[n, :F], "up_proj.weight": gate_up_EFD[n, F:],
            "down_proj.weight": down_EDF[n]}


def _copy_experts(layer: moesaic.MoE, per_expert: Callable[[int], Dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for n in range(E):
            layer.experts.load_expert_state_dict(n, {k: v.detach().clone() for k, v in per_expert(n).items()})


def _copy_glu(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(dst, name).weight.copy_(getattr(src, name).weight)


def _grads_of_experts(layer: moesaic.MoE, per_expert_hf: Callable[[int], Dict[str, torch.Tensor]]):
    """Pairs (name, moesaic expert grad, hf grad) for every expert tensor."""
    out = []
    for n in range(E):
        theirs = per_expert_hf(n)
        for k, g in layer.experts.expert_grads(n).items():
            out.append((f"expert {n} {k}", g, theirs[k]))
    return out


# --- the families ---------------------------------------------------------------------------------

def _mixtral(stacked):
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2,
                        hidden_act="silu", experts_implementation="eager")
    hf = MixtralSparseMoeBlock(cfg)
    _randomise(hf)
    mine = moesaic.MoE(D, moesaic.GLUExpert(D, F), num_experts=E, k=2, drop_tokens=False, norm_topk_prob=True,
                       top2_2nd_expert_sampling=False, stacked_experts=stacked)
    with torch.no_grad():
        mine.gate.wg.weight.copy_(hf.gate.weight)
    _copy_experts(mine, lambda n: _glu_slices(hf.experts.gate_up_proj, hf.experts.down_proj, n))
    return hf, mine, (lambda x: hf(x)), hf.gate, \
        (lambda n, grad=True: _glu_slices(hf.experts.gate_up_proj.grad, hf.experts.down_proj.grad, n)), []


def _qwen(kind, stacked):
    if kind == "qwen2":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig as Config
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
        extra = dict(shared_expert_intermediate_size=FS, norm_topk_prob=False)
        k = 3
    elif kind == "qwen3":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig as Config
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        extra = dict(norm_topk_prob=True)
        k = 4
    else:
        from transformers.models.olmoe.modeling_olmoe import OlmoeConfig as Config
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        extra = dict(norm_topk_prob=False)
        k = 3
    cfg = Config(hidden_size=D, moe_intermediate_size=F, intermediate_size=F, num_experts=E,
                 num_experts_per_tok=k, hidden_act="silu", experts_implementation="eager", **extra)
    hf = Block(cfg)
    _randomise(hf)
    shared = {}
    if kind == "qwen2":
        shared = dict(shared_expert=moesaic.GLUExpert(D, FS), shared_expert_gate=True)
    mine = moesaic.MoE(D, moesaic.GLUExpert(D, F), num_experts=E, k=k, drop_tokens=False,
                       norm_topk_prob=cfg.norm_topk_prob, stacked_experts=stacked, **shared)
    with torch.no_grad():
        mine.gate.wg.weight.copy_(hf.gate.weight)
        if kind == "qwen2":
            _copy_glu(mine.shared_expert, hf.shared_expert)
            mine.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    _copy_experts(mine, lambda n: _glu_slices(hf.experts.gate_up_proj, hf.experts.down_proj, n))
    pairs = []
    if kind == "qwen2":
        pairs = [(f"shared {n}", lambda n=n: getattr(mine.shared_expert, n).weight.grad,
                  lambda n=n: getattr(hf.shared_expert, n).weight.grad) for n in ("gate_proj", "up_proj", "down_proj")]
        pairs.append(("shared gate", lambda: mine.shared_expert_gate.weight.grad,
                      lambda: hf.shared_expert_gate.weight.grad))
    return hf, mine, (lambda x: hf(x)), hf.gate, \
        (lambda n: _glu_slices(hf.experts.gate_up_proj.grad, hf.experts.down_proj.grad, n)), pairs


def _deepseek_v3(stacked):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE
    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, intermediate_size=F, n_routed_experts=E,
                           n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                           routed_scaling_factor=2.5, hidden_act="silu", experts_implementation="eager")
    hf = DeepseekV3MoE(cfg)
    _randomise(hf)  # the e_score_correction_bias buffer too: it must steer selection exactly
    mine = moesaic.MoE(D, moesaic.GLUExpert(D, F), num_experts=E, k=3, drop_tokens=False, score_func="sigmoid",
                       norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2,
                       enable_expert_bias=True, bias_update_rate=0.0,
                       shared_expert=moesaic.GLUExpert(D, 2 * F), stacked_experts=stacked)
    with torch.no_grad():
        mine.gate.wg.weight.copy_(hf.gate.weight)
        mine.gate.expert_bias.copy_(hf.gate.e_score_correction_bias)
        _copy_glu(mine.shared_expert, hf.shared_experts)
    _copy_experts(mine, lambda n: _glu_slices(hf.experts.gate_up_proj, hf.experts.down_proj, n))
    pairs = [(f"shared {n}", lambda n=n: getattr(mine.shared_expert, n).weight.grad,
              lambda n=n: getattr(hf.shared_experts, n).weight.grad) for n in ("gate_proj", "up_proj", "down_proj")]
    return hf, mine, (lambda x: hf(x)), hf.gate, \
        (lambda n: _glu_slices(hf.experts.gate_up_proj.grad, hf.experts.down_proj.grad, n)), pairs


def _gpt_oss_slices(ex, n, grad=False):
    t = (lambda p: p.grad) if grad else (lambda p: p)
    gu, gub, dn, dnb = t(ex.gate_up_proj)[n], t(ex.gate_up_proj_bias)[n], t(ex.down_proj)[n], t(ex.down_proj_bias)[n]
    return {"gate_proj.weight": gu[:, ::2].t(), "gate_proj.bias": gub[::2], "up_proj.weight": gu[:, 1::2].t(),
            "up_proj.bias": gub[1::2], "down_proj.weight": dn.t(), "down_proj.bias": dnb}


def _gpt_oss(stacked):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssMLP
    cfg = GptOssConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2,
                       swiglu_limit=0.6, experts_implementation="eager")
    hf = GptOssMLP(cfg)
    _randomise(hf)  # weights of 0.3 put many pre-activations beyond the clamp of 0.6
    mine = moesaic.MoE(D, moesaic.GLUExpert(D, F, bias=True, swiglu_limit=0.6, swiglu_alpha=1.702), num_experts=E,
                       k=2, drop_tokens=False, softmax_after_topk=True, router_bias=True,
                       top2_2nd_expert_sampling=False, stacked_experts=stacked)
    with torch.no_grad():
        mine.gate.wg.weight.copy_(hf.router.weight)
        mine.gate.wg.bias.copy_(hf.router.bias)
    _copy_experts(mine, lambda n: _gpt_oss_slices(hf.experts, n))
    pairs = [("router bias", lambda: mine.gate.wg.bias.grad, lambda: hf.router.bias.grad)]
    return hf, mine, (lambda x: hf(x)[0]), hf.router, (lambda n: _gpt_oss_slices(hf.experts, n, grad=True)), pairs


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": lambda s: _qwen("qwen2", s), "qwen3_moe": lambda s: _qwen("qwen3", s),
            "olmoe": lambda s: _qwen("olmoe", s), "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss}


def _dense_topk(S, indices, scores):
    return torch.zeros(S, E).scatter(1, indices, scores.float())


@pytest.mark.parametrize("stacked", [False, True], ids=["per_module", "stacked"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_matches_transformers(family, stacked):
    torch.manual_seed(0)
    hf, mine, run_hf, hf_router, hf_expert_grads, extra_pairs = FAMILIES[family](stacked)
    mine.train()  # training mode: routing must not depend on it for these options
    x = torch.randn(S_BATCH, S_SEQ, D, generator=torch.Generator().manual_seed(2))
    x_hf, x_me = x.clone().requires_grad_(), x.clone().requires_grad_()
    close = dict(atol=2e-5, rtol=2e-5)

    # router logits and top-k weights
    with torch.no_grad():
        logits_hf, scores_hf, idx_hf = hf_router(x.reshape(-1, D))
        torch.testing.assert_close(mine.gate.logits(x.reshape(-1, D)), logits_hf.float(), **close)
        r = mine.gate(x.reshape(-1, D))
        weights_me = torch.zeros(x.shape[0] * x.shape[1], E).index_put((r.token_idx_N, r.expert_idx_N), r.weight_N)
        torch.testing.assert_close(weights_me, _dense_topk(weights_me.shape[0], idx_hf, scores_hf), **close)

    # the block's output and every gradient
    out_hf = run_hf(x_hf)
    out_me, _, _ = mine(x_me)
    torch.testing.assert_close(out_me, out_hf, **close)
    g = torch.randn(out_hf.shape, generator=torch.Generator().manual_seed(3))
    (out_hf * g).sum().backward()
    (out_me * g).sum().backward()
    torch.testing.assert_close(x_me.grad, x_hf.grad, **close)
    torch.testing.assert_close(mine.gate.wg.weight.grad, hf_router.weight.grad, **close)
    for name, a, b in _grads_of_experts(mine, hf_expert_grads):
        torch.testing.assert_close(a, b, **close, msg=lambda m: f"{family} {name}: {m}")
    for name, a, b in extra_pairs:
        torch.testing.assert_close(a(), b(), **close, msg=lambda m: f"{family} {name}: {m}")
    assert extra_pairs or family in ("mixtral", "qwen3_moe", "olmoe")


def test_gpt_oss_clamp_is_active_in_the_comparison():
    # the clamped SwiGLU must actually clip some pre-activations, or the comparison above proves nothing about it
    hf, mine, *_ = _gpt_oss(False)
    x = torch.randn(S_BATCH * S_SEQ, D, generator=torch.Generator().manual_seed(2))
    ex = mine.experts[0]
    assert (ex.gate_proj(x) > 0.6).any() and (ex.up_proj(x).abs() > 0.6).any()


def test_deepseek_bias_changes_the_selection():
    # the correction bias is large enough to change some choices: selection uses it, weights do not
    hf, mine, *_ = _deepseek_v3(False)
    x = torch.randn(S_BATCH * S_SEQ, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mine.gate.expert_bias.mul_(20)
        with_bias = mine.gate(x).expert_ids_SK.sort(1).values
        mine.gate.expert_bias.zero_()
        without = mine.gate(x).expert_ids_SK.sort(1).values
    assert not torch.equal(with_bias, without)
