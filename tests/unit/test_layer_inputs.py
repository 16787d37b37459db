"""What ``moesaic.MoE`` refuses up front: tokens that are not floating point, experts of the wrong width.

Every refusal names the layer and both sides (the dtypes; the widths), where torch's own errors
("mat1 and mat2 must have the same dtype", "mat1 and mat2 shapes cannot be multiplied") name
neither the layer nor the cause.
"""

import pytest
import torch
from torch import nn

import moesaic

D = 8


def _moe(expert=None, **kw):
    kw.setdefault("num_experts", 4)
    kw.setdefault("k", 2)
    return moesaic.MoE(D, expert if expert is not None else nn.Linear(D, D), **kw)


# --- dtypes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("stacked", [False, True], ids=["per_module", "stacked"])
def test_integer_and_bool_inputs_get_the_dtype_error_naming_the_layer(dtype, stacked):
    moe = _moe(moesaic.FFNExpert(D, 16), stacked_experts=stacked, expert_group_name="layers.2.mlp")
    x = torch.ones(3, D, dtype=dtype)
    # the same sentence as any other wrong dtype (test_layer.py), plus what to do about token ids
    with pytest.raises(TypeError, match=rf"hidden_states has dtype {dtype} but the MoE layer 'layers\.2\.mlp' holds "
                                        r"torch\.float32 experts and takes floating-point tokens; cast the input "
                                        r"\(x\.to\(torch\.float32\)\)"):
        moe(x)


def test_integer_inputs_are_refused_under_autocast_too():
    moe = _moe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"hidden_states has dtype torch\.int64 but the MoE layer 'ep_size_1'"):
            moe(torch.ones(3, D, dtype=torch.int64))


def test_a_refused_input_changes_no_statistic():
    moe = _moe()
    moe(torch.randn(5, D))
    before = moe.exp_counts.clone()
    with pytest.raises(TypeError):
        moe(torch.ones(5, D, dtype=torch.int64))
    assert torch.equal(moe.exp_counts, before)


# --- expert widths, when the layer is built ---------------------------------------------------------------

WRONG_WIDTH = {
    "linear-in": (lambda: nn.Linear(6, D), "takes inputs", 6, r"its in_features"),
    "linear-out": (lambda: nn.Linear(D, 6), "gives outputs", 6, r"its out_features"),
    "sequential": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, D)), "takes inputs", 6,
                   r"in_features of its Linear '0'"),
    "sequential-norm": (lambda: nn.Sequential(nn.Dropout(0.1), nn.LayerNorm(6), nn.Linear(6, D)), "takes inputs", 6,
                        r"its LayerNorm '1'"),
    "sequential-out": (lambda: nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, 7), nn.Dropout(0.1)),
                       "gives outputs", 7, r"out_features of its Linear '2'"),
    "glu": (lambda: moesaic.GLUExpert(6, 16), "takes inputs", 6, r"in_features of its Linear 'gate_proj'"),
    "ffn": (lambda: moesaic.FFNExpert(12, 16), "takes inputs", 12, r"in_features of its Linear 'fc1'"),
}
# stacked experts take FFN/GLU experts only
CASES = [(name, False) for name in WRONG_WIDTH] + [("glu", True), ("ffn", True)]


@pytest.mark.parametrize("case,stacked", CASES, ids=[f"{c}-{'stacked' if s else 'per_module'}" for c, s in CASES])
def test_an_expert_of_another_width_is_refused_when_the_layer_is_built(case, stacked):
    make, verb, width, where = WRONG_WIDTH[case]
    if stacked:  # StackedExperts' own shape check, now naming the layer
        match = (rf"MoE layer 'layers\.3\.mlp': stacked experts need .*\(its \(in, out\) features are "
                 rf"\[\({width}, 16\).*\]; they must map hidden_size={D} to F and back")
    else:
        match = (rf"MoE layer 'layers\.3\.mlp': the expert \(\w+\) {verb} of width {width} \({where}\), but the "
                 rf"layer's hidden_size is {D}")
    with pytest.raises(ValueError, match=match):
        _moe(make(), stacked_experts=stacked, expert_group_name="layers.3.mlp")


def test_a_shared_expert_of_another_width_is_refused_when_the_layer_is_built():
    with pytest.raises(ValueError, match=rf"MoE layer 'ep_size_1': the shared_expert \(GLUExpert\) takes inputs of "
                                         rf"width 6 .*hidden_size is {D}"):
        _moe(moesaic.GLUExpert(D, 16), shared_expert=moesaic.GLUExpert(6, 16))


class Custom(nn.Module):
    """An expert whose structure says nothing moesaic reads: its output projection is registered first."""

    def __init__(self, d_in, d_out=D):
        super().__init__()
        self.down = nn.Linear(16, d_out)
        self.up = nn.Linear(d_in, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_a_custom_expert_whose_modules_are_registered_out_of_order_is_not_refused():
    # registration order is not call order: only the Linear that runs first is checked. One expert,
    # k=1, dropless: every token's weight is softmax over one logit = 1, so the output is the expert's
    torch.manual_seed(0)
    moe = moesaic.MoE(D, Custom(D), num_experts=1, k=1, drop_tokens=False)
    x = torch.randn(5, D)
    out, _, _ = moe(x)
    assert torch.equal(out, moe.experts[0](x))


def test_a_custom_expert_of_another_input_width_is_refused_at_the_first_forward_naming_layer_and_widths():
    moe = _moe(Custom(6), expert_group_name="layers.1.mlp")  # nothing to read at build time
    with pytest.raises(ValueError, match=rf"MoE layer 'layers\.1\.mlp': the expert \(Custom\) takes inputs of width 6 "
                                         rf"\(its first Linear 'up'\), but it is given tokens of width {D} \(the "
                                         rf"layer's hidden_size is {D}\)"):
        moe(torch.randn(5, D))


def test_a_custom_expert_of_another_output_width_is_refused_at_forward_naming_the_layer():
    moe = _moe(Custom(D, d_out=5), expert_group_name="layers.1.mlp")
    with pytest.raises(ValueError, match=r"MoE layer 'layers\.1\.mlp': expert 0 \(Custom\) gave outputs of shape "
                                         rf"\(\d+, 5\) for inputs of shape \(\d+, {D}\); an expert must give "
                                         rf"hidden_size={D} wide outputs"):
        moe(torch.randn(5, D))


def test_the_first_forward_hooks_are_removed():
    moe = _moe(Custom(D))
    moe(torch.randn(5, D))
    for expert in moe.experts:
        assert not expert.up._forward_pre_hooks and not expert.down._forward_pre_hooks
