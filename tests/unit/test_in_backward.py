"""optimizer_in_backward: the same updates as stepping after backward, without all gradients alive at once."""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import moesaic

D, H, E = 32, 64, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.ffn = moesaic.MoE(D, nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)), num_experts=E, k=1,
                               drop_tokens=False, use_rts=False)
        self.unused = nn.Linear(D, D)  # never receives a gradient
        moesaic.name_moe_layers(self)

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.float().pow(2).mean() + 0.01 * l_aux


def make(in_backward, bf16=False, accum=1, **extra):
    model = Net()
    expert = sum(p.numel() for p in model.ffn.experts[0].parameters())
    cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": accum, "gradient_clipping": 0.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "moe": {"max_group_size": expert},
           "bf16": {"enabled": bf16}, "optimizer_in_backward": in_backward, **extra}
    return moesaic.initialize(model=model, config=cfg)[0]


@pytest.mark.parametrize("bf16,accum", [(False, 1), (True, 1), (False, 2)])
def test_same_parameters_as_stepping_after_backward(bf16, accum):
    a, b = make(False, bf16, accum), make(True, bf16, accum)
    for step in range(3):
        for micro in range(accum):
            x = torch.randn(16, D, generator=torch.Generator().manual_seed(10 * step + micro))
            x = x.bfloat16() if bf16 else x
            for e in (a, b):
                e.backward(e(x))
                e.step()
        assert b.get_global_grad_norm() == pytest.approx(a.get_global_grad_norm(), rel=1e-5)
    for (n, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(p, q), n
    assert all(p.grad is None for p in b.module.parameters())


def test_gradients_never_all_exist_at_once():
    def peak(engine):
        x = torch.randn(64, D).bfloat16()
        engine.backward(engine(x))
        engine.step()  # warm up: optimizer state exists
        loss = engine(x)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            engine.backward(loss)
            engine.step()
        level = top = 0
        for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
            level += ev.self_cpu_memory_usage
            top = max(top, level)
        return top

    after, during = make(False, bf16=True), make(True, bf16=True)
    grads_bytes = sum(p.numel() * 2 for p in after.module.parameters() if p is not after.module.unused.weight)
    saved = peak(after) - peak(during)
    assert saved >= 0.5 * grads_bytes, (saved, grads_bytes)


def test_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match=r"cannot clip by the global norm \(gradient_clipping=1.0\)"):
        make(True, gradient_clipping=1.0)
    with pytest.raises(ValueError, match=r"cannot run with fp16.enabled"):
        make(True, fp16={"enabled": True})
    with pytest.raises(ValueError, match=r"needs zero_optimization.stage 0, got 1"):
        make(True, zero_optimization={"stage": 1})


def test_a_non_finite_group_is_skipped_alone_with_a_warning():
    engine = make(True)
    poisoned = engine.module.ffn.experts[0][0].weight
    dense = engine.module.inp.weight
    before = (poisoned.detach().clone(), dense.detach().clone())
    loss = engine(torch.randn(16, D))
    poisoned.register_hook(lambda g: g * float("nan"))
    with pytest.warns(RuntimeWarning, match=r"non-finite gradients in groups \['params/ffn/expert_0'\]"):
        engine.backward(loss)
        engine.step()
    assert torch.equal(poisoned, before[0]) and not torch.equal(dense, before[1])
