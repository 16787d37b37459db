"""engine.step()'s full-precision transient memory is one group, whatever the model's size.

Measured with torch's own allocator events (``torch.profiler`` with ``profile_memory=True``
reports every CPU allocation and free with its size), so the number is exact and repeatable: the
peak of bytes allocated minus bytes freed during ``engine.step()``, relative to its start.
"""

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import moesaic

D, H, E = 64, 256, 8


def transient_peak_bytes(fn) -> int:
    """Peak of (allocated - freed) bytes while ``fn`` runs, relative to its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def test_the_method_sees_a_known_allocation():
    def allocate():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # 2 MB more while a is alive
        del a, b
    assert transient_peak_bytes(allocate) == 6_000_000


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            moesaic.MoE(D, nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)), num_experts=E, k=2,
                        drop_tokens=False, top2_2nd_expert_sampling=False) for _ in range(layers))
        moesaic.name_moe_layers(self)

    def forward(self, x):
        aux = 0.0
        for block in self.blocks:
            y, l_aux, _ = block(x)
            x = x + y
            aux = aux + l_aux
        return x.float().pow(2).mean() + 0.01 * aux


def step_transient(layers, clip):
    model = Stack(layers)
    expert = sum(p.numel() for p in model.blocks[0].experts[0].parameters())
    engine, *_ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 32, "bf16": {"enabled": True}, "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "moe": {"max_group_size": expert}})
    x = torch.randn(32, D).bfloat16()
    for _ in range(2):  # the second step is measured
        engine.backward(engine(x))
        step_peak = transient_peak_bytes(engine.step)
    model_bytes = sum(p.numel() for p in model.parameters()) * 4
    return step_peak, expert * 4, model_bytes


def test_step_transient_is_one_group_while_the_model_doubles():
    for clip in (0.0, 1.0):
        small, group_bytes, small_model = step_transient(2, clip)
        large, _, large_model = step_transient(4, clip)
        # one expert's fp32 gradients plus small change (norms, bookkeeping), never the model
        assert small <= 1.25 * group_bytes + 65536, (small, group_bytes)
        assert large <= 1.25 * group_bytes + 65536, (large, group_bytes)
        assert large <= 1.1 * small + 16384, (small, large)
        assert large_model > 8 * group_bytes
