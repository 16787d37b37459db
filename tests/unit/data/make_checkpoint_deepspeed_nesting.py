"""Write tests/unit/data/checkpoint_v2_deepspeed_nesting: a checkpoint of moesaic's core layer from
before the layer took its own module names (issue 23).

Until then :class:`moesaic.MixtureOfExperts` (what ``moesaic train``'s GPT and the Hugging Face
blocks are built from) held DeepSpeed's nesting: ``ffn.deepspeed_moe.gate.wg.weight``,
``ffn.deepspeed_moe.gate.expert_bias``, ``ffn.deepspeed_moe.experts.deepspeed_experts.<i>.*``.
Kept for provenance: it produces that layout only when run against commit 45dc1af's sources:

    git archive 45dc1af src | tar -x -C /tmp/nestsrc
    PYTHONPATH=/tmp/nestsrc/src python tests/unit/data/make_checkpoint_deepspeed_nesting.py

Writes ``step3/`` (``engine.save_checkpoint(dir, tag="step3")`` after 3 AdamW steps),
``state_dict.safetensors`` (the model's ``state_dict()`` at that point, DeepSpeed-nested keys) and
``expected.json`` (the losses of the next two steps computed by the same code after loading).
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import moesaic

OUT = Path(__file__).parent / "checkpoint_v2_deepspeed_nesting"
CONFIG = {"train_micro_batch_size_per_gpu": 16,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 1e-2}}}


class Net(nn.Module):
    """The core layer with an aux-loss-free bias (a buffer) and a gated shared expert."""

    def __init__(self, d=8, experts=4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        config = moesaic.MoEConfig(num_experts=experts, k=2, enable_expert_bias=True, bias_update_rate=0.01, top2_2nd_expert_sampling=False,
                                   shared_experts=1, shared_expert_gate=True)
        self.ffn = moesaic.MixtureOfExperts(d, nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d)), config,
                                            shared_expert=nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, d)))
        moesaic.name_moe_layers(self)

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.pow(2).mean() + 0.01 * l_aux


def steps(engine, n):
    losses = []
    for _ in range(n):
        loss = engine(torch.randn(16, 8))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    engine, *_ = moesaic.initialize(model=Net(), config=CONFIG)
    torch.manual_seed(1)
    steps(engine, 3)
    engine.save_checkpoint(str(OUT), tag="step3")
    save_file({k: v.contiguous() for k, v in engine.module.state_dict().items()}, str(OUT / "state_dict.safetensors"))
    again, *_ = moesaic.initialize(model=Net(), config=CONFIG)
    again.load_checkpoint(str(OUT), tag="step3")
    (OUT / "expected.json").write_text(json.dumps({"next_losses": steps(again, 2)}) + "\n")


if __name__ == "__main__":
    main()
