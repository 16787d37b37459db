"""Aux-loss-free balancing through the engine: the bias moves once per optimizer step from the loads of
every micro-batch, stays out of the optimizer, is checkpointed with the model and shown to telemetry."""

import torch
from torch import nn

import moesaic
from moesaic.layer.balancing import expert_bias_step

D, E = 8, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.ffn = moesaic.MoE(D, moesaic.GLUExpert(D, 16), num_experts=E, k=2, drop_tokens=False,
                               score_func="sigmoid", norm_topk_prob=True, n_group=2, topk_group=1,
                               enable_expert_bias=True, bias_update_rate=0.05, seq_aux_loss_coef=1e-3,
                               top2_2nd_expert_sampling=False, expert_group_name="ffn")

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.pow(2).mean() + self.ffn.seq_aux_loss


def _config(**extra):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, **extra}


def test_engine_updates_the_bias_once_per_step_from_all_micro_batches(tmp_path):
    net = Net()
    engine, opt, _, _ = moesaic.initialize(model=net, config=_config(), log_dir=str(tmp_path / "log"))
    stepped = {id(r.param) for gi in range(len(opt.param_groups)) for r in opt.refs(gi)}
    assert id(net.ffn.gate.expert_bias) not in stepped  # a buffer: no optimizer group holds it
    g = torch.Generator().manual_seed(0)
    bias = torch.zeros(E)
    moved = False
    for step in range(3):
        counts = torch.zeros(E, dtype=torch.int64)
        for micro in range(2):
            engine.backward(engine(torch.randn(2, 5, D, generator=g)))  # 2 sequences of 5 tokens
            counts += net.ffn.exp_counts
            engine.step()
            if micro == 0:  # not a boundary: the bias waits for the step
                assert torch.equal(net.ffn.gate.expert_bias, bias)
        bias = expert_bias_step(bias, counts, 0.05)
        moved = moved or bool(bias.abs().sum() > 0)
        torch.testing.assert_close(net.ffn.gate.expert_bias, bias, rtol=0, atol=0)
        assert net.ffn.gate.expert_load.sum() == 0
        assert engine.last_metrics["moe"]["ffn"]["expert_bias"] == bias.tolist()
        assert engine.last_metrics["moe"]["ffn"]["seq_aux_loss"] > 0
    assert moved, "the loads of these batches are not balanced: the bias must have moved"

    engine.save_checkpoint(tmp_path / "ckpt", tag="t")
    other = Net()
    engine2, *_ = moesaic.initialize(model=other, config=_config())
    assert other.ffn.gate.expert_bias.abs().sum() == 0
    engine2.load_checkpoint(tmp_path / "ckpt", tag="t")
    torch.testing.assert_close(other.ffn.gate.expert_bias, bias, rtol=0, atol=0)


def test_bf16_engine_keeps_the_bias_in_fp32():
    net = Net()
    engine, *_ = moesaic.initialize(model=net, config=_config(bf16={"enabled": True}))
    assert net.inp.weight.dtype == torch.bfloat16 and net.ffn.gate.expert_bias.dtype == torch.float32
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 5, D, dtype=torch.bfloat16)))
        engine.step()
    assert net.ffn.gate.expert_bias.dtype == torch.float32
    assert set(net.ffn.gate.expert_bias.abs().tolist()) <= {0.0, torch.tensor(0.05).item()}
