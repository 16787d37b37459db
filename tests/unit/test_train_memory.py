"""The trainer's memory estimate (issue 11, item 10): parameters counted exactly (the activations against a
measured forward are in tests/integration/test_train_memory_measured.py)."""


import pytest
import torch

from moesaic.models import GPT, GPTConfig
from moesaic.train import memory

@pytest.mark.parametrize("kw", [{}, {"moe_every": 1, "moe": {"num_experts": 8}}, {"moe_every": 0},
                                {"moe": {"use_residual": True}}])
def test_parameter_count_is_exact(kw):
    cfg = GPTConfig.from_dict(kw)
    dense, per_expert = memory.param_counts(cfg)
    n_moe = sum(cfg.is_moe_block(i) for i in range(cfg.n_layer))
    assert dense + n_moe * cfg.moe.num_experts * per_expert == GPT(cfg).num_params()
    # with ep_size=2 each process holds half of every layer's experts
    half = memory.estimate(GPTConfig.from_dict({**kw, "ep_size": 2}), 1)
    assert half.params == 4 * (dense + n_moe * per_expert * cfg.moe.num_experts // 2)


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


def test_a_model_that_alone_exceeds_memory_is_named_as_the_cause_not_the_micro_batch(monkeypatch):
    # issue 21: the refusal led with the micro-batch although no micro-batch could fit
    monkeypatch.setattr(memory, "machine_memory", lambda device: (8 << 30, 8 << 30, "this machine's memory"))
    big = GPTConfig.from_dict({"n_layer": 8, "n_embd": 1024, "n_head": 8, "moe": {"num_experts": 16}})
    need = memory.estimate(big, 1)
    assert need.model_state == need.total - need.activations and need.model_state > 8 << 30 > need.activations
    over = (need.model_state - (8 << 30)) / (1 << 30)
    with pytest.raises(ValueError) as err:
        memory.check_fits(need, 1, torch.device("cpu"), key="engine.train_micro_batch_size_per_gpu",
                          model_keys="model.n_layer, model.n_embd")
    message = str(err.value)
    assert message.startswith("the model does not fit in this machine's memory (8 GiB): its parameters, gradients "
                              "and optimizer state alone need about ")
    assert f"{over:.3g} GiB more than there is" in message
    assert "lowering engine.train_micro_batch_size_per_gpu cannot help: train a smaller model (model.n_layer, " \
           "model.n_embd)" in message and "too large" not in message
    # two processes on one machine: both copies count; a GPU suggests splitting the experts
    small = memory.estimate(GPTConfig.from_dict({"n_layer": 8, "n_embd": 768, "n_head": 8, "moe": {"num_experts": 16}}), 1)
    assert small.model_state < 8 << 30 < 2 * small.model_state
    with pytest.raises(ValueError, match=r"need about 2 processes x .* GiB .* = .* GiB, .* GiB more than there is"):
        memory.check_fits(small, 2, torch.device("cpu"), key="k")
    monkeypatch.setattr(memory, "machine_memory", lambda device: (8 << 30, 8 << 30, "GPU 0 (test)"))
    with pytest.raises(ValueError, match=r"train a smaller model or its experts split over more GPUs \(model.ep_size\)"):
        memory.check_fits(need, 1, torch.device("cuda"), key="k")
    # parameters that fit, activations that do not: the micro-batch is still the one named
    with pytest.raises(ValueError, match="k is too large for this machine"):
        memory.check_fits(memory.estimate(GPTConfig(), 100_000), 1, torch.device("cpu"), key="k")
