"""DeepSpeed's ``deepspeed.checkpointing.checkpoint`` (its own reentrant CheckpointFunction) around a block
holding ``moesaic.MoE``: the recompute reuses the routing (Jitter noise, capacity drops), so output and
every gradient equal the plain run and ``expert_load`` counts once, with the RNG moved before backward."""

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed")

import moesaic  # noqa: E402

D = 8


def test_deepspeed_checkpoint_recomputes_exactly():
    torch.manual_seed(0)
    layer = moesaic.MoE(D, moesaic.GLUExpert(D, 12), num_experts=4, k=2, noisy_gate_policy="Jitter",
                        enable_expert_bias=True, top2_2nd_expert_sampling=False, capacity_factor=0.75)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(D)
            self.moe = layer

        def forward(self, x):
            out, l_aux, _ = self.moe(self.norm(x))
            return x + out, l_aux

    block = Block().train()
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(1))

    def run(checkpointed):
        block.zero_grad(set_to_none=True)
        layer.gate.expert_load.zero_()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        y, aux = deepspeed.checkpointing.checkpoint(block, xi) if checkpointed else block(xi)
        torch.manual_seed(77)
        ((y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + aux).backward()
        return y.detach(), {n: p.grad.clone() for n, p in block.named_parameters()}, layer.gate.expert_load.clone()

    plain, ckpt = run(False), run(True)
    assert torch.equal(plain[0], ckpt[0])
    for name, g in plain[1].items():
        assert torch.equal(g, ckpt[1][name]), name
    assert torch.equal(plain[2], ckpt[2]), (plain[2].tolist(), ckpt[2].tolist())
