"""The training engine, checkpoints and the trainer on CUDA (skipped without a GPU; ``make gpu-check``).

What only a GPU shows: a tensor created on the wrong device (every collective buffer, master
weight, optimizer state and checkpoint load must follow the parameters' device), and the same
numbers from CUDA kernels as from the CPU ones.
"""

import subprocess
import sys

import pytest
import torch
from torch import nn

import moesaic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

D, E = 16, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.ffn = moesaic.MoE(D, nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)), num_experts=E, k=2,
                               drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        moesaic.name_moe_layers(self)

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.float().pow(2).mean() + 0.01 * l_aux


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _engine(device, **cfg):
    model = Net().to(device)
    config = {"train_micro_batch_size_per_gpu": 32, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, **cfg}
    return moesaic.initialize(model=model, config=config)[0]


def _train(engine, steps, dtype=torch.float32):
    device = next(engine.module.parameters()).device
    for step in range(steps):
        x = torch.randn(32, D, generator=torch.Generator().manual_seed(step)).to(device=device, dtype=dtype)
        engine.backward(engine(x))
        engine.step()


def test_fp32_engine_on_cuda_matches_the_cpu():
    cpu, gpu = _engine("cpu"), _engine("cuda")
    _train(cpu, 4)
    _train(gpu, 4)
    assert gpu.get_global_grad_norm() == pytest.approx(cpu.get_global_grad_norm(), rel=1e-4)
    for p, q in zip(cpu.module.parameters(), gpu.module.parameters()):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.cpu(), p, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra", [{}, {"optimizer_in_backward": True, "gradient_clipping": 0.0},
                                   {"zero_optimization": {"stage": 2}}])
def test_bf16_step_keeps_everything_on_the_gpu(extra):
    engine = _engine("cuda", bf16={"enabled": True}, **extra)
    before = [p.detach().clone() for p in engine.module.parameters()]
    _train(engine, 3, torch.bfloat16)
    state = engine.optimizer.state_dict()["state"]
    for name, entry in state.items():
        for key, t in entry.items():
            if key != "step":
                assert t.device.type == "cuda" and t.dtype == torch.float32, (name, key, t.device, t.dtype)
    for p, b in zip(engine.module.parameters(), before):
        assert p.dtype == torch.bfloat16 and p.device.type == "cuda"
    assert any(not torch.equal(p, b) for p, b in zip(engine.module.parameters(), before))


def test_checkpoint_round_trip_between_cuda_and_cpu(tmp_path):
    gpu = _engine("cuda")
    _train(gpu, 2)
    gpu.save_checkpoint(tmp_path, tag="t")
    cpu = _engine("cpu")
    cpu.load_checkpoint(tmp_path, tag="t")
    for p, q in zip(gpu.module.parameters(), cpu.module.parameters()):
        assert torch.equal(p.cpu(), q)
    again = _engine("cuda")
    again.load_checkpoint(tmp_path, tag="t")
    _train(gpu, 1)
    _train(again, 1)
    for p, q in zip(gpu.module.parameters(), again.module.parameters()):
        assert q.device.type == "cuda"
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_trainer_runs_on_cuda(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moesaic", "train", "configs/tiny.toml", "--nproc", "1", "--device", "cuda",
           "--out", str(out), "--set", "model.ep_size=1", "--set", "train.steps=3", "--set", "train.eval_every=3",
           "--set", "train.eval_batches=1", "--set", "engine.train_micro_batch_size_per_gpu=4", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "summary.json").exists()
