"""A checkpoint written before the layer took DeepSpeed's module names still loads and resumes exactly."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import moesaic

FIXTURE = Path(__file__).parent / "data" / "checkpoint_v1_before_deepspeed_keys"


class Net(nn.Module):
    def __init__(self, d=8, experts=4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        self.ffn = moesaic.MoE(d, nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d)), num_experts=experts,
                               k=2, capacity_factor=1.0)
        moesaic.name_moe_layers(self)

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.pow(2).mean() + 0.01 * l_aux


# gradient_clipping 0 and AdamW's weight_decay 0.01: the defaults when the fixture was written (DeepSpeed's
# defaults, 1.0 and 0.0, are moesaic's now; this checkpoint predates optimizer.json, which records the decay)
CONFIG = {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 1e-2}}}


def test_old_layout_checkpoint_loads_and_resumes_bitwise():
    engine, *_ = moesaic.initialize(model=Net(), config=CONFIG)
    engine.load_checkpoint(str(FIXTURE))
    # the router was saved as "ffn.gate.wg.weight"; it now lives at DeepSpeed's path
    old_dense = load_file(FIXTURE / "step3" / "dense.safetensors")
    assert "ffn.gate.wg.weight" in old_dense
    assert torch.equal(engine.module.ffn.deepspeed_moe.gate.wg.weight, old_dense["ffn.gate.wg.weight"])
    expert_2 = load_file(FIXTURE / "step3" / "experts" / "ffn" / "2.safetensors")
    assert torch.equal(engine.module.ffn.experts[2][0].weight, expert_2["0.weight"])
    # optimizer state, scheduler and RNG came back too: the next steps match the old code's exactly
    losses = []
    for _ in range(2):
        loss = engine(torch.randn(16, 8))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses == json.loads((FIXTURE / "expected.json").read_text())["next_losses"]
