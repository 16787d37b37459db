"""The trainer's memory estimate (issue 11, item 10): parameters counted exactly (the activations against a
measured forward are in tests/integration/test_train_memory_measured.py)."""


import pytest
import torch

from moesaic.models import GPT, GPTConfig
from moesaic.train import memory

@pytest.mark.parametrize("kw", [{}, {"moe_every": 1, "num_experts": 8}, {"moe_every": 0}, {"use_residual": True}])
def test_parameter_count_is_exact(kw):
    cfg = GPTConfig.from_dict(kw)
    dense, per_expert = memory.param_counts(cfg)
    n_moe = sum(cfg.is_moe_block(i) for i in range(cfg.n_layer))
    assert dense + n_moe * cfg.num_experts * per_expert == GPT(cfg).num_params()
    # with ep_size=2 each process holds half of every layer's experts
    half = memory.estimate(GPTConfig.from_dict({**kw, "ep_size": 2}), 1)
    assert half.params == 4 * (dense + n_moe * per_expert * cfg.num_experts // 2)


def test_estimate_parts():
    cfg = GPTConfig()
    one, two = memory.estimate(cfg, 8), memory.estimate(cfg, 16)
    assert two.activations == 2 * one.activations and two.params == one.params  # activations scale with the batch
    n = one.params // 4
    assert one.grads == 4 * n and one.master == 0 and one.optimizer == 8 * n  # fp32 AdamW: two fp32 moments
    bf16 = memory.estimate(cfg, 8, dtype_bytes=2)
    assert bf16.params == 2 * n and bf16.master == 4 * n and bf16.activations < one.activations
    assert memory.estimate(cfg, 8, optimizer="SGD").optimizer == 0
    assert memory.estimate(cfg, 8, optimizer="SGD", momentum=True).optimizer == 4 * n
    assert memory.estimate(cfg, 8, zero_stage=1, replicas=2).optimizer < one.optimizer
    with pytest.raises(ValueError, match="micro_batch must be >= 1, got 0"):
        memory.estimate(cfg, 0)


def test_check_fits_refuses_with_both_figures_and_warns_when_short_now(monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda device: (8 << 30, 1 << 30, "this machine's memory"))
    need = memory.estimate(GPTConfig(), 16)  # ~0.1 GiB
    assert memory.check_fits(need, 2, torch.device("cpu"), key="k") is None
    huge = memory.estimate(GPTConfig(), 10_000)
    with pytest.raises(ValueError, match=r"k is too large for this machine: a training step needs about "
                                         r"2 processes x .* GiB \(activations .*\) = .* GiB, but this machine's "
                                         r"memory is 8 GiB; lower k"):
        memory.check_fits(huge, 2, torch.device("cpu"), key="k")
    mid = memory.estimate(GPTConfig(), 300)  # ~1.5 GiB: fits the machine, not what is free now
    assert "only 1 GiB of this machine's memory is free now" in memory.check_fits(mid, 1, torch.device("cpu"), key="k")


def test_machine_memory_reads_this_machine():
    total, available, what = memory.machine_memory(torch.device("cpu"))
    assert total > (256 << 20) and (available is None or 0 < available <= total) and "memory" in what
