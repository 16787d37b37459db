"""Write tests/unit/data/checkpoint_v3_stage3_stacked_layer_group: a ZeRO stage-3 checkpoint from before
stage 3 formed per-expert optimizer groups for stacked experts (issue 24).

Until then a stacked layer's experts were one group per layer at stage 3, ``params/ffn/stacked``
(stages 0-2 form ``params/ffn/expert_<n>``), holding the layer's ``lr_scale``. Kept for provenance: it
produces that layout only when run against commit 3dc806c's sources:

    git archive 3dc806c src | tar -x -C /tmp/oldsrc
    PYTHONPATH=/tmp/oldsrc/src:tests python tests/unit/data/make_checkpoint_stage3_stacked.py

Two gloo ranks on this machine, ``tests/support/moe_net.py``'s ``MoENet(1, use_rts=False, stacked=True)``,
``moe.lr_scale {"ffn": 0.5}``, two AdamW steps at ``zero_optimization.stage 3``, then
``engine.save_checkpoint(dir, tag="step2")``; ``state_dict.safetensors`` holds the model's full
weights at that point.
"""

import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "distributed"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from support.moe_net import MoENet  # noqa: E402

OUT = Path(__file__).parent / "checkpoint_v3_stage3_stacked_layer_group"
CONFIG = {"train_micro_batch_size_per_gpu": 12, "gradient_clipping": 0.05,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
          "moe": {"lr_scale": {"ffn": 0.5}}, "zero_optimization": {"stage": 3}}


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)


def _write(rank, world):
    model = MoENet(1, use_rts=False, stacked=True)
    engine, *_ = moesaic.initialize(model=model, config=CONFIG)
    for step in range(2):
        engine.backward(engine(*batch(rank, step)))
        engine.step()
    assert "params/ffn/stacked" in [g["name"] for g in engine.optimizer.param_groups], "run against 3dc806c"
    engine.save_checkpoint(str(OUT), tag="step2")
    full = {n: p.full_tensor().contiguous() for n, p in model.named_parameters()}
    if rank == 0:
        save_file(full, str(OUT / "state_dict.safetensors"))


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    run_ranks(_write, 2, timeout_s=300)


if __name__ == "__main__":
    main()
