"""Routing replay: a recorded forward replayed after an optimizer step sends every token to the
recorded experts, and its loss and gradients equal a forward whose router was forced there by hand."""

import pytest
import torch

import moesaic
from moesaic.layer.replay import Routes
from moesaic.layer.gate import compute_routing, route_with_decision
from moesaic.layer.recompute import replay_decision

D, F, E = 8, 12, 8


def _model(**options):
    torch.manual_seed(0)
    kw = dict(num_experts=E, k=2, expert_group_name="moe", top2_2nd_expert_sampling=True, noisy_gate_policy="Jitter",
              capacity_factor=0.5)
    kw.update(options)
    model = torch.nn.Sequential(moesaic.MoE(D, moesaic.GLUExpert(D, F), **kw))
    moesaic.name_moe_layers(model)
    return model


def _forward(model, x):
    out, l_aux, _ = model[0](x)
    return (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum() + l_aux


@pytest.mark.parametrize("options", [{}, dict(score_func="sigmoid", norm_topk_prob=True, enable_expert_bias=True,
                                              top2_2nd_expert_sampling=False, routed_scaling_factor=2.0)])
def test_replay_after_a_step_uses_the_recorded_experts(options, tmp_path):
    model = _model(**options).train()
    layer = model[0]
    x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(1))
    with moesaic.record_routing(model) as routes:
        _forward(model, x).backward()
    assert set(routes) == {"0"} and routes["0"].shape == (20, 2)
    with torch.no_grad():  # an optimizer step
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    model.zero_grad()
    routes.save(tmp_path / "r.safetensors")
    loaded = Routes.load(tmp_path / "r.safetensors")
    assert torch.equal(loaded["0"], routes["0"])
    with moesaic.replay_routing(model, loaded):
        with moesaic.record_routing(model) as again:
            torch.manual_seed(0)  # the same Jitter noise as the forward by hand below
            loss = _forward(model, x)
        loss.backward()
    assert torch.equal(again["0"], routes["0"]), "replay chose other experts"
    assert layer.num_dropped_routes == 0 and layer.exp_counts.sum() == 40  # every token, dropless
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # by hand: the router forced to the recorded experts
    model.zero_grad()
    real = layer.deepspeed_moe.gate.forward

    def forced(x_SD, used_token=None, num_sequences=1, **kw):
        kw["decision"] = replay_decision(layer, routes["0"], x_SD.shape[0], x_SD.device)
        return real(x_SD, used_token, num_sequences, **kw)

    layer.deepspeed_moe.gate.forward = forced
    torch.manual_seed(0)
    hand = _forward(model, x)
    hand.backward()
    del layer.deepspeed_moe.gate.forward
    assert torch.allclose(hand, loss, rtol=1e-6, atol=1e-7)
    for n, g in grads.items():
        assert torch.allclose(g, dict(model.named_parameters())[n].grad, rtol=1e-6, atol=1e-7), n


def test_decision_replays_compute_routing_bit_for_bit():
    from moesaic.layer.recompute import Decision
    from moesaic.layer.gate import RouterConfig
    logits = torch.randn(30, E, requires_grad=True)
    for cfg in (RouterConfig(num_experts=E, k=3, capacity_factor=0.5), RouterConfig(num_experts=E, k=2,
                norm_topk_prob=True, drop_tokens=False), RouterConfig(num_experts=E, k=2, softmax_after_topk=True,
                capacity_factor=0.5, top2_2nd_expert_sampling=False)):
        first = compute_routing(logits, cfg, training=True)
        again = route_with_decision(logits, cfg, Decision.of(first))
        for f in ("weight_N", "probs_SE", "l_aux", "z_loss", "token_idx_N", "slot_N"):
            assert torch.equal(getattr(first, f), getattr(again, f)), f


def test_expert_choice_picks_are_recorded_and_replayed():
    model = _model(routing_type="expert_choice", noisy_gate_policy=None, top2_2nd_expert_sampling=False)
    layer = model[0]
    x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(2))
    with moesaic.record_routing(model) as routes:
        first = _forward(model, x)
    C = layer.tokens_per_expert[0]
    assert routes["0"].shape == (E, C) and torch.equal(routes["0"].reshape(-1), layer._unrouted[0])
    with moesaic.replay_routing(model, routes):  # at the recording weights: the first forward, bit for bit
        assert torch.equal(_forward(model, x), first)
    first.backward()
    with torch.no_grad():  # an optimizer step
        for p in model.parameters():
            p.sub_(2.0 * p.grad)
    model.zero_grad()
    with moesaic.record_routing(model) as plain:
        _forward(model, x)
    assert not torch.equal(plain["0"], routes["0"]), "the step must change the picks for this test to mean anything"
    with moesaic.replay_routing(model, routes), moesaic.record_routing(model) as again:
        loss = _forward(model, x)
    loss.backward()
    assert torch.equal(again["0"], routes["0"]), "replay picked other tokens"
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads["0.deepspeed_moe.gate.wg.weight"].abs().sum() > 0  # the router gets its gradient
    model.zero_grad()  # by hand: the router forced to the recorded picks
    real = layer.deepspeed_moe.gate.forward

    def forced(x_SD, used_token=None, num_sequences=1, **kw):
        kw["decision"] = replay_decision(layer, routes["0"], x_SD.shape[0], x_SD.device)
        return real(x_SD, used_token, num_sequences, **kw)

    layer.deepspeed_moe.gate.forward = forced
    hand = _forward(model, x)
    hand.backward()
    del layer.deepspeed_moe.gate.forward
    assert torch.equal(hand, loss)
    for n, g in grads.items():
        assert torch.equal(g, dict(model.named_parameters())[n].grad), n


def test_replay_context_across_a_changed_batch_is_refused():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, other = torch.randn(20, D, generator=torch.Generator().manual_seed(3)), torch.randn(20, D)
    with moesaic.record_routing(model) as routes:
        model(x)
    with moesaic.replay_routing(model, routes):
        for _ in range(2):  # the same batch across optimizer steps: what replay is for
            model(x)[0].sum().backward()
            opt.step()
            opt.zero_grad()
        with pytest.raises(ValueError, match=r"batch changed inside one replay_routing context.*'argument 0' "
                                             r"\(shape \(20, 8\)\).*own replay_routing"):
            model(other)  # another batch of the same token count
    with moesaic.replay_routing(model, routes):  # a new context pins its own batch
        model(x)


def test_bad_routes_are_refused():
    model = _model()
    ok = torch.zeros(20, 2, dtype=torch.int64)
    ok[:, 1] = 1
    with pytest.raises(ValueError, match=r"\['nope'\], which are not MoE layers.*\['0'\]"):
        with moesaic.replay_routing(model, {"nope": ok}):
            pass
    with pytest.raises(ValueError, match=r"routes\['0'\] has shape \(20, 3\).*k=2.*\(S, 2\)"):
        with moesaic.replay_routing(model, {"0": torch.zeros(20, 3, dtype=torch.int64)}):
            pass
    with pytest.raises(ValueError, match=r"expert ids in \[0, 8\].*0..7"):
        with moesaic.replay_routing(model, {"0": torch.stack([ok[:, 0], torch.full((20,), 8)], 1)}):
            pass
    with pytest.raises(TypeError, match="LongTensor"):
        with moesaic.replay_routing(model, {"0": ok.float()}):
            pass
    with pytest.raises(ValueError, match=r"got 14 tokens but its routes have shape \(20, 2\)"):
        with moesaic.replay_routing(model, {"0": ok}):
            model[0](torch.randn(14, D))
    with pytest.raises(ValueError, match="no moesaic MoE layers"):
        with moesaic.replay_routing(torch.nn.Linear(2, 2), {}):
            pass
    ec = _model(routing_type="expert_choice", noisy_gate_policy=None, top2_2nd_expert_sampling=False)
    picks = torch.arange(24).reshape(E, 3) % 20
    for bad, err, match in ((picks[:, :2].float(), TypeError, r"LongTensor \(int64\) of shape \(8, C\)"),
                            (picks[:4], ValueError, r"shape \(4, 3\).*expert choice over 8 experts.*\(8, C\)"),
                            (picks - 1, ValueError, "token id -1"),
                            (torch.zeros(E, 2, dtype=torch.int64), ValueError, "pick one token twice")):
        with pytest.raises(err, match=match):
            with moesaic.replay_routing(ec, {"0": bad}):
                pass
    with pytest.raises(ValueError, match=r"got 14 tokens but its expert-choice routes \(shape \(8, 3\)\)"):
        with moesaic.replay_routing(ec, {"0": picks}):
            ec[0](torch.randn(14, D))
    with pytest.raises(ValueError, match="ran 2 forwards inside one record_routing context"):
        with moesaic.record_routing(ec):
            ec[0](torch.randn(20, D))
            ec[0](torch.randn(20, D))
    assert model[0]._replay_ids is None  # the context cleaned up after the error
