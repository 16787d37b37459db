"""The MoE layer on CUDA: the same numbers as on the CPU, bf16, and expert parallelism over NCCL.

Skipped without CUDA (``make gpu-check`` runs this folder). Every check here has a CPU twin in
``tests/unit`` or ``tests/distributed``; what only a GPU shows is a tensor made on the wrong device
(NCCL refuses CPU tensors; CUDA ops refuse mixed devices) and kernels whose numbers differ.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moesaic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
from launch import run_ranks  # noqa: E402

D, E = 16, 8


def _expert():
    return nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))


def _layer(device, k, drop_tokens, **kw):
    torch.manual_seed(0)  # the same weights on both devices
    return moesaic.MoE(D, _expert(), num_experts=E, k=k, drop_tokens=drop_tokens, capacity_factor=1.0,
                       min_capacity=2, use_rts=False, top2_2nd_expert_sampling=False, **kw).to(device)


def _fwd_bwd(layer, x, used=None):
    x = x.clone().requires_grad_(True)
    out, l_aux, counts = layer(x, used)
    w = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (torch.sum(out * w) + 0.5 * l_aux).backward()
    grads = [p.grad.detach().cpu() for p in layer.parameters()]
    return out.detach().cpu(), l_aux.detach().cpu(), counts.cpu(), x.grad.cpu(), grads


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    # TF32 would change the numbers by ~1e-3; the comparison is about devices, not precision modes
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("k,drop_tokens", [(1, True), (1, False), (2, True), (2, False), (4, True), (4, False)])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_layer_matches_the_cpu_layer(k, drop_tokens, residual):
    cpu, gpu = _layer("cpu", k, drop_tokens, use_residual=residual), _layer("cuda", k, drop_tokens,
                                                                             use_residual=residual)
    x = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(1)) * 2
    used = (torch.arange(64) % 5 != 0).reshape(4, 16)
    for mode in ("train", "eval"):
        cpu.train(mode == "train")
        gpu.train(mode == "train")
        want = _fwd_bwd(cpu, x, used)
        got = _fwd_bwd(gpu, x.cuda(), used.cuda())
        assert torch.equal(got[2], want[2]), f"exp_counts differ ({mode})"
        for a, b, what in zip(got[:2] + got[3:4], want[:2] + want[3:4], ("output", "l_aux", "input grad")):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} ({mode}): {m}")
        for a, b in zip(got[4], want[4]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        cpu.zero_grad()
        gpu.zero_grad()


def test_bf16_layer_on_cuda_keeps_an_fp32_router():
    layer = _layer("cuda", 2, True).to(torch.bfloat16)
    x = torch.randn(64, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, l_aux, counts = layer(x)
    assert out.dtype == torch.bfloat16 and l_aux.dtype == torch.float32 and counts.device.type == "cuda"
    (out.float().sum() + l_aux).backward()
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(layer.gate.wg.weight.grad.float()).all()


def test_cuda_layer_matches_deepspeed_on_cuda():
    ds_layer = pytest.importorskip("deepspeed.moe.layer", reason="DeepSpeed not installed")
    kw = dict(num_experts=E, k=2, capacity_factor=1.0, min_capacity=4, drop_tokens=True, use_rts=False,
              top2_2nd_expert_sampling=False)
    torch.manual_seed(0)
    ds = ds_layer.MoE(D, _expert(), **kw).cuda()
    ours = moesaic.MoE(D, _expert(), **kw).cuda()
    ours.load_state_dict(ds.state_dict(), strict=True)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1)).cuda()
    d, o = _fwd_bwd(ds, x), _fwd_bwd(ours, x)
    torch.testing.assert_close(o[0], d[0], atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(o[1], d[1])
    assert torch.equal(o[2], d[2].long())
    torch.testing.assert_close(o[3], d[3], atol=2e-6, rtol=2e-5)


def _nccl_ep_worker(rank, world, cases):
    device = torch.device("cuda", rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    for k, drop_tokens in cases:
        torch.manual_seed(0)
        ref = _layer(device, k, drop_tokens, expert_group_name="ffn")
        ep = moesaic.MoE(D, _expert(), num_experts=E, ep_size=world, k=k, drop_tokens=drop_tokens, capacity_factor=1.0,
                         min_capacity=2, use_rts=False, top2_2nd_expert_sampling=False,
                         expert_group_name="ffn").to(device)
        ep.set_deepspeed_parallelism()
        L = E // world
        with torch.no_grad():
            ep.gate.wg.weight.copy_(ref.gate.wg.weight)
            for i in range(L):
                for a, b in zip(ep.experts[i].parameters(), ref.experts[rank * L + i].parameters()):
                    a.copy_(b)
        x = torch.randn(40, D, generator=torch.Generator().manual_seed(100 + rank)).to(device)
        want, got = _fwd_bwd(ref, x), _fwd_bwd(ep, x)
        for a, b, what in zip(got[:4], want[:4], ("output", "l_aux", "exp_counts", "input grad")):
            torch.testing.assert_close(a.to(b.dtype), b, atol=1e-5, rtol=1e-4, msg=lambda m: f"k={k} {what}: {m}")
        for e in range(E):
            grads = [p.grad.clone() for p in ref.experts[e].parameters()]
            for g in grads:
                dist.all_reduce(g)
            if e // L == rank:
                for p, g in zip(ep.experts[e % L].parameters(), grads):
                    torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs 2 GPUs")
def test_expert_parallel_over_nccl_equals_data_parallel():
    run_ranks(_nccl_ep_worker, 2, [(1, True), (2, True), (2, False)], backend="nccl", timeout_s=300)
