"""FSDP2's collectives on gloo as broadcasts and reduces (moesaic.optim.fsdp_comms) equal gloo's own.

The all-gather is bitwise ``all_gather_into_tensor``'s; the reduce-scatter equals
``reduce_scatter_tensor``'s to fp32 round-off (gloo may add in another order). Checked on the world
and on sub-groups (an expert-data-parallel mesh), for the dtypes FSDP2 gathers in (bf16, fp32, and
uint8 when a unit mixes dtypes), sizes that are not multiples of anything, a gather whose input is
not already in its output slot, and zeros from a rank (an expert that saw no tokens). ``shard_model``
installs them on every gloo unit of more than one rank, and ``collectives="torch"`` keeps FSDP2's.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.optim.fsdp_comms import BroadcastAllGather, ReduceReduceScatter, uses_gloo  # noqa: E402


def _groups(rank, world):
    """The world and, at W=4, the two {r, r+2} groups (DeepSpeed's EDP groups at ep_size 2); every rank creates all."""
    out = [dist.group.WORLD]
    if world == 4:
        for ranks in ([0, 2], [1, 3]):
            g = dist.new_group(ranks)
            if rank in ranks:
                out.append(g)
    return out


def _collectives(rank, world):
    ag, rs = BroadcastAllGather(), ReduceReduceScatter()
    for group in _groups(rank, world):
        assert uses_gloo(group, "cpu")
        size, me = group.size(), group.rank()
        for n in (1, 7, 1001):
            gen = torch.Generator().manual_seed(100 * rank + n)
            for dtype in (torch.bfloat16, torch.float32, torch.uint8):
                src = (torch.randint(0, 255, (n,), generator=gen).to(dtype) if dtype == torch.uint8
                       else torch.randn(n, generator=gen).to(dtype))
                want = torch.empty(n * size, dtype=dtype)
                dist.all_gather_into_tensor(want, src, group=group)
                # in place, as FSDP2 calls it: the input is this rank's slot of the output
                got = ag.allocate((n * size,), dtype=dtype, device=torch.device("cpu"))
                got.narrow(0, me * n, n).copy_(src)
                assert ag(got, got.narrow(0, me * n, n), group) is None
                assert torch.equal(got, want), (group.size(), n, dtype)
                other = torch.full((n * size,), 3, dtype=dtype)  # an input outside the output
                ag(other, src, group)
                assert torch.equal(other, want)
            full = torch.randn(n * size, generator=gen) * (0 if rank == 1 else 1)  # rank 1 sends zeros
            want = torch.empty(n)
            dist.reduce_scatter_tensor(want, full.clone(), group=group)
            got = rs.allocate((n,), dtype=torch.float32, device=torch.device("cpu"))
            assert rs(got, full.clone(), group, dist.ReduceOp.SUM) is None
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="all-gather output holds 5 elements"):
        ag(torch.empty(5), torch.empty(2), dist.group.WORLD)
    with pytest.raises(ValueError, match="reduce-scatter input holds 5 elements"):
        rs(torch.empty(2), torch.empty(5), dist.group.WORLD, dist.ReduceOp.SUM)


@pytest.mark.parametrize("world", [2, 4])
def test_broadcast_all_gather_and_reduce_reduce_scatter_equal_gloos_own(world):
    run_ranks(_collectives, world, timeout_s=60)


def _installed(rank, world, collectives):
    from torch.distributed.fsdp import FSDPModule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), moesaic.MoE(8, nn.Linear(8, 8), num_experts=4, ep_size=2, k=1))
    moesaic.name_moe_layers(model)
    moesaic.shard_model(model, collectives=collectives)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    assert len(units) == 3  # experts (EDP mesh of W/2), router, model
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group
        fast = collectives == "auto" and group.mesh_info.shard_mesh_size > 1
        assert isinstance(group._all_gather_comm, BroadcastAllGather) == fast
        assert isinstance(group._reduce_scatter_comm, ReduceReduceScatter) == fast
    out, _, _ = model(torch.randn(6, 8))
    out.sum().backward()  # the installed collectives run a whole forward and backward


@pytest.mark.parametrize("collectives", ["auto", "torch"])
def test_shard_model_installs_them_on_gloo_units(collectives):
    run_ranks(_installed, 4, collectives, timeout_s=60)
