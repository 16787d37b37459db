"""Expert parallelism with today's routers and expert layouts equals the 1-process layer.

On 2 gloo ranks, ``MoE(ep_size=2)`` with sigmoid scores, group-limited top-k and the aux-loss-free
bias must give, step after step, the outputs, losses and input/router gradients of ``MoE(ep_size=1)``
(all experts, same weights) on the rank's own batch; each expert's gradient on its owner is the
sum over the ranks of the reference's; and the bias, updated with the loads of both ranks, is the
same on every rank and equal to the reference's. Both models take identical SGD steps in between.
The same holds for expert-choice routing, a shared expert and stacked experts.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.layer.balancing import expert_bias_step  # noqa: E402

D, F, E, TOKENS, STEPS, LR = 8, 12, 8, 24, 3, 0.02


def _pair(options, stacked=False):
    options = dict(options)
    shared = options.pop("_shared", False)
    kw = dict(num_experts=E, expert_group_name="ffn", stacked_experts=stacked, **options)

    def extra():
        return {"shared_expert": moesaic.GLUExpert(D, F), "shared_expert_gate": True} if shared else {}

    torch.manual_seed(0)  # identical reference weights on every rank
    ref = moesaic.MoE(D, moesaic.GLUExpert(D, F), ep_size=1, **kw, **extra())
    ep = moesaic.MoE(D, moesaic.GLUExpert(D, F), ep_size=2, **kw, **extra())
    ep.set_deepspeed_parallelism()
    first = ep.experts.first_expert_number
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n in range(E):  # every expert different, the same on every rank
            for t in ref.experts.expert_state_dict(n).values():
                t.add_(0.01 * n)
        for name, p in ep.named_parameters():
            if "deepspeed_moe.experts" not in name:
                p.copy_(ref_params[name])  # router, shared expert: dense
        for n in range(first, first + E // 2):
            ep.experts.load_expert_state_dict(n, ref.experts.expert_state_dict(n))
    return ref, ep


def _expert_grads(layer, number):
    return {n: t.grad for n, t in layer.experts.expert_state_dict(number, keep_vars=True).items()} \
        if not isinstance(layer.experts, moesaic.StackedExperts) else \
        {n: p.grad[number - layer.experts.first_expert_number] for n, p in layer.experts._named_stacked()}


def _sgd(layer, dense_world_sum):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.grad is None:
                continue
            if "deepspeed_moe.experts" not in name or dense_world_sum == "all":
                dist.all_reduce(p.grad)  # dense grads (and, for the reference, every grad) summed over ranks
            p.sub_(LR * p.grad)
            p.grad = None


def _run(rank, options, stacked=False, biased=False):
    ref, ep = _pair(dict(options), stacked)
    tag = f"rank {rank} {options} stacked={stacked}"
    L, first = E // 2, ep.parallel_groups.ep_rank * (E // 2)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)  # every rank its own batch
        x = torch.randn(2, TOKENS // 2, D, generator=g)
        outs = []
        for layer in (ref, ep):
            xi = x.clone().requires_grad_(True)
            out, l_aux, counts = layer(xi)
            w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
            (torch.sum(out * w) + 0.5 * l_aux + layer.seq_aux_loss + layer.z_loss).backward()
            outs.append((out.detach(), l_aux.detach(), counts, xi.grad, layer.seq_aux_loss.detach()))
        (r_out, r_aux, r_counts, r_xg, r_seq), (e_out, e_aux, e_counts, e_xg, e_seq) = outs
        msg = f"{tag} step {step}"
        torch.testing.assert_close(e_out, r_out, atol=1e-5, rtol=1e-5, msg=lambda m: f"{msg} output: {m}")
        torch.testing.assert_close(e_aux, r_aux, msg=lambda m: f"{msg} l_aux: {m}")
        torch.testing.assert_close(e_seq, r_seq, msg=lambda m: f"{msg} seq_aux_loss: {m}")
        assert torch.equal(e_counts, r_counts), msg
        assert ep.num_unrouted_tokens == ref.num_unrouted_tokens, msg
        torch.testing.assert_close(e_xg, r_xg, atol=1e-5, rtol=1e-5, msg=lambda m: f"{msg} input grad: {m}")
        torch.testing.assert_close(ep.gate.wg.weight.grad, ref.gate.wg.weight.grad, atol=1e-5, rtol=1e-5)
        for n in range(E):
            want = {k: v.clone() for k, v in _expert_grads(ref, n).items()}
            for v in want.values():
                dist.all_reduce(v)
            if first <= n < first + L:
                for k, v in _expert_grads(ep, n).items():
                    torch.testing.assert_close(v, want[k], atol=1e-5, rtol=1e-5,
                                               msg=lambda m: f"{msg} expert {n} {k} grad: {m}")
        # identical SGD steps: the reference sums every gradient over the ranks (a data-parallel run),
        # the EP layer its dense ones (its expert gradients already hold both ranks' tokens)
        _sgd(ref, "all")
        _sgd(ep, "dense")
        if biased:
            ref_load = ref.gate.expert_load.clone()
            loads = moesaic.update_expert_bias(ep)  # all-reduces the loads of both ranks
            dist.all_reduce(ref_load)
            assert loads["ffn"] == ref_load.tolist(), msg
            with torch.no_grad():
                ref.gate.expert_bias.copy_(expert_bias_step(ref.gate.expert_bias, ref_load, 0.1))
                ref.gate.expert_load.zero_()
            assert torch.equal(ep.gate.expert_bias, ref.gate.expert_bias), msg
            both = [torch.empty(E) for _ in range(2)]
            dist.all_gather(both, ep.gate.expert_bias)
            assert torch.equal(both[0], both[1]), f"{msg}: the bias differs between ranks"
    if biased:
        assert ep.gate.expert_bias.abs().sum() > 0, f"{tag}: the bias never moved"


def _worker(rank, world):
    deepseek = dict(k=3, drop_tokens=False, score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                    n_group=4, topk_group=2, enable_expert_bias=True, bias_update_rate=0.1, seq_aux_loss_coef=0.01)
    _run(rank, deepseek, biased=True)
    _run(rank, dict(deepseek, drop_tokens=True, capacity_factor=1.0, min_capacity=1), stacked=True, biased=True)
    _run(rank, dict(k=2, routing_type="expert_choice", capacity_factor=0.75, min_capacity=1, z_loss_coef=0.01,
                    _shared=True))
    _run(rank, dict(k=2, drop_tokens=False, softmax_after_topk=True, router_bias=True,
                    top2_2nd_expert_sampling=False), stacked=True)


def test_modern_routing_ep2_equals_the_one_process_layer():
    run_ranks(_worker, 2, timeout_s=240)
