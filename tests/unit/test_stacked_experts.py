"""Stacked experts keep per-expert identity and give the numbers of per-module experts: index names,
optimizer groups, group-by-group steps and checkpoints across layouts exactly; forward and backward
with the same matmul kernels, equal to fp32 round-off (the elementwise middle of the expert runs over
all experts' rows at once, where vectorised and scalar code paths split rows differently than per
expert: a few ulp)."""

import pytest
import torch
from torch import nn

import moesaic
from moesaic import checkpoint
from moesaic.layer.identity import ExpertIndex, ExpertKey
from moesaic.layer.ops import rows_in_place, split_rows
from moesaic.layer.stacked import StackedExperts
from moesaic.optim.param_groups import split_params_into_different_moe_groups_for_optimizer

D, F, E = 8, 12, 4


def _experts():
    return [("glu", lambda: moesaic.GLUExpert(D, F)),
            ("ffn_sequential", lambda: nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))),
            ("ffn", lambda: moesaic.FFNExpert(D, F, activation="relu", bias=False)),
            ("clamped_glu", lambda: moesaic.GLUExpert(D, F, bias=True, swiglu_limit=0.5))]


def _pair(make, **kw):
    """A per-module and a stacked layer with the same (distinct per expert) weights and router."""
    kw = {"num_experts": E, "k": 2, "drop_tokens": False, "top2_2nd_expert_sampling": False, **kw}
    torch.manual_seed(0)
    per_module = moesaic.MoE(D, make(), expert_group_name="ffn", **kw)
    stacked = moesaic.MoE(D, make(), expert_group_name="ffn", stacked_experts=True, **kw)
    with torch.no_grad():
        stacked.gate.wg.weight.copy_(per_module.gate.wg.weight)
        for n in range(E):
            for p in per_module.experts[n].parameters():
                p.add_(torch.randn_like(p))  # every expert different
            stacked.experts.load_expert_state_dict(n, per_module.experts.expert_state_dict(n))
    return per_module, stacked


def _close(a, b, eps=torch.finfo(torch.float32).eps):
    """Equal to round-off: a few ulp (``eps``) of the values' scale (see the module docstring)."""
    a, b = a.detach().float(), b.detach().float()
    torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps * max(1.0, float(a.abs().max())))


def _slice_grads(layer):
    return {(n, name): t.grad if t.grad is not None else None
            for n in range(E) for name, t in layer.experts.expert_state_dict(n, keep_vars=True).items()}


@pytest.mark.parametrize("name,make", _experts(), ids=[n for n, _ in _experts()])
def test_outputs_and_gradients_equal_per_module_experts(name, make):
    a, b = _pair(make)
    x = torch.randn(3, 7, D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, aux_a, _ = a(xa)
    out_b, aux_b, _ = b(xb)
    g = torch.randn_like(out_a)
    ((out_a * g).sum() + aux_a).backward()
    ((out_b * g).sum() + aux_b).backward()
    _close(out_a, out_b)
    _close(xa.grad, xb.grad)
    _close(a.gate.wg.weight.grad, b.gate.wg.weight.grad)
    stacked_params = dict(b.experts.named_parameters())
    for n in range(E):
        for pname, p in a.experts[n].named_parameters():
            _close(p.grad, stacked_params[pname].grad[n])


def test_expert_without_tokens_gets_zero_gradients_like_per_module():
    a, b = _pair(lambda: moesaic.GLUExpert(D, F), k=1)
    x = torch.randn(1, D)  # one token: one expert used, three idle
    a(x)[0].sum().backward()
    b(x)[0].sum().backward()
    for n in range(E):
        for pname, p in a.experts[n].named_parameters():
            assert torch.equal(p.grad, dict(b.experts.named_parameters())[pname].grad[n])


def test_identity_names_match_per_module_experts():
    a, b = _pair(lambda: moesaic.GLUExpert(D, F, bias=True))
    ia, ib = ExpertIndex.build(a), ExpertIndex.build(b)
    key = ExpertKey("ffn", 2)
    assert [r.name for r in ia.expert_refs(key)] == [r.name for r in ib.expert_refs(key)] == [
        "ffn/2/gate_proj.weight", "ffn/2/gate_proj.bias", "ffn/2/up_proj.weight", "ffn/2/up_proj.bias",
        "ffn/2/down_proj.weight", "ffn/2/down_proj.bias"]
    assert all(r.index == 2 for r in ib.expert_refs(key))
    assert sorted(ia.expert_state_dict(key)) == sorted(ib.expert_state_dict(key))
    for name, t in ia.expert_state_dict(key).items():
        assert torch.equal(t, ib.expert_state_dict(key)[name])
    # the dense part of the state dict never holds expert tensors, stacked or not
    assert sorted(ia.dense_state_dict(a)) == sorted(ib.dense_state_dict(b)) == ["deepspeed_moe.gate.wg.weight"]


def test_stacked_params_are_tagged_and_survive_copies():
    import copy
    _, b = _pair(lambda: moesaic.GLUExpert(D, F))
    twin = copy.deepcopy(b)
    for p in twin.experts.parameters():
        assert p.allreduce is False and p.group_name == "ffn" and p.moe_stacked == ("ffn", 0)
    assert [r.name for r in ExpertIndex.build(twin)] == [r.name for r in ExpertIndex.build(b)]


@pytest.mark.parametrize("expert,match", [
    (nn.Linear(D, D), r"standard FFN/GLU shape: moesaic.FFNExpert, moesaic.GLUExpert or nn.Sequential\(.*got Linear"),
    (nn.Sequential(nn.Linear(D, F), nn.Tanh(), nn.Linear(F, D)), r"activation Tanh\(\) is not one of GELU, ReLU, SiLU"),
    (nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D + 1)),
     r"its \(in, out\) features are \[\(8, 12\), \(12, 9\)\]"),
    (nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D), nn.GELU()), r"got Sequential \(a Sequential of"),
    (nn.Sequential(nn.Linear(D, F, bias=False), nn.GELU(), nn.Linear(F, D)), r"one Linear has a bias"),
])
def test_stacked_experts_refuse_other_shapes(expert, match):
    with pytest.raises(ValueError, match=match):
        moesaic.MoE(D, expert, num_experts=2, stacked_experts=True)


def test_stacked_experts_check_hidden_size():
    with pytest.raises(ValueError, match=r"map hidden_size=6 to F and back"):
        moesaic.MoE(6, moesaic.GLUExpert(D, F), num_experts=2, stacked_experts=True)


def test_torch_optimizer_helper_keeps_stacked_tensors_whole():
    _, b = _pair(lambda: moesaic.GLUExpert(D, F))
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(b.parameters()), "name": "all"})
    names = [g["name"] for g in groups]
    assert names == ["all", "all/ffn/stacked"]
    assert groups[1]["params"] == list(b.experts.parameters()) and groups[1]["expert_number"] is None
    opt = torch.optim.AdamW(groups, lr=1e-2)  # a torch optimizer steps the whole stacked tensors
    b(torch.randn(5, D))[0].sum().backward()
    opt.step()
    views = split_params_into_different_moe_groups_for_optimizer({"params": list(b.parameters()), "name": "all"},
                                                                 stacked="views")
    assert [g["name"] for g in views] == ["all"] + [f"all/ffn/expert_{n}" for n in range(E)]
    with pytest.raises(ValueError, match=r"stacked must be one of \('whole', 'views'\), got 'slices'"):
        split_params_into_different_moe_groups_for_optimizer({"params": list(b.parameters())}, stacked="slices")


# --- the engine ---------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self, stacked, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D, D)
        self.ffn = moesaic.MoE(D, moesaic.GLUExpert(D, F, bias=True), num_experts=E, k=2, drop_tokens=False,
                               top2_2nd_expert_sampling=False, stacked_experts=stacked, expert_group_name="ffn")

    def forward(self, x, y):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return (out - y).pow(2).mean() + 0.01 * l_aux


def _same_weights(per_module_net, stacked_net):
    with torch.no_grad():
        for n in range(E):
            for p in per_module_net.ffn.experts[n].parameters():
                p.add_(0.1 * torch.randn_like(p))
            stacked_net.ffn.experts.load_expert_state_dict(n, per_module_net.ffn.experts.expert_state_dict(n))


def _config(**extra):
    # groups capped below one expert: an expert's tensors are stepped in parts, some fused
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
            "moe": {"max_group_size": 2 * D * F, "lr_scale": {"ffn/1": 0.5}}, **extra}


def _batches(step):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(8, D, generator=g), torch.randn(8, D, generator=g)) for _ in range(2)]


def _train(engine, steps, first=0):
    for step in range(first, first + steps):
        for x, y in _batches(step):
            engine.backward(engine(x, y))
            engine.step()


def _assert_same_model(a, b, exact=True):
    same = (lambda p, q: torch.equal(p, q)) if exact else (lambda p, q: _close(p, q) is None)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if name.startswith("ffn.deepspeed_moe.experts"):
            continue
        assert same(p, q), name
    for n in range(E):
        sa, sb = a.ffn.experts.expert_state_dict(n), b.ffn.experts.expert_state_dict(n)
        for name in sa:
            assert same(sa[name], sb[name]), (n, name)


def test_engine_trains_stacked_experts_exactly_as_per_module_experts(tmp_path):
    nets = Net(False), Net(True)
    _same_weights(*nets)
    (ea, oa, _, _), (eb, ob, _, _) = (moesaic.initialize(model=m, config=_config()) for m in nets)
    # the same groups, by name and by tensor names: per expert, capped parts, lr_scale on expert 1
    assert [g["name"] for g in oa.param_groups] == [g["name"] for g in ob.param_groups]
    assert [[r.name for r in oa.refs(i)] for i in range(len(oa.param_groups))] == \
        [[r.name for r in ob.refs(i)] for i in range(len(ob.param_groups))]
    assert any("part_1" in g["name"] for g in ob.param_groups)
    assert [g["lr_scale"] for g in oa.param_groups] == [g["lr_scale"] for g in ob.param_groups]
    _train(ea, 3)
    _train(eb, 3)
    assert ea.get_global_grad_norm() == pytest.approx(eb.get_global_grad_norm(), rel=1e-5)
    _assert_same_model(*nets, exact=False)

    # checkpoints move between the layouts: stacked -> per-module and back, optimizer state included
    eb.save_checkpoint(tmp_path, tag="s")
    files = sorted(p.name for p in (tmp_path / "s" / "experts" / "ffn").iterdir())
    # one weights file and one optimizer-state file per expert, as with per-module experts
    assert [f for f in files if ".optim" not in f] == sorted(f"{n}.safetensors" for n in range(E))
    assert sorted(f.split(".optim")[0] for f in files if ".optim" in f) == sorted(str(n) for n in range(E))
    fresh_a, fresh_b = Net(False, seed=1), Net(True, seed=2)
    (fa, _, _, _), (fb, _, _, _) = (moesaic.initialize(model=m, config=_config()) for m in (fresh_a, fresh_b))
    fa.load_checkpoint(tmp_path, tag="s")
    ea.save_checkpoint(tmp_path, tag="m")
    fb.load_checkpoint(tmp_path, tag="m")
    _assert_same_model(nets[1], fresh_a)  # a checkpoint moves between the layouts exactly
    _assert_same_model(nets[0], fresh_b)
    for e in (ea, eb, fa, fb):
        _train(e, 2, first=3)
    # optimizer state came along: each continues as its source does
    _assert_same_model(nets[0], nets[1], exact=False)
    _assert_same_model(nets[1], fresh_a, exact=False)
    _assert_same_model(nets[0], fresh_b, exact=False)


def test_group_by_group_stepping_of_views():
    net = Net(True)
    engine, opt, _, _ = moesaic.initialize(model=net, config=_config(gradient_clipping=0.0))
    ref = Net(True)
    _same = {k: v.clone() for k, v in net.state_dict().items()}
    ref.load_state_dict(_same)
    e_ref, o_ref, _, _ = moesaic.initialize(model=ref, config=_config(gradient_clipping=0.0))
    for e in (engine, e_ref):
        for x, y in _batches(0):
            e.backward(e(x, y) / 1.0)
    # every group on its own, in reverse order, against one full step: the same weights
    for gi in reversed(range(len(opt.param_groups))):
        opt.step(grad_scale=0.5, groups=[gi])
    o_ref.step(grad_scale=0.5)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_freezing_some_experts_of_a_stacked_layer_is_refused():
    with pytest.raises(ValueError, match=r"would freeze only some experts of stacked tensor 'ffn/1/gate_proj.weight'"):
        moesaic.initialize(model=Net(True), config=_config(moe={"freeze_experts": [1]}))
    engine, opt, _, _ = moesaic.initialize(model=Net(True), config=_config(moe={"freeze_experts": [0, 1, 2, 3]}))
    assert not any(g.get("moe") for g in opt.param_groups)


def test_stacked_checkpoint_detects_a_shape_mismatch(tmp_path):
    net = Net(True)
    engine, *_ = moesaic.initialize(model=net, config=_config())
    engine.save_checkpoint(tmp_path, tag="a")
    other = nn.Module()
    other.ffn = moesaic.MoE(D, moesaic.GLUExpert(D, F + 1, bias=True), num_experts=E, expert_group_name="ffn",
                            stacked_experts=True)
    other.inp = nn.Linear(D, D)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"experts/ffn/0.safetensors: '\w+_proj.weight' has shape \(\d+, \d+\) in the "
                             r"checkpoint but"):
        checkpoint.load(tmp_path, other, tag="a", index=ExpertIndex.build(other))
    assert isinstance(other.ffn.experts, StackedExperts)


@pytest.mark.parametrize("name,make", _experts(), ids=[n for n, _ in _experts()])
def test_autocast_computes_as_per_module_experts_do(name, make):
    # nn.Linear under CPU bf16 autocast computes in bf16 and autograd casts the gradients back;
    # the stacked loop must do the same (it used to fail in backward on mixed dtypes)
    a, b = _pair(make)
    x = torch.randn(3, 7, D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, aux_a, _ = a(xa)
        out_b, aux_b, _ = b(xb)
    assert out_a.dtype == out_b.dtype == torch.bfloat16
    g = torch.randn_like(out_a)
    ((out_a.float() * g.float()).sum() + aux_a).backward()
    ((out_b.float() * g.float()).sum() + aux_b).backward()
    bf16 = torch.finfo(torch.bfloat16).eps  # computed in bf16: round-off at bf16's scale
    _close(out_a, out_b, bf16)
    _close(xa.grad, xb.grad, bf16)
    stacked_params = dict(b.experts.named_parameters())
    for n in range(E):
        for pname, p in a.experts[n].named_parameters():
            assert stacked_params[pname].grad.dtype == p.grad.dtype == torch.float32
            _close(p.grad, stacked_params[pname].grad[n], bf16)


def test_cpu_outputs_are_row_blocks_of_one_tensor():
    # the combine reads stacked outputs whole instead of concatenating them (ops.rows_in_place)
    from moesaic.layer.ops import rows_in_place

    experts = StackedExperts(nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D)), E)
    pieces = [torch.randn(n, D, requires_grad=True) for n in (3, 0, 5, 2)]
    outs = experts(pieces)
    whole = rows_in_place(outs)
    assert whole is not None and whole.shape == (10, D)
    assert torch.equal(whole, torch.cat(outs))
    grads = torch.autograd.grad(outs, pieces, [torch.ones_like(o) for o in outs])
    assert rows_in_place(grads) is not None  # the input gradients too (the dispatcher's backward)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_grouped_matmul_path_computes_as_per_module_experts_do(autocast, monkeypatch):
    # dims that are multiples of 16 bytes take torch._grouped_mm on the CPU (the tiny test shapes
    # above take the loop): the same values as per-module experts, to round-off of the compute dtype
    import moesaic.layer.expert_mlp as expert_mlp

    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    d, f = 16, 32
    kw = {"num_experts": E, "k": 2, "drop_tokens": False, "top2_2nd_expert_sampling": False}
    a = moesaic.MoE(d, moesaic.GLUExpert(d, f), **kw)
    b = moesaic.MoE(d, moesaic.GLUExpert(d, f), stacked_experts=True, **kw)
    with torch.no_grad():
        b.gate.wg.weight.copy_(a.gate.wg.weight)
        for n in range(E):
            for p in a.experts[n].parameters():
                p.add_(torch.randn_like(p))
            b.experts.load_expert_state_dict(n, a.experts.expert_state_dict(n))
    assert expert_mlp._grouped_usable([p.weight for p in b.experts.projections()], [None] * 3)
    x = torch.randn(64, d)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out_a, aux_a, _ = a(xa)
        out_b, aux_b, _ = b(xb)
    g = torch.randn(out_a.shape)
    ((out_a.float() * g).sum() + aux_a).backward()
    ((out_b.float() * g).sum() + aux_b).backward()
    assert calls, "the grouped path did not run"
    eps = torch.finfo(torch.bfloat16 if autocast else torch.float32).eps
    _close(out_a, out_b, eps)
    _close(xa.grad, xb.grad, eps)
    for n in range(E):
        for name, grad in a.experts.expert_grads(n).items():
            _close(grad, b.experts.expert_grads(n)[name], eps)


def _allocation_peak_bytes(fn) -> int:
    """Peak of bytes allocated minus freed while ``fn`` runs (every CPU allocator event, in time order)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(event):
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    level = peak = 0
    for _, size in sorted(events):
        level += size
        peak = max(peak, level)
    return peak


def test_backward_rebuilds_the_input_pieces_after_the_middle_gradient():
    # the experts' backward first forms the middle's gradient (against the output gradient and two
    # (N, F) temporaries), and only then rebuilds the (N, D) input pieces for the input projections:
    # the two never overlap. One autograd function for the whole MLP unpacked the pieces at its start
    # (4.1 (N, D) units at this shape, where F = D / 2 as in OLMoE; now 2.7)
    S, d, f = 1024, 64, 32
    torch.manual_seed(0)
    layer = moesaic.MoE(d, moesaic.GLUExpert(d, f), num_experts=4, k=2, drop_tokens=False, stacked_experts=True,
                        top2_2nd_expert_sampling=False)
    out, _, _ = layer(torch.randn(S, d, requires_grad=True))
    peak = _allocation_peak_bytes(lambda: out.backward(torch.ones_like(out)))
    unit = 2 * S * d * 4  # one (N, D) fp32 tensor
    assert peak <= 3 * unit, f"backward peak {peak / unit:.2f} (N, D) units"



@pytest.mark.parametrize("name,make", _experts(), ids=[n for n, _ in _experts()])
def test_outputs_are_row_blocks_of_one_buffer_but_not_views(name, make):
    """FSDP2 warns for a unit's outputs that are views ("returned a view tensor"): the stacked experts'
    outputs are row blocks of one buffer (read back whole without a copy), each a tensor of its own,
    and give the gradients of one expert at a time (the layer's equality with per-module experts is above)."""
    _, b = _pair(make)
    xs = [torch.randn(n, D, requires_grad=True) for n in (3, 0, 5, 2)]
    outs = b.experts(xs)
    assert [o.shape[0] for o in outs] == [3, 0, 5, 2]
    assert not any(o._is_view() for o in outs)
    assert rows_in_place(outs) is not None
    gs = [torch.randn_like(o) for o in outs]
    torch.autograd.backward([o for o in outs if o.numel()], [g for g in gs if g.numel()])
    for n, (x, g) in enumerate(zip(xs, gs)):
        if not x.shape[0]:
            continue
        pieces = [torch.zeros(0, D) for _ in range(E)]
        pieces[n] = x.detach().clone().requires_grad_()
        out = b.experts(pieces)[n]
        _close(out, outs[n])
        out.backward(g)
        _close(pieces[n].grad, x.grad)


def test_split_rows_is_split_without_views():
    y = torch.randn(10, D, requires_grad=True)
    got = split_rows(y, [3, 0, 5, 2])
    assert not any(t._is_view() for t in got) and rows_in_place(got) is not None
    y2 = y.detach().clone().requires_grad_()
    want = y2.split([3, 0, 5, 2])
    assert all(torch.equal(a, c) for a, c in zip(got, want))
    g0, g2 = torch.randn(3, D), torch.randn(5, D)
    torch.autograd.backward([got[0], got[2]], [g0, g2])
    torch.autograd.backward([want[0], want[2]], [g0, g2])
    assert torch.equal(y.grad, y2.grad)
    with pytest.raises(ValueError, match=r"sizes \[3, 3\] sum to 6, not the 10 rows"):
        split_rows(y, [3, 3])
