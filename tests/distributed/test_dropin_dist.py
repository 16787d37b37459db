"""DeepSpeed's engine semantics across ranks: equal starting weights, averaged gradients after backward,
full gradients and master weights from their owners at ZeRO-2, and the sharded training loader."""

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402

D, E, TOKENS = 8, 4, 6


class Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D, D)
        self.moe_1 = moesaic.MoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), num_experts=E, k=2,
                                 drop_tokens=False, top2_2nd_expert_sampling=False)
        self.out = nn.Linear(D, D)

    def forward(self, x, y):
        h, l_aux, _ = self.moe_1(torch.tanh(self.inp(x)))
        return (self.out(h) - y).pow(2).mean() + 0.01 * l_aux


def _batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def _check(rank, world):
    model = Net(seed=rank)  # different on every rank: initialize must broadcast rank 0's
    dataset = torch.utils.data.TensorDataset(torch.arange(10.))
    engine, *_ = moesaic.initialize(model=model, training_data=dataset, config={
        "train_micro_batch_size_per_gpu": TOKENS, "gradient_clipping": 0.0, "zero_optimization": {"stage": 2},
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    reference = Net(seed=0)  # rank 0's weights, one process, the global batch
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q), "every replica starts from rank 0's weights"
    loss = sum(reference(*_batch(r)) for r in range(world)) / world
    loss.backward()
    engine.backward(engine(*_batch(rank)))
    names = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        # at stage 2 the averaged gradient lives on the owner; every rank gets it from there
        full = moesaic.safe_get_full_grad(p)
        torch.testing.assert_close(full, names[name].grad, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(moesaic.safe_get_full_fp32_param(p), names[name].detach())
    owned = [p for p in model.parameters() if p.grad is not None]
    assert 0 < len(owned) < len(list(model.parameters())), "stage 2: each gradient on its owner only"
    engine.step()
    assert engine.was_step_applied() and engine.global_samples == TOKENS * world
    seen = [int(x) for (batch,) in engine.training_dataloader for x in batch]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, seen)
    assert sorted(sum(everyone, [])) == list(range(10)), "each sample on exactly one rank (10 = 2 x 5)"


def test_replicas_gradients_and_loader_across_two_ranks():
    run_ranks(_check, 2)
