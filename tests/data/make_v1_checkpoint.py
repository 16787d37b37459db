"""Write tests/data/v1_checkpoint: a tiny checkpoint in moesaic's format 1 (rank<r>.state.pt, no manifest CRC).

Kept for provenance: format 1 is what moesaic wrote up to commit 78471a8 ("Optimizer state keyed
by identity ..."), so this script only produces format 1 when run against that commit's sources:

    git archive 78471a8 src | tar -x -C /tmp/v1src
    PYTHONPATH=/tmp/v1src/src python tests/data/make_v1_checkpoint.py

``expected.json`` records the model's output on a fixed input at save time; the test loads the
checkpoint with today's code and must reproduce it.
"""

import json
import shutil
from pathlib import Path

import torch
from torch import nn

import moesaic

OUT = Path(__file__).parent / "v1_checkpoint"


class Net(nn.Module):
    """d=4, two experts of width 4: the test builds the same architecture."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 4)
        self.ffn = moesaic.MoE(4, nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)), num_experts=2, k=1,
                               expert_group_name="ffn")

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.pow(2).mean() + 0.01 * l_aux


def main():
    engine, *_ = moesaic.initialize(model=Net(), config={
        "train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    torch.manual_seed(1)
    for _ in range(2):
        loss = engine(torch.randn(8, 4))
        engine.backward(loss)
        engine.step()
    shutil.rmtree(OUT, ignore_errors=True)
    engine.save_checkpoint(OUT, tag="step2", client_state={"note": "format 1", "position": [3, 4]})
    x = torch.linspace(-1, 1, 32).reshape(8, 4)
    engine.module.eval()
    with torch.no_grad():
        out, _, _ = engine.module.ffn(torch.tanh(engine.module.inp(x)))
    (OUT.parent / "v1_expected.json").write_text(json.dumps({
        "input": x.tolist(), "output": out.tolist(), "global_steps": engine.global_steps,
        "next_randn": torch.randn(3).tolist()}, indent=1))


if __name__ == "__main__":
    main()
