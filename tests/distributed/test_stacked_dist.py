"""Stacked experts on 2 ranks: the engine with ZeRO stage 2, gradient sync and per-expert checkpoints
gives what per-module experts give (to fp32 round-off: the stacked CPU path runs the expert's
elementwise middle over all experts' rows at once), and checkpoints reshard across ep sizes and
layouts exactly.

For ep_size 1 (expert groups owned by one of two replicas: gradients reduced onto the owner's view,
weights broadcast back into the other's) and ep_size 2: per-module and stacked experts with the
same weights train for a few steps under ZeRO-2 and under stage 0 to the same parameters. Then the
stacked run's checkpoint loads into per-module layers of the other ep size (and the per-module
run's into stacked ones), each bitwise equal to its source; at stage 0 with the optimizer state,
and training on from the loaded checkpoints stays the same. (At stage 2 the weights only: the
checkpoint store does not yet gather optimizer state that ZeRO shards over ranks.)
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.layer.identity import ExpertIndex  # noqa: E402

D, F, E, TOKENS, STEPS = 8, 12, 4, 10, 3


class Net(nn.Module):
    def __init__(self, ep_size, stacked):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.ffn = moesaic.MoE(D, moesaic.GLUExpert(D, F), num_experts=E, ep_size=ep_size, k=2, drop_tokens=False,
                               top2_2nd_expert_sampling=False, stacked_experts=stacked, expert_group_name="ffn")

    def forward(self, x, y):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return (out - y).pow(2).mean() + 0.01 * l_aux


def _engine(ep_size, stacked, stage):
    model = Net(ep_size, stacked)
    moesaic.setup_expert_parallel(model)
    with torch.no_grad():  # distinct experts, the same in both layouts: expert n shifted by 0.01 n
        for n in model.ffn.experts.local_numbers:
            for t in model.ffn.experts.expert_state_dict(n).values():
                t.add_(0.01 * n)
    engine, opt, _, _ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "moe": {"max_group_size": D * F}, "zero_optimization": {"stage": stage}})
    return model, engine, opt


def _train(engine, rank, first=0):
    for step in range(first, first + STEPS):
        for micro in range(2):
            g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
            engine.backward(engine(torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)))
            engine.step()


def _close(a, b, tag):
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps * max(1.0, float(a.abs().max())), msg=lambda m: f"{tag}: {m}")


def _experts(model):
    return {(n, name): t.clone() for n in model.ffn.experts.local_numbers
            for name, t in model.ffn.experts.expert_state_dict(n).items()}


def _dense(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "deepspeed_moe.experts" not in k}


def _worker(rank, world, root):
    for stage in (2, 0):
        for ep_size in (1, 2):
            _case(rank, world, root, stage, ep_size)


def _case(rank, world, root, stage, ep_size):
    (ma, ea, oa), (mb, eb, ob) = _engine(ep_size, False, stage), _engine(ep_size, True, stage)
    assert [g["name"] for g in oa.param_groups] == [g["name"] for g in ob.param_groups]
    assert oa.ownership() == ob.ownership()
    _train(ea, rank)
    _train(eb, rank)
    tag = f"rank {rank} stage={stage} ep_size={ep_size}"
    assert abs(ea.get_global_grad_norm() - eb.get_global_grad_norm()) <= 1e-5 * eb.get_global_grad_norm(), tag
    assert _experts(ma).keys() == _experts(mb).keys()
    for key, t in _experts(ma).items():
        _close(t, _experts(mb)[key], (tag, key))
    for key, t in _dense(ma).items():
        _close(t, _dense(mb)[key], (tag, key))
    dirs = {name: os.path.join(root, f"{name}-{stage}-{ep_size}") for name in ("modules", "stacked")}
    for name, (model, engine) in (("modules", (ma, ea)), ("stacked", (mb, eb))):
        if stage == 0:
            engine.save_checkpoint(dirs[name], tag="t")
        else:
            moesaic.checkpoint.save(dirs[name], model, tag="t", index=ExpertIndex.build(model))
    # the trained experts of each layout, gathered by number, for the reshard checks below
    trained = {}
    for name, model in (("modules", ma), ("stacked", mb)):
        parts = [None] * world
        dist.all_gather_object(parts, _experts(model))
        trained[name] = {k: v for part in parts for k, v in part.items()}
    dense = {"modules": _dense(ma), "stacked": _dense(mb)}
    other = 3 - ep_size  # 1 <-> 2
    loaded = []
    for source, stacked in (("stacked", False), ("modules", True)):
        model, engine, _ = _engine(other, stacked, stage)
        if stage == 0:
            engine.load_checkpoint(dirs[source], tag="t")
        else:
            moesaic.checkpoint.load(dirs[source], model, tag="t", index=ExpertIndex.build(model))
        for key, t in _experts(model).items():
            assert torch.equal(t, trained[source][key]), (tag, source, other, key)
        for key, t in _dense(model).items():
            assert torch.equal(t, dense[source][key]), (tag, source, other, key)
        loaded.append((model, engine))
    if stage == 0:  # the optimizer state came across too: training on stays the same
        (m1, e1), (m2, e2) = loaded
        _train(e1, rank, first=STEPS)
        _train(e2, rank, first=STEPS)
        for key, t in _experts(m1).items():
            _close(t, _experts(m2)[key], (tag, "after resuming", key))


def test_stacked_experts_train_and_reshard_like_per_module_experts(tmp_path):
    run_ranks(_worker, 2, str(tmp_path), timeout_s=240)
