"""``parallel.dtensor.full_parameters``: a model sharded by FSDP2 reads as the unsharded model for a while.

Each rank builds the model of test_fsdp (two blocks, an MoE layer each) twice with the same seeds:
one sharded by ``shard_model`` at W=2 (ep_size 1: experts sharded over both ranks; ep_size 2: each
rank's own experts, sharded over an expert-data-parallel group of one), one left whole. Inside the
block ``state_dict()`` holds plain tensors equal to the whole model's, bit for bit; a tied
parameter stays one tensor; on leaving, the same ``DTensor`` objects are back and the model trains.
"""

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from launch import run_ranks  # noqa: E402
from test_fsdp import Net, _batch  # noqa: E402

from moesaic.optim.fsdp import shard_model  # noqa: E402
from moesaic.parallel.dtensor import full_parameters, is_dtensor  # noqa: E402

pytestmark = pytest.mark.subprocess


def _run(rank, world, ep_size, stacked):
    whole = Net(ep_size, stacked).setup()
    model = Net(ep_size, stacked).setup()
    model.out.weight = model.inp.weight  # a tied parameter (as embeddings and heads are)
    whole.out.weight = whole.inp.weight
    model = shard_model(model, param_dtype=None)
    before = {name: p for name, p in model.named_parameters()}
    assert all(is_dtensor(p) for p in before.values())
    with full_parameters(model) as gathered:
        assert gathered == len(before)
        state = model.state_dict()
        assert model.out.weight is model.inp.weight
        expected = whole.state_dict()
        assert sorted(state) == sorted(expected)
        for key, value in expected.items():
            assert not is_dtensor(state[key]), key
            assert torch.equal(state[key], value), f"rank {rank} {key}"
    assert all(p is before[name] for name, p in model.named_parameters())  # the DTensors are back
    x, y = _batch(rank, 0)
    model(x, y).backward()
    assert all(p.grad is not None and is_dtensor(p.grad) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("ep_size,stacked", [(1, False), (2, True)])
def test_full_parameters_reads_as_the_unsharded_model(ep_size, stacked):
    run_ranks(_run, 2, ep_size, stacked, timeout_s=120)


def test_full_parameters_refuses_a_non_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got dict"):
        with full_parameters({}):
            pass
