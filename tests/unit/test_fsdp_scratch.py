"""moesaic.optim.fsdp_comms.ScratchPool: FSDP2's collective buffers reused only when nothing uses them."""

import pytest
import torch

from moesaic.optim.fsdp_comms import ReduceReduceScatter, ScratchPool


def test_a_buffer_is_reused_only_once_nothing_shares_its_storage():
    pool = ScratchPool(per_size=2)
    a = pool.get((6,), torch.float32, torch.device("cpu"))
    b = pool.get((6,), torch.float32, torch.device("cpu"))  # a is in use: another buffer
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    ptr = a.untyped_storage().data_ptr()
    view = a.narrow(0, 2, 2)
    del a
    c = pool.get((6,), torch.float32, torch.device("cpu"))  # a's view still uses it
    assert c.untyped_storage().data_ptr() != ptr
    del view
    d = pool.get((2, 3), torch.float32, torch.device("cpu"))
    assert d.untyped_storage().data_ptr() == ptr and d.shape == (2, 3)
    assert pool.owns(d[1]) and not pool.owns(torch.empty(6))
    assert pool.get((6,), torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16  # another size class
    assert len(pool) == 3  # c was over per_size: not pooled


def test_release_after_backward_empties_the_pool_when_backward_ends():
    pool = ScratchPool()
    kept = pool.get((4,), torch.float32, torch.device("cpu"))
    seen = []

    class Hook(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            pool.release_after_backward()
            pool.release_after_backward()  # once per backward
            seen.append(len(pool))  # still there while backward runs
            return g

    x = torch.ones(3, requires_grad=True)
    Hook.apply(x).sum().backward()
    assert seen == [1] and len(pool) == 0
    kept.fill_(1.0)  # a released buffer in use lives on with its user
    pool.release_after_backward()  # outside a backward: nothing happens
    assert len(pool) == 0 and not pool._release_queued


def test_reduce_scatter_allocates_its_input_from_the_pool_and_its_output_fresh():
    pool = ScratchPool()
    rs = ReduceReduceScatter(pool)
    cpu = torch.device("cpu")
    inp = rs.allocate((8,), dtype=torch.float32, device=cpu)
    out = rs.allocate((4,), dtype=torch.float32, device=cpu)
    assert pool.owns(inp) and not pool.owns(out)


def test_bad_pool_size():
    with pytest.raises(ValueError, match="per_size must be an int >= 1, got 0"):
        ScratchPool(per_size=0)
