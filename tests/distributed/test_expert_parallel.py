"""Expert parallelism must not change the mathematics of data parallelism.

On every rank, ``MoE(ep_size=P)`` must give the same outputs, ``l_aux``, ``exp_counts`` and input
and router gradients as ``MoE(ep_size=1)`` (all experts, same weights) on that rank's own batch,
and each expert's gradient on its owning rank must equal the sum over the expert-parallel group of
that expert's ep_size=1 gradients. P = 2 and 4, k = 1 and 2, capacity and dropless mode.
"""

import contextlib
import gc
import os
import sys
import time
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.layer.all_to_all import AllToAllDispatcher  # noqa: E402
from moesaic.parallel import (CollectiveError, GroupRegistry, get_expert_parallel_groups, layout,  # noqa: E402
                              reset_expert_parallel_groups)

D, E = 16, 8


def _expert():
    return nn.Sequential(nn.Linear(D, 24), nn.GELU(), nn.Linear(24, D))


class _InPlaceFirst(nn.Module):
    """An expert that scales its input in place before its first matmul (its piece cannot be re-made)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        x.mul_(2.0)
        return self.lin(x)


def _pair(ep_size, k, drop_tokens, name="ffn", expert=_expert):
    kw = dict(num_experts=E, k=k, capacity_factor=1.0, min_capacity=2, drop_tokens=drop_tokens, use_rts=False,
              top2_2nd_expert_sampling=False)
    torch.manual_seed(0)  # identical reference weights on every rank
    ref = moesaic.MoE(D, expert(), ep_size=1, expert_group_name=name, **kw)
    ep = moesaic.MoE(D, expert(), ep_size=ep_size, expert_group_name=name, **kw)
    ep.set_deepspeed_parallelism()
    L = E // ep_size
    first = ep.parallel_groups.ep_rank * L
    with torch.no_grad():
        ep.gate.wg.weight.copy_(ref.gate.wg.weight)
        for i in range(L):
            for p_ep, p_ref in zip(ep.experts[i].parameters(), ref.experts[first + i].parameters()):
                p_ep.copy_(p_ref)
    return ref, ep


def _fwd_bwd(layer, x):
    x = x.clone().requires_grad_(True)
    out, l_aux, counts = layer(x)
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (torch.sum(out * w) + 0.5 * l_aux).backward()
    return out.detach(), l_aux.detach(), counts, x.grad


def _check_equivalence(rank, world, ep_size, k, drop_tokens, tokens, expert=_expert):
    ref, ep = _pair(ep_size, k, drop_tokens, expert=expert)
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own batch
    x = torch.randn(tokens, D, generator=g) * 2
    r_out, r_aux, r_counts, r_xg = _fwd_bwd(ref, x)
    e_out, e_aux, e_counts, e_xg = _fwd_bwd(ep, x)
    tag = f"rank {rank} P={ep_size} k={k} drop={drop_tokens}"
    torch.testing.assert_close(e_out, r_out, atol=1e-5, rtol=1e-5, msg=lambda m: f"{tag} output: {m}")
    torch.testing.assert_close(e_aux, r_aux, msg=lambda m: f"{tag} l_aux: {m}")
    assert torch.equal(e_counts, r_counts), tag
    torch.testing.assert_close(e_xg, r_xg, atol=1e-5, rtol=1e-5, msg=lambda m: f"{tag} input grad: {m}")
    torch.testing.assert_close(ep.gate.wg.weight.grad, ref.gate.wg.weight.grad, atol=1e-5, rtol=1e-5)
    if drop_tokens:
        assert ep.num_dropped_routes > 0 or rank > 0 or k == 2, f"{tag}: the case should drop routes"
    # expert grads: sum of the reference grads over the expert-parallel group
    L = E // ep_size
    groups = ep.parallel_groups
    for i in range(L):
        global_i = groups.ep_rank * L + i
        assert all(p.expert_number == global_i for p in ep.experts[i].parameters())
    for e_global in range(E):
        ref_grads = [p.grad.clone() for p in ref.experts[e_global].parameters()]
        for t in ref_grads:
            dist.all_reduce(t, group=groups.ep_group)
        owner, local = divmod(e_global, L)
        if owner == groups.ep_rank:
            for p, want in zip(ep.experts[local].parameters(), ref_grads):
                torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"{tag} expert {e_global} grad: {m}")


def _equivalence_worker(rank, world, cases):
    for ep_size, k, drop_tokens in cases:
        _check_equivalence(rank, world, ep_size, k, drop_tokens, tokens=40)
    # an expert that edits its input in place: the saved-input re-assembly must step aside
    _check_equivalence(rank, world, cases[0][0], 2, False, tokens=40, expert=_InPlaceFirst)


def test_layout_matches_deepspeed():
    ep, edp = layout(8, 2)
    assert ep == [(0, 1), (2, 3), (4, 5), (6, 7)] and edp == [(0, 2, 4, 6), (1, 3, 5, 7)]
    ep, edp = layout(8, 2, data_before_expert=True)
    assert ep == [(0, 4), (1, 5), (2, 6), (3, 7)] and edp == [(0, 1, 2, 3), (4, 5, 6, 7)]
    with pytest.raises(ValueError, match=r"world size \(6\) must be divisible by ep_size \(4\)"):
        layout(6, 4)


def test_ep2_equals_data_parallel_on_2_ranks():
    cases = [(2, k, drop) for k in (1, 2) for drop in (True, False)]
    run_ranks(_equivalence_worker, 2, cases)


def test_ep4_and_ep2_equal_data_parallel_on_4_ranks():
    # P=4 (one group) and P=2 (two groups of 2, expert grads summed within each group)
    cases = [(4, k, drop) for k in (1, 2) for drop in (True, False)] + [(2, 2, False), (2, 1, True)]
    run_ranks(_equivalence_worker, 4, cases, timeout_s=240)


def _sharing_worker(rank, world):
    # two layers with different names and one ep_size share one set of groups; a third layer with
    # another ep_size gets its own; all run in one model
    model = nn.Sequential(
        moesaic.MoE(D, _expert(), num_experts=4, ep_size=2, expert_group_name="a", drop_tokens=False),
        moesaic.MoE(D, _expert(), num_experts=4, ep_size=2, expert_group_name="b"),
        moesaic.MoE(D, _expert(), num_experts=2, ep_size=1, expert_group_name="c"))
    groups = moesaic.setup_expert_parallel(model)
    assert groups["a"] is groups["b"] and groups["a"].ep_group is groups["b"].ep_group
    assert groups["c"].ep_size == 1 and groups["c"].edp_ranks == (0, 1)
    x = torch.randn(12, D, requires_grad=True)
    h = x
    for layer in model:
        h = layer(h)[0]
    h.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    numbers = sorted({p.expert_number for p in model[0].experts.parameters()})
    assert numbers == [2 * rank, 2 * rank + 1]


def test_layers_share_groups_by_ep_size_not_name():
    run_ranks(_sharing_worker, 2)


def _mismatch_worker(rank, world, what):
    if what == "tokens":
        layer = moesaic.MoE(D, _expert(), num_experts=4, ep_size=2, min_capacity=0)
        layer.set_deepspeed_parallelism()
        x = torch.randn(16 if rank == 0 else 40, D)  # capacity 4 vs 10
    else:
        layer = moesaic.MoE(D, _expert(), num_experts=4, ep_size=2, k=1 + rank)  # k differs
        layer.set_deepspeed_parallelism()
        x = torch.randn(16, D)
    layer(x)


@pytest.mark.parametrize("what,match", [("tokens", r"ranks disagree on the expert capacity in capacity mode"),
                                        ("config", r"MoE layer configuration differs between ranks")])
def test_ranks_that_disagree_fail_clearly_on_every_rank(what, match):
    errors = run_ranks(_mismatch_worker, 2, what, expect_failure=True)
    assert sorted(errors) == [0, 1]
    for tb in errors.values():
        assert "CollectiveError" in tb
        import re
        assert re.search(match, tb), tb


def _dying_worker(rank, world):
    layer = moesaic.MoE(D, _expert(), num_experts=4, ep_size=2, drop_tokens=False)
    layer.set_deepspeed_parallelism()
    layer(torch.randn(8, D))  # one good step
    if rank == 1:
        os._exit(3)  # dies mid-training
    start = time.monotonic()
    try:
        layer(torch.randn(8, D))
    except CollectiveError as err:
        elapsed = time.monotonic() - start
        assert elapsed < 30, f"took {elapsed:.0f}s to notice the dead peer"
        assert "all-to-all" in str(err)
        os._exit(0)  # the group is broken; skip the final barrier
    raise AssertionError("rank 0 kept going although rank 1 died")


def test_dead_rank_makes_the_others_fail_within_bounded_time():
    errors = run_ranks(_dying_worker, 2, expect_failure=True, pg_timeout_s=20, timeout_s=90)
    assert 0 not in errors, errors.get(0)


def _silent_worker(rank, world, pg_timeout_s, done):
    layer = moesaic.MoE(D, _expert(), num_experts=4, ep_size=2, drop_tokens=False)
    layer.set_deepspeed_parallelism()
    groups = get_expert_parallel_groups(2)
    timeout = groups.ep_group._get_backend(torch.device("cpu")).options._timeout
    assert timeout.total_seconds() == pg_timeout_s  # init_process_group's, not torch's 30 min
    layer(torch.randn(8, D))  # one good step
    if rank == 1:  # alive, but never joins the next all-to-all (as a stopped process), until rank 0 is done
        deadline = time.monotonic() + 60
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="Timed out"):  # the world group: as init_process_group was told
        dist.all_reduce(torch.ones(1))
    assert time.monotonic() - start < pg_timeout_s + 10, f"took {time.monotonic() - start:.0f}s"
    start = time.monotonic()
    try:
        layer(torch.randn(8, D))
    except CollectiveError as err:
        elapsed = time.monotonic() - start
        open(done, "w").close()
        assert elapsed < pg_timeout_s + 10, f"took {elapsed:.0f}s to give up on the silent peer"
        assert "all-to-all" in str(err)
        os._exit(0)  # the group is broken; skip the final barrier
    raise AssertionError("rank 0's all-to-all returned although rank 1 never joined it")


def test_a_silent_rank_makes_the_ep_all_to_all_fail_within_the_process_group_timeout(tmp_path):
    """The expert-parallel groups wait as long as the world group (``train.dist_timeout_s``): they were
    created without a timeout and waited torch's default of 30 minutes for a stopped peer (issue 21, item 6)."""
    errors = run_ranks(_silent_worker, 2, 4, str(tmp_path / "done"), expect_failure=True, pg_timeout_s=4,
                       timeout_s=120)
    assert not errors, errors


def test_ep_without_process_group_is_a_clear_error():
    reset_expert_parallel_groups()
    layer = moesaic.MoE(D, _expert(), num_experts=4, ep_size=2)
    with pytest.raises(RuntimeError, match="ep_size=2 needs torch.distributed"):
        layer.set_deepspeed_parallelism()


def _device_worker(rank, world):
    # "meta" as the default device: a tensor the all-to-all path made without device=... would land
    # there, and the header exchange or the first op mixing it with CPU tensors would fail
    for drop_tokens in (True, False):
        ref, ep = _pair(2, 2, drop_tokens)
        x = torch.randn(40, D, generator=torch.Generator().manual_seed(rank))
        want = _fwd_bwd(ref, x)
        w = torch.linspace(-1, 1, x.numel()).reshape(x.shape)  # _fwd_bwd's loss weights, made on the CPU
        xi = x.clone().requires_grad_(True)
        torch.set_default_device("meta")
        try:
            out, l_aux, _ = ep(xi)
            (torch.sum(out * w) + 0.5 * l_aux).backward()
        finally:
            torch.set_default_device(None)
        torch.testing.assert_close(out.detach(), want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xi.grad, want[3], atol=1e-5, rtol=1e-5)


def test_all_to_all_path_makes_every_tensor_on_the_input_device():
    run_ranks(_device_worker, 2)


def _saved_inputs_worker(rank, world):
    # dropless on 2 ranks: the received buffer is smaller than the pieces (a rank's own rows are not
    # in it), so the experts' saved inputs are kept as (layer input, received buffer) + indices and
    # no piece outlives the forward; with the plain context every piece stays alive
    _, ep = _pair(2, 2, drop_tokens=False)
    dispatcher = ep.dispatcher
    assert isinstance(dispatcher, AllToAllDispatcher)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(rank))
    results = []
    for use_saved in (False, True):
        xi = x.clone().requires_grad_(True)
        routing = ep.gate(xi)
        pieces, meta = dispatcher.dispatch(xi, routing)
        assert meta.recv is not None and meta.recv.shape[0] < sum(p.shape[0] for p in pieces)
        refs = [weakref.ref(p) for p in pieces]
        with dispatcher.saved_inputs(pieces, meta) if use_saved else contextlib.nullcontext():
            outputs = ep.experts(pieces)
        del pieces
        gc.collect()
        alive = sum(r() is not None for r in refs)
        ep.zero_grad()
        dispatcher.combine(outputs, meta).pow(2).sum().backward()
        results.append((alive, [xi.grad] + [p.grad.clone() for p in ep.experts.parameters()]))
    (alive_plain, grads_plain), (alive_saved, grads_saved) = results
    assert alive_plain == E // 2 and alive_saved == 0, (alive_plain, alive_saved)
    for a, b in zip(grads_plain, grads_saved):
        torch.testing.assert_close(a, b)


def test_all_to_all_keeps_saved_expert_inputs_as_indices():
    run_ranks(_saved_inputs_worker, 2)


def _registry_worker(rank, world):
    # an explicit registry builds its own groups; the default one is untouched
    registry = GroupRegistry()
    model = nn.Sequential(moesaic.MoE(D, _expert(), num_experts=4, ep_size=2, expert_group_name="a"))
    groups = moesaic.setup_expert_parallel(model, registry=registry)
    assert len(registry) == 1 and groups["a"] is registry.get(2)
    assert groups["a"] is not moesaic.parallel.get_expert_parallel_groups(2)
    registry.reset()
    assert len(registry) == 0
    out, _, _ = model[0](torch.randn(8, D))
    assert out.shape == (8, D)


def test_group_registry_is_explicit():
    run_ranks(_registry_worker, 2)
