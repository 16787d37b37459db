"""Ranks that start equal and agree (issue 11, items 6, 7, 8, 11), on 2 gloo ranks.

* ``initialize`` gives every rank rank 0's dense weights and each expert's weights from the first rank
  of its expert-data-parallel group (a model seeded with ``seed + rank`` used to keep its per-rank
  dense weights for the whole run, so a checkpoint, which stores one copy, could not resume it exactly);
* ranks with another engine config or another model are an error naming what differs;
* a stop (signal or deadline) seen by one rank stops every rank after the same step;
* the engine's MoE metrics cover every rank's tokens and every expert by its global number.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.parallel.agree import check_same_on_all_ranks  # noqa: E402
from moesaic.telemetry import read_csv_metrics  # noqa: E402

D, E = 8, 4
CFG = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}


class Net(nn.Module):
    def __init__(self, ep_size, width=16):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.ffn = moesaic.MoE(D, nn.Sequential(nn.Linear(D, width), nn.GELU(), nn.Linear(width, D)), num_experts=E,
                               ep_size=ep_size, k=2, expert_group_name="ffn")
        self.out = nn.Linear(D, D)

    def forward(self, x):
        h, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return self.out(h).pow(2).mean() + 0.01 * l_aux


def _gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _replicas_start_equal(rank, world, ep_size):
    torch.manual_seed(100 + rank)  # each rank draws its own weights, as a trainer seeding seed + rank does
    model = Net(ep_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense_from_rank0 = {n: _gather(p)[0] for n, p in before.items() if getattr(p, "allreduce", True)}
    assert any(not torch.equal(v, before[n]) for n, v in dense_from_rank0.items()) == (rank == 1)
    engine, *_ = moesaic.initialize(model=model, config=CFG)
    for name, p in model.named_parameters():
        if getattr(p, "allreduce", True):  # dense: rank 0's values everywhere
            assert torch.equal(p.detach(), dense_from_rank0[name]), name
        elif ep_size == 1:  # replicated experts (expert-data-parallel group = both ranks): rank 0's values
            assert torch.equal(p.detach(), _gather(before[name])[0]), name
        else:  # one copy of each expert: untouched
            assert torch.equal(p.detach(), before[name]), name
    # and they stay equal through training
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x))
    engine.step()
    for name, p in model.named_parameters():
        if getattr(p, "allreduce", True):
            copies = _gather(p.detach())
            assert torch.equal(copies[0], copies[1]), name


def _disagree(rank, world, what):
    cfg = {**CFG, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2 * (1 + rank) if what == "lr" else 1e-2}}}
    model = Net(2)
    if what == "model" and rank == 1:
        model.extra = nn.Linear(D, 3)
    with pytest.raises(ValueError) as err:
        moesaic.initialize(model=model, config=cfg)
    text = str(err.value)
    if what == "lr":
        assert "the engine config differs between ranks" in text
        assert "optimizer.params.lr: rank 0 = 0.01, rank 1 = 0.02" in text, text
    else:
        assert "the model's parameter layout differs between ranks" in text
        assert 'dense.extra.weight: rank 0 = <absent>, rank 1 = [[3, 8], "torch.float32"]' in text, text


def _stop_agreement(rank, world):
    """A signal that reached rank 1 only, or a deadline passed on rank 0 only, stops both after the same step."""
    import signal

    from moesaic.train.stop import StopRequest

    with StopRequest() as stop:
        assert stop.agree() == (None, False)
        if rank == 1:
            signal.raise_signal(signal.SIGTERM)
        assert stop.agree(out_of_time=rank == 0) == (signal.SIGTERM, True)


def _nested_difference(rank, world):
    value = {"train": {"steps": 10 + rank, "seed": 1}, "model": {"n_layer": 2}}
    with pytest.raises(ValueError, match=r"the training config differs between ranks") as err:
        check_same_on_all_ranks(value, "the training config")
    assert "train.steps: rank 0 = 10, rank 1 = 11" in str(err.value)
    assert "seed" not in str(err.value) and "n_layer" not in str(err.value)  # only what differs
    check_same_on_all_ranks({"train": {"steps": 10}}, "the training config")  # equal: nothing raised


def _global_moe_stats(rank, world, log_dir):
    torch.manual_seed(0)
    model = Net(2)
    engine, *_ = moesaic.initialize(model=model, config=CFG, log_dir=log_dir)
    layer = model.ffn
    local = []
    for _ in range(2):  # two steps, different tokens on each rank
        x = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(10 * rank + engine.global_steps))
        engine.backward(engine(x))
        local.append((layer.tokens_per_expert.clone(), layer.exp_counts.clone(), layer.num_routes,
                      layer.num_dropped_routes))
        engine.step()
        tokens, routes, num_routes, dropped = local[-1]
        want_tokens = sum(_gather(tokens)).tolist()
        want_routes = sum(_gather(routes)).tolist()
        totals = _gather(torch.tensor([num_routes, dropped]))
        stats = engine.last_metrics["moe"]["ffn"]
        assert stats["tokens_per_expert"] == want_tokens and len(want_tokens) == E
        assert stats["routes_per_expert"] == want_routes
        assert sum(want_tokens) == 2 * 4 * 6 * 2 - int(totals[0][1] + totals[1][1])  # both ranks' kept routes
        assert stats["dropped_fraction"] == pytest.approx(float(totals[0][1] + totals[1][1]) /
                                                          float(totals[0][0] + totals[1][0]))
    engine.close()
    dist.barrier()
    if rank == 0:
        series = read_csv_metrics(log_dir)
        assert sorted(k for k in series if k.startswith("moe/ffn/tokens_per_expert/")) == \
            [f"moe/ffn/tokens_per_expert/{e}" for e in range(E)]
        assert [series[f"moe/ffn/tokens_per_expert/{e}"][-1][1] for e in range(E)] == want_tokens


# one spawn per layout keeps the suite fast: each spawn of 2 ranks costs seconds of start-up
def _replicated_experts(rank, world):
    _replicas_start_equal(rank, world, ep_size=1)
    _disagree(rank, world, "lr")
    _disagree(rank, world, "model")
    _nested_difference(rank, world)
    _stop_agreement(rank, world)


def _sharded_experts(rank, world, log_dir):
    _replicas_start_equal(rank, world, ep_size=2)
    _global_moe_stats(rank, world, log_dir)


def test_w2_ep1_replicas_start_equal_and_disagreements_name_the_keys():
    run_ranks(_replicated_experts, 2, timeout_s=120)


def test_w2_ep2_replicas_start_equal_and_moe_metrics_cover_every_rank_and_expert(tmp_path):
    run_ranks(_sharded_experts, 2, str(tmp_path / "logs"), timeout_s=120)
