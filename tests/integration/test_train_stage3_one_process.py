"""`moesaic train --nproc 1` at engine.zero_optimization.stage=3 (issue 24): FSDP2 over a group of this
process alone, as DeepSpeed runs stage 3 on one process.

Two steps, then ``--resume`` of that stage-3 checkpoint to three, give stage 0's losses of three
uninterrupted steps at ``--nproc 1`` to fp32 round-off, and its weights. One process, a tiny model,
three short runs. Marked ``subprocess``.
"""

import subprocess
import sys

import pytest
import torch

from moesaic import checkpoint
from moesaic.telemetry import read_csv_metrics
from support.train_runs import TINY, W2, corpus, subprocess_env  # noqa: F401 (corpus: a fixture)
from test_train_processes import weights

pytestmark = pytest.mark.subprocess

ONE = [a if a != "2" or W2[i - 1] != "--nproc" else "1" for i, a in enumerate(W2)]


def _train(*args):
    done = subprocess.run([sys.executable, "-m", "moesaic", "train", TINY, *ONE, "--set", "model.ep_size=1", *args],
                          capture_output=True, text=True, timeout=240, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]


def test_stage3_on_one_process_trains_and_resumes_as_stage0(tmp_path, corpus):
    assert ONE[ONE.index("--nproc") + 1] == "1"
    z0, z3 = tmp_path / "z0", tmp_path / "z3"
    data = ["--data", str(corpus)]
    _train(*data, "--out", str(z0), "--set", "train.steps=3")
    stage3 = [*data, "--out", str(z3), "--set", "engine.zero_optimization.stage=3"]
    _train(*stage3, "--set", "train.steps=2")
    _train(*stage3, "--set", "train.steps=3", "--resume")
    manifest = checkpoint.read_manifest(checkpoint.resolve(z3 / "checkpoints"))
    assert manifest["format_version"] == 3 and manifest["world_size"] == 1 and manifest["step"] == 3
    ref, got = read_csv_metrics(z0 / "logs")["train/loss"], read_csv_metrics(z3 / "logs")["train/loss"]
    assert [s for s, _ in got] == [s for s, _ in ref] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in ref]),
                               atol=2e-6, rtol=1e-5)
    a, b = weights(z3), weights(z0)
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import moesaic
from support.moe_net import MoENet

def train(stage):
    model = MoENet(1, use_rts=False, stacked=True)
    engine, *_ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 12, "gradient_clipping": 0.05, "moe": {"lr_scale": {"ffn/1": 2.0}},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "zero_optimization": {"stage": stage}})
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        loss = engine(torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses, [moesaic.safe_get_full_fp32_param(p) for p in model.parameters()]

try:
    train(3)
    raise SystemExit("stage 3 without a process group was not refused")
except ValueError as err:
    assert "call moesaic.init_distributed() before moesaic.initialize" in str(err), err
assert moesaic.init_distributed() == (0, 1)
(l3, p3), (l0, p0) = train(3), train(0)
torch.testing.assert_close(torch.tensor(l3), torch.tensor(l0), atol=2e-6, rtol=1e-5)
for a, b in zip(p3, p0):
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
dist.destroy_process_group()
print("ok", l3)
"""


def test_initialize_at_stage3_in_one_plain_process_after_init_distributed():
    """`moesaic.initialize` at stage 3 without a process group names moesaic.init_distributed(); in a process
    started without a launcher that joins a group of the process alone, and stage 3 trains as stage 0."""
    import os

    env = {k: v for k, v in subprocess_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(os.path.dirname(__file__), "..")],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
