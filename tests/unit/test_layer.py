"""The MoE layer on one process: dense equivalences, identity tags, DeepSpeed's structure, devices, errors."""

import contextlib
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import moesaic
from moesaic.layer import Dispatcher, LocalDispatcher
from moesaic.layer.keys import upgrade_legacy_keys

D = 8


def mlp(d=D, h=16):
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))


# --- the layer ----------------------------------------------------------------------------------

def test_single_expert_equals_dense_mlp_in_output_and_grads():
    torch.manual_seed(0)
    dense = mlp()
    moe = moesaic.MoE(D, dense, num_experts=1, k=1, drop_tokens=False)
    x = torch.randn(3, 5, D, requires_grad=True)
    out, l_aux, counts = moe(x)
    # one expert: softmax over one logit is 1, so the layer is exactly the expert
    torch.testing.assert_close(out, dense(x))
    assert counts.tolist() == [15]
    out.pow(2).sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    dense.zero_grad()
    dense(xd).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    for p_moe, p_dense in zip(moe.experts[0].parameters(), dense.parameters()):
        torch.testing.assert_close(p_moe.grad, p_dense.grad)


def test_output_equals_explicit_per_token_sum():
    torch.manual_seed(1)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    x = torch.randn(20, D)
    out, _, _ = moe(x)
    logits = x @ moe.gate.wg.weight.t()
    g = torch.softmax(logits, 1)
    top = g.topk(2, dim=1)
    want = torch.zeros_like(x)
    for t in range(20):
        w = top.values[t] / top.values[t].sum()
        for j in range(2):
            want[t] += w[j] * moe.experts[int(top.indices[t, j])](x[t:t + 1])[0]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def test_no_dense_dispatch_tensor_even_at_huge_s_e_c():
    # a one-hot [S, E, C] fp32 tensor here would take 32768 * 512 * 128 * 4 B = 8 GiB
    torch.manual_seed(0)
    moe = moesaic.MoE(4, nn.Linear(4, 4), num_experts=512, k=2, capacity_factor=2.0)
    x = torch.randn(32768, 4)
    out, _, counts = moe(x)
    assert out.shape == x.shape and int(counts.sum()) == 65536


def test_experts_tagged_with_identity_and_dense_params_untagged():
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=1, expert_group_name="blocks.1.ffn", use_residual=True)
    assert len(moe.experts) == 4 and moe.num_local_experts == 4
    for i in range(4):
        for p in moe.experts[i].parameters():
            assert p.allreduce is False and p.group_name == "blocks.1.ffn" and p.expert_number == i
    for p in list(moe.gate.parameters()) + list(moe.mlp.parameters()) + list(moe.coefficient.parameters()):
        assert not hasattr(p, "allreduce") and not hasattr(p, "expert_number")
    assert isinstance(moe.gate.wg, nn.Linear) and moe.gate.wg.weight.shape == (4, D) and moe.gate.wg.bias is None


def test_default_name_is_deepspeeds_and_name_moe_layers_uses_module_paths():
    model = nn.ModuleDict({"a": moesaic.MoE(D, mlp(), num_experts=2), "b": moesaic.MoE(D, mlp(), num_experts=2)})
    assert model["a"].expert_group_name == "ep_size_1"
    named = moesaic.name_moe_layers(model)
    assert sorted(named) == ["a", "b"]
    assert {p.group_name for p in model["b"].experts.parameters()} == {"b"}


def test_used_token_masks_tokens_for_every_k():
    torch.manual_seed(0)
    for k in (1, 2, 3):
        moe = moesaic.MoE(D, mlp(), num_experts=4, k=k, drop_tokens=False, top2_2nd_expert_sampling=False)
        x = torch.randn(2, 6, D)
        used = torch.ones(2, 6, dtype=torch.bool)
        used[1, 2:] = False
        out, _, counts = moe(x, used)
        assert torch.all(out[1, 2:] == 0)
        assert int(counts.sum()) == 8 * k
        full, _, _ = moe(x)
        torch.testing.assert_close(out[~used.logical_not()], full[used])


def test_eval_mode_is_deterministic_and_uses_eval_capacity():
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=2, capacity_factor=0.25, eval_capacity_factor=4.0,
                      noisy_gate_policy="RSample")
    x = torch.randn(64, D)
    moe.eval()
    a, _, _ = moe(x)
    b, _, _ = moe(x)
    assert torch.equal(a, b)
    assert moe.num_dropped_routes == 0  # eval factor 4.0 makes room for every route
    moe.train()
    moe(x)
    assert moe.num_dropped_routes > 0  # train factor 0.25 does not


def test_z_loss_reported_separately():
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=1, z_loss_coef=1e-3)
    x = torch.randn(16, D)
    _, l_aux, _ = moe(x)
    logits = x @ moe.gate.wg.weight.t()
    torch.testing.assert_close(moe.z_loss, 1e-3 * torch.logsumexp(logits, 1).pow(2).mean())
    plain = moesaic.MoE(D, mlp(), num_experts=4, k=1)
    plain.load_state_dict(moe.state_dict())
    _, l_aux_plain, _ = plain(x)
    torch.testing.assert_close(l_aux, l_aux_plain)  # l_aux keeps DeepSpeed's meaning


def test_bf16_experts_and_fp32_router():
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=2).to(torch.bfloat16)
    x = torch.randn(32, D, dtype=torch.bfloat16, requires_grad=True)
    out, l_aux, _ = moe(x)
    assert out.dtype == torch.bfloat16 and l_aux.dtype == torch.float32
    (out.float().sum() + l_aux).backward()
    assert moe.gate.wg.weight.grad is not None and torch.isfinite(moe.gate.wg.weight.grad.float()).all()


def test_non_finite_input_propagates():
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=1, drop_tokens=False)
    x = torch.randn(8, D)
    x[3, 0] = float("nan")
    out, _, _ = moe(x)
    assert torch.isnan(out[3]).any()
    assert torch.isfinite(out[[0, 1, 2, 4, 5, 6, 7]]).all()


def test_unused_experts_get_zero_grads_not_none():
    moe = moesaic.MoE(D, mlp(), num_experts=8, k=1, drop_tokens=False)
    out, _, counts = moe(torch.randn(2, D))
    out.sum().backward()
    idle = [i for i in range(8) if counts[i] == 0]
    assert idle
    for i in idle:
        for p in moe.experts[i].parameters():
            assert p.grad is not None and torch.all(p.grad == 0)


def test_use_tutel_warns_once_per_calling_line_and_is_ignored():
    with pytest.warns(UserWarning, match="use_tutel is ignored"):
        moesaic.MoE(D, mlp(), num_experts=2, use_tutel=True)
    # Python's default filter reports a warning once per location; the location is the caller's line
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            moe = moesaic.MoE(D, mlp(), num_experts=2, use_tutel=True)
    assert [str(w.message) for w in seen] == ["MoE(use_tutel=True): moesaic always dispatches by index; "
                                              "use_tutel is ignored"]
    assert seen[0].filename == __file__
    out, _, _ = moe(torch.randn(4, D))
    assert out.shape == (4, D)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_experts=6, ep_size=4), ValueError, r"num_experts \(6\) must be divisible .* ep_size \(4\)"),
    (dict(num_experts=4, k=0), ValueError, r"k must be an int in \[1, num_experts=4\], got 0"),
    (dict(num_experts=4, k=5), ValueError, r"k must be an int in \[1, num_experts=4\], got 5"),
    (dict(num_experts=4, noisy_gate_policy="Gaussian"), ValueError, r"Unknown noisy_gate_policy 'Gaussian'"),
    (dict(num_experts=4, drop_policy="random"), ValueError, r"Unknown drop_policy 'random'"),
    (dict(num_experts=4, capacity_factor=0.0), ValueError, r"capacity_factor must be a finite number in \(0, inf\), got 0.0"),
    (dict(num_experts=4, eval_capacity_factor=-1), ValueError, r"eval_capacity_factor must be"),
    (dict(num_experts=4, min_capacity=-1), ValueError, r"min_capacity must be an int >= 0, got -1"),
    (dict(num_experts=4, k=1.5), TypeError, r"k must be an int, got float: 1.5"),
    (dict(num_experts=4, drop_tokens=1), TypeError, r"drop_tokens must be a bool, got int: 1"),
    (dict(num_experts=4, expert_group_name=""), ValueError, r"expert_group_name must be a non-empty str"),
    (dict(num_experts=4, z_loss_coef=-1.0), ValueError, r"z_loss_coef must be a finite number in \[0, inf\), got -1.0"),
    (dict(num_experts=4, enable_expert_tensor_parallelism=True), ValueError, r"no tensor parallelism"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        moesaic.MoE(D, mlp(), **kwargs)


def test_bad_expert_and_hidden_size():
    with pytest.raises(TypeError, match="expert must be a torch.nn.Module"):
        moesaic.MoE(D, lambda x: x, num_experts=2)
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got 0"):
        moesaic.MoE(0, mlp(), num_experts=2)


def test_bad_forward_inputs():
    moe = moesaic.MoE(D, mlp(), num_experts=2)
    with pytest.raises(ValueError, match=r"last dimension hidden_size=8, got shape \(4, 7\)"):
        moe(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"used_token must have shape \(2, 3\) or \(6,\)"):
        moe(torch.randn(2, 3, D), torch.ones(5))
    with pytest.raises(ValueError, match="used_token must hold only 0 and 1"):
        moe(torch.randn(6, D), torch.full((6,), 0.5))
    with pytest.raises(TypeError, match="hidden_states must be a Tensor"):
        moe([[0.0] * D])


def test_expert_parallel_layer_without_process_group_says_what_to_do():
    moe = moesaic.MoE(D, mlp(), num_experts=4, ep_size=2)
    assert moe.num_local_experts == 2 and len(moe.experts) == 2
    with pytest.raises(RuntimeError, match="no expert-parallel process group"):
        moe(torch.randn(4, D))


class _InPlaceFirst(nn.Module):
    """An expert that scales its input in place before its first matmul."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        x.mul_(2.0)
        return self.lin(x)


@pytest.mark.parametrize("expert_factory", [mlp, _InPlaceFirst])
def test_grads_match_a_per_token_reference(expert_factory):
    # the layer re-gathers expert inputs in backward instead of keeping them; the gradients must
    # equal those of an explicit per-token loop, also for an expert that edits its input in place
    torch.manual_seed(0)
    moe = moesaic.MoE(D, expert_factory(), num_experts=3, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    x = torch.randn(12, D, requires_grad=True)
    out, _, _ = moe(x)
    out.pow(2).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in moe.experts.parameters()]

    moe.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.softmax(x2 @ moe.gate.wg.weight.t(), 1)
    top = g.topk(2, dim=1)
    rows = []
    for t in range(12):
        w = top.values[t] / top.values[t].sum()
        rows.append(sum(w[j] * moe.experts[int(top.indices[t, j])](x2[t:t + 1].clone())[0] for j in range(2)))
    torch.stack(rows).pow(2).sum().backward()
    want = [x2.grad] + [p.grad for p in moe.experts.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- DeepSpeed's module structure and state_dict keys -------------------------------------------

def test_module_structure_and_keys_are_deepspeeds():
    moe = moesaic.MoE(D, mlp(), num_experts=2, k=1, use_residual=True)
    assert list(moe.state_dict()) == [
        "deepspeed_moe.gate.wg.weight",
        "deepspeed_moe.experts.deepspeed_experts.0.0.weight", "deepspeed_moe.experts.deepspeed_experts.0.0.bias",
        "deepspeed_moe.experts.deepspeed_experts.0.2.weight", "deepspeed_moe.experts.deepspeed_experts.0.2.bias",
        "deepspeed_moe.experts.deepspeed_experts.1.0.weight", "deepspeed_moe.experts.deepspeed_experts.1.0.bias",
        "deepspeed_moe.experts.deepspeed_experts.1.2.weight", "deepspeed_moe.experts.deepspeed_experts.1.2.bias",
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "coefficient.weight", "coefficient.bias"]
    # the short names are views, not second registrations
    assert moe.gate is moe.deepspeed_moe.gate and moe.experts is moe.deepspeed_moe.experts
    assert [n for n, _ in moe.named_children()] == ["deepspeed_moe", "mlp", "coefficient"]
    with pytest.raises(AttributeError, match="read-only view of deepspeed_moe.gate"):
        moe.gate = moesaic.TopKGate(D, 2)


def test_moesaic_state_dicts_from_before_deepspeeds_keys_still_load():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("inp", nn.Linear(D, D))
    model.add_module("ffn", moesaic.MoE(D, mlp(), num_experts=2))
    old_names = {"inp.weight": "inp.weight", "inp.bias": "inp.bias",
                 "ffn.gate.wg.weight": "ffn.deepspeed_moe.gate.wg.weight"}
    for i in range(2):
        for rest in ("0.weight", "0.bias", "2.weight", "2.bias"):
            old_names[f"ffn.experts.local_experts.{i}.{rest}"] = f"ffn.deepspeed_moe.experts.deepspeed_experts.{i}.{rest}"
    source = {old: torch.randn_like(model.state_dict()[new]) for old, new in old_names.items()}
    model.load_state_dict(source, strict=True)
    for old, new in old_names.items():
        assert torch.equal(model.state_dict()[new], source[old]), old
    # the same renaming for names with a suffix (optimizer state "name::field") and at the root
    up = upgrade_legacy_keys({"ffn.gate.wg.weight::exp_avg": 1, "inp.weight::exp_avg": 2}, model)
    assert up == {"ffn.deepspeed_moe.gate.wg.weight::exp_avg": 1, "inp.weight::exp_avg": 2}
    root = moesaic.MoE(D, mlp(), num_experts=2)
    root.load_state_dict({k[len("ffn."):]: v for k, v in source.items() if k.startswith("ffn.")}, strict=True)
    assert torch.equal(root.gate.wg.weight, source["ffn.gate.wg.weight"])


# --- the dispatcher interface -------------------------------------------------------------------

class _MaskDispatcher(Dispatcher):
    """A deliberately naive dispatcher: boolean masks per expert, a Python loop to combine."""

    def __init__(self, num_experts):
        self.num_local_experts = num_experts

    def dispatch(self, x_SD, routing, together=False):
        masks = [routing.expert_idx_N == e for e in range(self.num_local_experts)]
        pieces = [x_SD[routing.token_idx_N[m]] for m in masks]
        return pieces, (routing, masks, x_SD.shape[0])

    def combine(self, outputs, meta):
        routing, masks, S = meta
        out = outputs[0].new_zeros(S, outputs[0].shape[1])
        for m, y in zip(masks, outputs):
            out = out.index_add(0, routing.token_idx_N[m], y * routing.weight_N[m, None].to(y.dtype))
        return out


def test_any_dispatcher_drives_the_same_layer():
    # the routed part has one path: swapping the dispatcher changes how tokens move, not the result
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=2, capacity_factor=0.75, top2_2nd_expert_sampling=False)
    x = torch.randn(24, D)
    runs = []
    for dispatcher in (LocalDispatcher(4), _MaskDispatcher(4)):
        moe.set_dispatcher(dispatcher)
        moe.zero_grad()
        xi = x.clone().requires_grad_(True)
        out, l_aux, _ = moe(xi)
        (out.pow(2).sum() + l_aux).backward()
        runs.append([out.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()])
    assert moe.num_dropped_routes > 0  # capacity 0.75 drops routes: the kept set is exercised
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="the dispatcher feeds 2 local experts, this layer holds 4"):
        moe.set_dispatcher(LocalDispatcher(2))
    with pytest.raises(TypeError, match="dispatcher must be a moesaic Dispatcher"):
        moe.set_dispatcher(object())


def _pieces_kept_alive(moe, x, use_saved_inputs):
    """Run dispatch + experts + combine by hand; returns (pieces still alive after forward, grads)."""
    dispatcher = moe.dispatcher
    x = x.clone().requires_grad_(True)
    routing = moe.gate(x)
    pieces, meta = dispatcher.dispatch(x, routing)
    refs = [weakref.ref(p) for p in pieces]
    with dispatcher.saved_inputs(pieces, meta) if use_saved_inputs else contextlib.nullcontext():
        outputs = moe.experts(pieces)
    del pieces
    gc.collect()
    alive = sum(r() is not None for r in refs)
    moe.zero_grad()
    dispatcher.combine(outputs, meta).pow(2).sum().backward()
    return alive, [x.grad] + [p.grad.clone() for p in moe.experts.parameters()]


def test_local_dispatcher_keeps_saved_expert_inputs_as_indices():
    # the experts' first layers save their input pieces; the dispatcher has them stored as indices
    # into the layer input (alive anyway), so no piece outlives the forward, and the grads agree
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=3, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    x = torch.randn(16, D)
    alive_plain, grads_plain = _pieces_kept_alive(moe, x, use_saved_inputs=False)
    alive_saved, grads_saved = _pieces_kept_alive(moe, x, use_saved_inputs=True)
    assert alive_plain == 3 and alive_saved == 0
    for a, b in zip(grads_plain, grads_saved):
        torch.testing.assert_close(a, b)


# --- devices ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,drop_tokens,extra", [
    (1, True, dict(use_rts=True)), (1, True, dict(use_rts=False, noisy_gate_policy="Jitter", z_loss_coef=1e-2)),
    (2, True, {}), (2, False, dict(noisy_gate_policy="RSample")), (4, True, {}), (3, False, {})])
def test_every_tensor_is_made_on_the_input_device(k, drop_tokens, extra):
    # With the default device set to "meta", a tensor made without device=... lands on meta and the
    # first op that mixes it with the CPU inputs (or reads its values) fails: a forward and backward
    # that pass here made every tensor on its inputs' device, which is what NCCL on CUDA needs.
    torch.manual_seed(0)
    moe = moesaic.MoE(D, mlp(), num_experts=4, k=k, drop_tokens=drop_tokens, use_residual=True, **extra)
    x = torch.randn(2, 16, D, requires_grad=True)
    used = torch.ones(2, 16)
    used[1, 5:] = 0
    torch.set_default_device("meta")
    try:
        out, l_aux, counts = moe(x, used)
        (out.sum() + l_aux + moe.z_loss).backward()
    finally:
        torch.set_default_device(None)
    assert out.device.type == counts.device.type == x.grad.device.type == "cpu"
    assert torch.isfinite(out).all() and int(counts.sum()) == 21 * k


# --- bad inputs (issue 11, item 15) ---------------------------------------------------------------

@pytest.mark.parametrize("layer_dtype,input_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_input_of_another_dtype_is_refused_naming_both(layer_dtype, input_dtype):
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=2).to(layer_dtype)
    with pytest.raises(TypeError, match=rf"hidden_states.*{input_dtype}.*{layer_dtype}"):
        moe(torch.randn(3, 8, dtype=input_dtype))


def test_autocast_may_mix_dtypes():
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, _ = moe(torch.randn(3, 8))
    assert out.shape == (3, 8)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_an_empty_batch_gives_an_empty_output_and_a_zero_loss(k, drop_tokens):
    moe = moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, k=k, drop_tokens=drop_tokens, z_loss_coef=0.1)
    x = torch.randn(2, 0, 8, requires_grad=True)
    out, l_aux, counts = moe(x)
    assert out.shape == (2, 0, 8) and torch.equal(counts, torch.zeros(4, dtype=torch.long))
    assert l_aux.item() == 0.0 and moe.z_loss.item() == 0.0
    (out.sum() + l_aux).backward()
    grads = [p.grad for p in moe.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("stacked", [False, True], ids=["per_module", "stacked"])
def test_a_training_step_leaves_no_reference_cycles(stacked):
    # the saved-input hooks once formed a cycle (hooks -> bound methods -> hooks) that held every
    # layer's input and routing after the step until the cyclic collector ran: memory grew by a
    # layer input per layer and step (a 2.6 MiB/step climb on a 64-expert layer)
    import gc

    moe = moesaic.MoE(D, moesaic.GLUExpert(D, 2 * D), num_experts=4, k=2, drop_tokens=False,
                      stacked_experts=stacked)

    def step():
        out, l_aux, _ = moe(torch.randn(10, D, requires_grad=True))
        (out.sum() + l_aux).backward()
        moe.zero_grad(set_to_none=True)

    step()  # the first call creates torch's one-time objects (autograd node classes)
    gc.collect()
    gc.disable()
    try:
        step()
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_expert_parallel_groups_have_the_core_s_name_and_deepspeed_s_on_moesaic_moe():
    """The core layer's call is set_expert_parallel_groups; DeepSpeed's set_deepspeed_parallelism stays, with
    DeepSpeed's signature, on moesaic.MoE, and on the core class only as a deprecated alias of the same call."""
    import inspect

    core = moesaic.MixtureOfExperts(8, moesaic.GLUExpert(8, 16), moesaic.MoEConfig(num_experts=2, k=1))
    core.set_expert_parallel_groups()
    assert core.parallel_groups.ep_size == 1 and isinstance(core.dispatcher, LocalDispatcher)
    with pytest.warns(DeprecationWarning, match=r"MixtureOfExperts\.set_deepspeed_parallelism is deprecated: call "
                                                r"set_expert_parallel_groups"):
        core.set_deepspeed_parallelism()
    ds = moesaic.MoE(8, moesaic.GLUExpert(8, 16), num_experts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.set_deepspeed_parallelism()  # DeepSpeed's own call: no warning
    assert ds.parallel_groups is core.parallel_groups  # the same cached groups
    assert list(inspect.signature(moesaic.MoE.set_deepspeed_parallelism).parameters) == [
        "self", "use_data_before_expert_parallel_"]
