"""An MoE layer recomputed by activation checkpointing computes exactly what its first forward did.

Every router option that draws from the RNG (Jitter, RSample, 2nd-expert sampling, random token
selection) is run under ``torch.utils.checkpoint`` with ``preserve_rng_state=False`` and the RNG
moved between forward and backward, so a re-drawn routing would differ: the output and every
gradient must still equal the plain run's bit for bit, and side effects (``expert_load``, the
layer's statistics) must happen once. Both checkpoint modes, per-module and stacked experts,
nested checkpoints and a second backward (``retain_graph``) are covered.
"""

import contextlib
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moesaic

D, F, E = 8, 12, 8


def _layer(seed=0, stacked=False, **options):
    torch.manual_seed(seed)
    kw = dict(num_experts=E, expert_group_name="moe", stacked_experts=stacked)
    kw.update(options)
    layer = moesaic.MoE(D, moesaic.GLUExpert(D, F), **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


class _Block(nn.Module):
    """A residual block around the MoE layer, with dropout after it (RNG used after the layer)."""

    def __init__(self, layer, dropout=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.moe = layer
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        out, l_aux, _ = self.moe(self.norm(x))
        return x + self.drop(out), l_aux


def _run(block, x, mode, seed=5):
    """Forward (seeded), move the RNG, backward; returns outputs, grads and the layer's side effects."""
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    if mode is None:
        y, l_aux = block(x)
    else:
        y, l_aux = checkpoint(block, x, use_reentrant=(mode == "reentrant"), preserve_rng_state=False)
    torch.manual_seed(1234)  # a recompute that drew again would draw other numbers
    w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    ((y * w).sum() + l_aux).backward()
    layer = block.moe
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    stats = {"exp_counts": layer.exp_counts.clone(), "tokens_per_expert": layer.tokens_per_expert.clone(),
             "num_routes": layer.num_routes, "num_dropped": layer.num_dropped_routes}
    load = layer.gate.expert_load.clone() if layer.gate.config.enable_expert_bias else None
    return y.detach(), l_aux.detach(), x.grad.clone(), grads, stats, load


def _assert_same(a, b, what):
    ya, la, gxa, ga, sa, loada = a
    yb, lb, gxb, gb, sb, loadb = b
    assert torch.equal(ya, yb), f"{what}: output differs"
    assert torch.equal(la, lb), f"{what}: l_aux differs"
    assert torch.equal(gxa, gxb), f"{what}: input gradient differs"
    assert ga.keys() == gb.keys(), f"{what}: gradients of {sorted(ga)} vs {sorted(gb)}"
    for n in ga:
        assert torch.equal(ga[n], gb[n]), f"{what}: gradient of {n} differs by {(ga[n] - gb[n]).abs().max()}"
    for k in sa:
        assert (torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]), f"{what}: {k}"
    assert (loada is None) == (loadb is None)
    if loada is not None:
        assert torch.equal(loada, loadb), f"{what}: expert_load {loada.tolist()} vs {loadb.tolist()}"


OPTIONS = {
    "rsample_k1_rts_capacity": dict(k=1, noisy_gate_policy="RSample", use_rts=True, capacity_factor=0.5),
    "jitter_k2_sampling_capacity": dict(k=2, noisy_gate_policy="Jitter", top2_2nd_expert_sampling=True,
                                        capacity_factor=0.75),
    "k2_sampling_dropless": dict(k=2, drop_tokens=False, top2_2nd_expert_sampling=True),
    "k3_probs_drop": dict(k=3, capacity_factor=0.5, z_loss_coef=0.1),
    "expert_choice_jitter": dict(k=2, routing_type="expert_choice", noisy_gate_policy="Jitter"),
    "sigmoid_bias_groups": dict(k=2, score_func="sigmoid", enable_expert_bias=True, n_group=4, topk_group=2,
                                norm_topk_prob=True, routed_scaling_factor=2.0, top2_2nd_expert_sampling=False,
                                noisy_gate_policy="Jitter", seq_aux_loss_coef=0.1, drop_tokens=False),
    "softmax_after_topk_shared": dict(k=2, softmax_after_topk=True, router_bias=True, drop_tokens=False,
                                      top2_2nd_expert_sampling=False, shared_expert=moesaic.GLUExpert(D, F),
                                      shared_expert_gate=True),
}


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("stacked", [False, True], ids=["per_module", "stacked"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_recompute_reuses_routing_and_counts_once(name, stacked, mode):
    block = _Block(_layer(stacked=stacked, **OPTIONS[name]), dropout=0.2)
    block.train()
    x = torch.randn(3, 8, D, generator=torch.Generator().manual_seed(7))
    plain = _run(block, x, None)
    if block.moe.gate.config.enable_expert_bias:
        block.moe.gate.expert_load.zero_()
    again = _run(block, x, mode)
    _assert_same(plain, again, f"{name} {mode}")


def test_plain_training_skips_the_stack_walk(monkeypatch):
    # a plain training forward and backward never walks the Python stack (three flag reads say no
    # checkpoint runs); under a checkpoint the walk finds its region, in forward and recompute
    import moesaic.layer.recompute as rc

    real, walks = rc._scan, []
    monkeypatch.setattr(rc, "_scan", lambda: walks.append(1) or real())
    block = _Block(_layer(k=2)).train()
    x = torch.randn(2, 8, D, requires_grad=True)
    y, l_aux = block(x)
    (y.sum() + l_aux).backward()
    assert walks == []
    for reentrant in (False, True):
        y, l_aux = checkpoint(block, x, use_reentrant=reentrant)
        (y.sum() + l_aux).backward()
        assert len(walks) == 2, f"reentrant={reentrant}: {len(walks)} walks"  # forward, recompute
        walks.clear()


def test_plain_forward_has_no_recompute_state():
    # outside a checkpoint nothing is recorded or restored: the RNG moves exactly as before
    layer = _layer(k=2, noisy_gate_policy="Jitter")
    x = torch.randn(16, D)
    torch.manual_seed(3)
    layer(x)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    torch.rand(16, D)  # Jitter draws one (S, D) uniform tensor, 2nd-expert sampling one (S, E)
    torch.rand(16, E)
    assert torch.equal(after, torch.get_rng_state())


def test_nested_checkpoints_and_second_backward():
    layer = _layer(k=2, noisy_gate_policy="Jitter", capacity_factor=0.75, enable_expert_bias=True,
                   top2_2nd_expert_sampling=False)
    block = _Block(layer, dropout=0.2)
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(1))

    def run(kind):
        block.zero_grad(set_to_none=True)
        layer.gate.expert_load.zero_()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(9)
        if kind == "plain":
            y, aux = block(xi)
        else:
            def inner(t):
                return checkpoint(block, t, use_reentrant=(kind == "reentrant_in_non"), preserve_rng_state=False)
            y, aux = checkpoint(inner, xi, use_reentrant=False, preserve_rng_state=False)
        torch.manual_seed(77)
        loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + aux
        loss.backward(retain_graph=True)
        first = {n: p.grad.clone() for n, p in block.named_parameters()}
        block.zero_grad(set_to_none=True)
        torch.manual_seed(78)
        loss.backward()  # a second backward recomputes again
        second = {n: p.grad.clone() for n, p in block.named_parameters()}
        return y.detach(), first, second, layer.gate.expert_load.clone()

    ref = run("plain")
    for kind in ("non_in_non", "reentrant_in_non"):
        got = run(kind)
        assert torch.equal(ref[0], got[0]), kind
        for i in (1, 2):
            for n in ref[i]:
                assert torch.equal(ref[i][n], got[i][n]), f"{kind}: gradient {n} of backward {i}"
        assert torch.equal(ref[3], got[3]), f"{kind}: expert_load {ref[3].tolist()} vs {got[3].tolist()}"


def test_checkpointed_experts_are_not_kept_by_saved_pieces():
    # under a checkpoint the experts' saved tensors go to the checkpoint (dropped, recomputed),
    # not to the layer's own saved-input hooks, which would keep them alive until backward
    layer = _layer(k=2, drop_tokens=False, top2_2nd_expert_sampling=False, stacked=True)
    x = torch.randn(64, D, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _, _ = layer(x)
    shapes = {tuple(t.shape) for t in packed}
    assert (128, F) in shapes, f"the experts' (N, F) activations reached the outer hooks: {sorted(shapes)}"
    out.sum().backward()


# --- selective recompute policies ----------------------------------------------------------------

def _gpt():
    from moesaic.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig.from_dict(dict(n_layer=2, n_head=2, n_embd=16, block_size=16, moe_every=1, dropout=0.1,
                                        moe=dict(num_experts=4, k=2, capacity_factor=1.0))))


@pytest.mark.parametrize("policy", ["block", "moe", "experts"])
def test_policies_are_exact_on_the_gpt(policy):
    model = _gpt().train()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        _, loss, aux = model(idx, idx)
        model.objective(loss, aux).backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
            [layer.exp_counts.clone() for layer in model.moe_layers.values()]

    plain = step()
    assert moesaic.apply_recompute(model, policy)
    assert moesaic.layer.recompute_policy(model) == policy
    got = step()
    assert torch.equal(plain[0], got[0])
    for n, g in plain[1].items():
        assert torch.equal(g, got[1][n]), f"{policy}: gradient of {n}"
    assert all(torch.equal(a, b) for a, b in zip(plain[2], got[2]))
    moesaic.apply_recompute(model, "none")
    assert moesaic.layer.recompute_policy(model) == "none"
    assert torch.equal(step()[0], plain[0])


def test_policies_recompute_in_backward():
    model = _gpt().train()
    calls = []
    layer = next(iter(model.moe_layers.values()))
    layer.experts.register_forward_pre_hook(lambda *a: calls.append(1))  # a recompute may stop early
    idx = torch.randint(0, 256, (2, 16))
    for policy, runs in (("none", 1), ("experts", 2), ("moe", 2), ("block", 2)):
        moesaic.apply_recompute(model, policy)
        calls.clear()
        _, loss, aux = model(idx, idx)
        (loss + aux).backward()
        assert len(calls) == runs, f"{policy}: the experts ran {len(calls)} times"
    with torch.no_grad():  # evaluation and no_grad run plainly
        calls.clear()
        model(idx)
        assert len(calls) == 1


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="Unknown recompute policy 'all'.*'none', 'block', 'moe', 'experts'"):
        moesaic.apply_recompute(_gpt(), "all")
    with pytest.raises(ValueError, match="has none"):
        moesaic.apply_recompute(nn.Linear(2, 2), "moe")
    with pytest.raises(ValueError, match="nn.ModuleList"):
        moesaic.apply_recompute(nn.Sequential(_layer()), "block")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        moesaic.apply_recompute("gpt", "moe")


def test_train_key_and_memory_estimates_follow_the_policy():
    from moesaic.models.gpt import GPTConfig
    from moesaic.train import memory
    from moesaic.train.config import TrainConfig
    from moesaic.train.memory import hf_activation_elements_per_token as activation_elements_per_token

    with pytest.raises(ValueError, match="train.recompute"):
        TrainConfig.from_dict({"train": {"recompute": "everything"}, "engine": {"train_batch_size": 1}})
    assert TrainConfig.from_dict({"train": {"recompute": "moe"}, "engine": {"train_batch_size": 1}}).train.recompute == "moe"
    gpt = GPTConfig.from_dict(dict(n_layer=8, n_embd=64, moe_every=1, moe=dict(num_experts=8, k=2)))
    act = {p: memory.estimate(gpt, 8, recompute=p).activations for p in ("none", "experts", "moe", "block")}
    assert act["none"] > act["experts"] > act["moe"] > act["block"], act
    raw = dict(hidden_size=256, num_hidden_layers=8, vocab_size=1024, num_attention_heads=8, num_experts=64,
               num_experts_per_tok=8, intermediate_size=128)
    per = {p: activation_elements_per_token(raw, p) for p in ("none", "experts", "moe", "block")}
    assert per["none"] > per["experts"] > per["moe"] > per["block"], per


def test_deepspeed_activation_checkpointing_section():
    """DeepSpeed's section is the DeepSpeed bridge's: accepted with the values torch's checkpoint has, else refused
    with the reason; the core engine config does not hold it and says where it is read."""
    from moesaic.deepspeed import load_config
    from moesaic.engine.config import EngineConfig
    section = {"partition_activations": False, "cpu_checkpointing": False, "contiguous_memory_optimization": False,
               "number_checkpoints": None, "synchronize_checkpoint_boundary": False, "profile": False}
    cfg = load_config({"train_batch_size": 1, "activation_checkpointing": section})
    assert cfg == load_config({"train_batch_size": 1})  # it changes nothing
    for key, value, why in (("partition_activations", True, "tensor parallelism"),
                            ("cpu_checkpointing", True, "save_on_cpu"),
                            ("contiguous_memory_optimization", True, "contiguous buffer"),
                            ("number_checkpoints", 4, "contiguous_memory_optimization")):
        with pytest.raises(ValueError, match=f"activation_checkpointing.{key}.*{why}"):
            load_config({"train_batch_size": 1, "activation_checkpointing": {key: value}})
    with pytest.raises(ValueError, match=r"^activation_checkpointing is a key of DeepSpeed's config.*"
                                         r"moesaic\.initialize and moesaic\.deepspeed\.load_config"):
        EngineConfig.from_dict({"train_batch_size": 1, "activation_checkpointing": section})


@pytest.mark.parametrize("stacked", [False, True], ids=["per_module", "stacked"])
def test_checkpointed_experts_save_their_inputs_as_the_layer_input_and_indices(stacked):
    # under other saved-tensor hooks (a checkpoint drops in forward what they are handed and its
    # recompute keeps it until backward) the experts' (N_i, D) input pieces are handed over as the
    # layer input plus the routes' indices, which the recompute keeps anyway; the pieces are
    # rebuilt when the experts' backward asks for them. Gradients are those of the plain layer.
    layer = _layer(k=2, drop_tokens=False, top2_2nd_expert_sampling=False, stacked=stacked)
    x = torch.randn(64, D)
    pieces = []
    layer.experts.register_forward_pre_hook(lambda mod, args: pieces.extend(args[0]))

    def run(hooks):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        packed, unpacked = [], []

        def pack(t):
            packed.append(t)
            return t

        def unpack(t):
            unpacked.append(t)
            return t

        with (torch.autograd.graph.saved_tensors_hooks(pack, unpack) if hooks else contextlib.nullcontext()):
            out, l_aux, _ = layer(xi)
        (out.pow(2).sum() + l_aux).backward()
        return packed, unpacked, [xi.grad] + [p.grad for p in layer.parameters()]

    _, _, plain = run(hooks=False)
    pieces.clear()
    packed, unpacked, got = run(hooks=True)
    keys = {(p.data_ptr(), tuple(p.shape)) for p in pieces if p.numel()}
    assert keys, "the experts got no pieces"
    handed = [t for t in packed if (t.data_ptr(), tuple(t.shape)) in keys]
    assert not handed, f"{len(handed)} input pieces reached the outer hooks"
    assert any(t.shape == (64, D) for t in packed)  # the layer input, once more: shares its storage
    assert len(unpacked) == len(packed)  # every tensor handed to the outer hooks came back through them
    for a, b in zip(plain, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [dict(k=2), dict(k=2, z_loss_coef=0.1, seq_aux_loss_coef=0.1)],
                         ids=["l_aux", "all_losses"])
def test_losses_left_out_of_the_loss_do_not_keep_a_checkpointed_region_alive(options):
    # transformers computes its own balance loss, so the layer's l_aux (a statistic there) never runs
    # in backward. Its saved tensors, handed to the checkpoint, kept the checkpoint's bookkeeping and
    # so the region's input alive to the end of backward, and (through layer.l_aux) into the next step
    layer = _layer(drop_tokens=False, top2_2nd_expert_sampling=False, stacked=True, **options)
    block = _Block(layer)
    x = torch.randn(2, 32, D, requires_grad=True)
    h = x * 2  # the region's input: held by nothing but the checkpoint
    alive = weakref.ref(h)
    y, _ = checkpoint(block, h, use_reentrant=False)
    del h
    y.sum().backward()  # the layer's losses left out
    assert alive() is None, "the checkpointed region's input outlived its backward"
    assert layer.l_aux is not None and layer.l_aux.requires_grad  # still the layer's loss, if asked for
    plain = _Block(_layer(drop_tokens=False, top2_2nd_expert_sampling=False, stacked=True, **options))
    plain.load_state_dict(block.state_dict())
    assert torch.equal(plain(x.detach() * 2)[1], layer.l_aux.detach())  # the value without a checkpoint
