"""A checkpoint written before the layer took DeepSpeed's module names still loads and resumes exactly."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import moesaic
from support.checkpoint_net import train

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


def _load_and_step(steps=2):
    engine, *_ = moesaic.initialize(model=Net(), config=CONFIG)
    engine.load_checkpoint(str(FIXTURE))
    return engine, train(engine, steps)


def test_old_layout_checkpoint_loads_its_tensors_bitwise():
    engine, *_ = moesaic.initialize(model=Net(), config=CONFIG)
    engine.load_checkpoint(str(FIXTURE))
    # the router was saved as "ffn.gate.wg.weight"; it now lives at DeepSpeed's path
    old_dense = load_file(FIXTURE / "step3" / "dense.safetensors")
    assert "ffn.gate.wg.weight" in old_dense
    assert torch.equal(engine.module.ffn.deepspeed_moe.gate.wg.weight, old_dense["ffn.gate.wg.weight"])
    expert_2 = load_file(FIXTURE / "step3" / "experts" / "ffn" / "2.safetensors")
    assert torch.equal(engine.module.ffn.experts[2][0].weight, expert_2["0.weight"])


def test_old_layout_checkpoint_resumes_as_the_old_code_did():
    # optimizer state, scheduler and RNG came back: the next steps are the old code's. expected.json was
    # written on another CPU, whose vectorised kernels round differently: equal to fp32 round-off, not
    # bit for bit (a wrong RNG state, optimizer state or schedule would differ in the first digits)
    _, losses = _load_and_step()
    recorded = json.loads((FIXTURE / "expected.json").read_text())["next_losses"]
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), torch.tensor(recorded, dtype=torch.float64),
                               rtol=1e-5, atol=0.0)


def test_old_layout_checkpoint_resumes_bitwise_on_this_machine():
    # the bitwise promise is a same-machine one: two loads of the checkpoint continue identically
    first, first_losses = _load_and_step()
    second, second_losses = _load_and_step()
    assert first_losses == second_losses
    for (name, a), (_, b) in zip(first.module.state_dict().items(), second.module.state_dict().items()):
        assert torch.equal(a, b), name
