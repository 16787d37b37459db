"""flops_profiler: FLOPs as torch's counter sees them, per module; an MoE layer by the tokens its experts got."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import moesaic
from moesaic.deepspeed import load_config
from moesaic.telemetry.flops import FlopsProfiler

D = 16


class Block(nn.Module):
    """A dense pre-norm attention + MLP block."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).view(x.shape[0], x.shape[1], 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(a)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = Block()
        self.moe = moesaic.MoE(D, nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)), num_experts=4, k=2,
                               drop_tokens=False, expert_group_name="moe")

    def forward(self, x):
        h, l_aux, _ = self.moe(self.block(x))
        return h.pow(2).mean() + 0.01 * l_aux


def test_dense_block_equals_torch_flop_counter():
    block = Net().block
    x = torch.randn(2, 6, D)
    prof = FlopsProfiler(block)
    with prof.forward():
        block(x)
    with FlopCounterMode(display=False) as ref:
        block(x)
    assert prof.module_flops(block) == prof.step_flops() == ref.get_total_flops() > 0
    with FlopCounterMode(display=False) as ref_mlp:
        block.mlp(torch.randn(2, 6, D))
    assert prof.module_flops(block.mlp) == ref_mlp.get_total_flops() > 0


def test_moe_layer_is_router_plus_tokens_times_expert_flops():
    net = Net()
    x = torch.randn(2, 6, D)
    prof = FlopsProfiler(net)
    with prof.forward(timed=True):
        net(x)
    layer = net.moe.deepspeed_moe
    tokens = [int(t) for t in net.moe.tokens_per_expert]
    assert len(set(tokens)) > 1  # unequal loads, or the check below would not tell them apart
    expert = layer.experts[0]
    with FlopCounterMode(display=False) as one:
        expert(torch.randn(1, D))
    h = net.block(x).reshape(-1, D)
    with FlopCounterMode(display=False) as router:
        layer.gate.wg(h.float())
    expected = router.get_total_flops() + sum(t * one.get_total_flops() for t in tokens)
    assert prof.module_flops(net.moe) == prof.module_flops(layer) == expected
    for i, t in enumerate(tokens):
        assert prof.module_flops(layer.experts[i]) == t * one.get_total_flops()
        assert prof.expert_tokens[f"moe.deepspeed_moe.experts.deepspeed_experts.{i}"] == t
    report = prof.report(0)
    assert "expert 3:" in report and f"{tokens[3]} tokens received" in report


def _engine(tmp_path, **prof):
    net = Net()
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "flops_profiler": {"enabled": True, "profile_step": 1, "module_depth": -1, "top_modules": 2,
                              "detailed": True, "output_file": str(tmp_path / "profile.txt"), **prof}}
    engine, _, _, _ = moesaic.initialize(model=net, config=cfg, log_dir=str(tmp_path / "logs"))
    return net, engine


def test_engine_profiles_the_step_and_reports_flops_every_step(tmp_path):
    net, engine = _engine(tmp_path)
    x = torch.randn(2, 6, D)
    for step in range(3):
        engine.backward(engine(x))
        engine.step()
        flops = engine.last_metrics["flops"]
        assert flops["flops"] > 0 and flops["flops_per_s"] > 0 and "mfu" not in flops  # CPU: no MFU
        assert flops["flops_per_token"] == pytest.approx(flops["flops"] / 12)  # 2 x 6 tokens into the MoE
        if step == 0:
            assert not (tmp_path / "profile.txt").exists()  # profile_step 1: after one step
    text = (tmp_path / "profile.txt").read_text()
    assert "Profile Summary at step 1:" in text and "Top 2 modules" in text
    assert "moe.deepspeed_moe.experts.deepspeed_experts.0 (Sequential)" in text
    with FlopCounterMode(display=False) as ref:  # forward + backward of the same batch, as the engine counts it
        net(x).backward()
    assert engine.last_metrics["flops"]["flops"] == pytest.approx(ref.get_total_flops(), rel=0.05)
    engine.close()


def test_engine_warns_when_profile_step_never_comes(tmp_path):
    net, engine = _engine(tmp_path, profile_step=5)
    engine.backward(engine(torch.randn(2, 6, D)))
    engine.step()
    with pytest.warns(RuntimeWarning, match=r"flops_profiler\.profile_step=5 was never reached"):
        engine.close()


@pytest.mark.parametrize("section, pattern", [
    ({"profile_step": 10}, r"flops_profiler\.profile_step=10 is beyond the run: scheduler\.params\.total_num_steps"),
    ({"module_depth": -2}, r"flops_profiler\.module_depth must be an int >= -1"),
    ({"output_file": "/no/such/folder/p.txt"}, r"flops_profiler\.output_file='/no/such/folder/p\.txt': the folder"),
    ({"recompute_fwd_factor": 0.5}, r"flops_profiler\.recompute_fwd_factor=0\.5 is not supported"),
])
def test_bad_input_names_the_key(section, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 10}},
                     "flops_profiler": {"enabled": True, **section}})
