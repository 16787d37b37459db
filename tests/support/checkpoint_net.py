"""A small MoE model, engine and training loop shared by the checkpoint tests (unit and integration).

Kept importable (not inside a test file) because the integration tests run these functions in
spawned processes, which import them by module name.
"""

import torch
from torch import nn

import moesaic


class Net(nn.Module):
    def __init__(self, d=8, experts=4, name=None):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        # RTS and 2nd-expert sampling stay on: resuming must restore the RNG too
        self.ffn = moesaic.MoE(d, nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d)), num_experts=experts,
                               k=2, capacity_factor=1.0, expert_group_name=name)
        if name is None:
            moesaic.name_moe_layers(self)

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.pow(2).mean() + 0.01 * l_aux


CONFIG = {"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 1e-2}}}


def make_engine(bf16=False, **net):
    cfg = dict(CONFIG, bf16={"enabled": bf16})
    engine, *_ = moesaic.initialize(model=Net(**net), config=cfg)
    return engine


def train(engine, steps, bf16=False):
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8)  # drawn from the global RNG: resume must restore it
        loss = engine(x.bfloat16() if bf16 else x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def transient_files(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))
