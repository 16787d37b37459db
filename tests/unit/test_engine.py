"""moesaic.initialize: DeepSpeed-shaped training engine on one process."""

import json
import warnings

import pytest
import torch
from torch import nn

import moesaic
from moesaic.telemetry import read_csv_metrics


class Net(nn.Module):
    def __init__(self, experts=4, seed=0, aux_weight=0.01):
        super().__init__()
        self.aux_weight = aux_weight
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 8)
        self.ffn = moesaic.MoE(8, nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), num_experts=experts,
                               k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
        moesaic.name_moe_layers(self)

    def forward(self, x, y):
        out, l_aux, _ = self.ffn(torch.relu(self.inp(x)))
        return (out.float() - y).pow(2).mean() + self.aux_weight * l_aux


def config(**overrides):
    cfg = {"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "moe": {"split_by": "expert"}}
    cfg.update(overrides)
    return cfg


def batch(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, 0.5 * x.flip(1)  # a learnable target


def test_training_reduces_loss_and_counts_steps():
    engine, opt, _, sched = moesaic.initialize(model=Net(), config=config())
    x, y = batch(0, 64)
    first = None
    for _ in range(30):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        first = first if first is not None else loss.item()
    assert engine.global_steps == 30 and sched is None
    assert loss.item() < 0.5 * first
    assert {g["name"] for g in opt.param_groups} >= {"params/ffn/expert_0", "params/ffn/expert_3"}


def test_gradient_accumulation_equals_one_big_batch():
    # l_aux is not linear in the batch (mean over half batches != the full batch's), so leave it out
    x, y = batch(1, 32)
    e1, *_ = moesaic.initialize(model=Net(aux_weight=0.0), config=config(optimizer={"type": "SGD", "params": {"lr": 0.1}}))
    e2, *_ = moesaic.initialize(model=Net(aux_weight=0.0), config=config(gradient_accumulation_steps=2,
                                                          optimizer={"type": "SGD", "params": {"lr": 0.1}}))
    e1.backward(e1(x, y))
    e1.step()
    for half in (slice(0, 16), slice(16, 32)):
        assert e2.global_steps == 0
        e2.backward(e2(x[half], y[half]))
        e2.step()
    assert e2.global_steps == 1
    for p, q in zip(e1.module.parameters(), e2.module.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_clipping_uses_the_global_norm():
    x, y = batch(2, 32)
    engine, *_ = moesaic.initialize(model=Net(), config=config(gradient_clipping=0.05,
                                                               optimizer={"type": "SGD", "params": {"lr": 1.0}}))
    ref = Net()
    loss = ref(x, y)
    loss.backward()
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    before = [p.detach().clone() for p in ref.parameters()]
    engine.backward(engine(x, y))
    engine.step()
    assert engine.get_global_grad_norm() == pytest.approx(total.item(), rel=1e-5)
    for p, b, q in zip(ref.parameters(), before, engine.module.parameters()):
        torch.testing.assert_close(q, b - p.grad, atol=1e-6, rtol=1e-5)


def test_fp16_overflow_skips_and_lowers_scale():
    cfg = config(fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1})
    engine, *_ = moesaic.initialize(model=Net(), config=cfg)
    assert next(engine.module.parameters()).dtype == torch.float16
    x, y = batch(3)
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(engine(x.half(), y) * float("inf"))
    engine.step()
    assert engine.skipped_steps == 1 and engine.loss_scale == 2 ** 7
    for p, b in zip(engine.module.parameters(), before):
        assert torch.equal(p, b)
    engine.backward(engine(x.half(), y))
    engine.step()
    assert engine.skipped_steps == 1
    assert any(not torch.equal(p, b) for p, b in zip(engine.module.parameters(), before))


def test_bf16_non_finite_step_is_skipped_with_a_warning_naming_groups():
    engine, *_ = moesaic.initialize(model=Net(), config=config(bf16={"enabled": True}))
    x, y = batch(4)
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(engine(x.bfloat16(), y) * float("nan"))
    with pytest.warns(RuntimeWarning, match=r"non-finite gradients .* groups \['params'.*skipped on every rank"):
        engine.step()
    assert engine.skipped_steps == 1
    for p, b in zip(engine.module.parameters(), before):
        assert torch.equal(p, b)


def test_scheduler_and_lr_scale_and_frozen_expert():
    cfg = config(scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                           "warmup_num_steps": 10, "warmup_type": "linear"}},
                 moe={"split_by": "expert", "lr_scale": {"ffn/1": 0.5}, "freeze_experts": [3]})
    model = Net()
    frozen = [p.detach().clone() for p in model.ffn.experts[3].parameters()]
    engine, opt, _, sched = moesaic.initialize(model=model, config=cfg)
    x, y = batch(5)
    for _ in range(3):
        engine.backward(engine(x, y))
        engine.step()
    lrs = {g["name"]: g["lr"] * g["lr_scale"] for g in opt.param_groups}
    assert lrs["params/ffn/expert_1"] == pytest.approx(0.5 * lrs["params/ffn/expert_0"])
    assert "params/ffn/expert_3" not in lrs
    for p, f in zip(model.ffn.experts[3].parameters(), frozen):
        assert torch.equal(p, f)
    # DeepSpeed semantics: after 3 scheduler steps last_batch_iteration is 2 -> 0.01 * 2 / 10
    assert sched.get_last_lr()[0] == pytest.approx(0.01 * 2 / 10)


def test_telemetry_files(tmp_path):
    engine, *_ = moesaic.initialize(model=Net(), config=config(), log_dir=str(tmp_path))
    x, y = batch(6)
    for _ in range(2):
        engine.backward(engine(x, y))
        engine.step()
    engine.close()
    m = engine.last_metrics
    assert set(m["group"]) >= {"params", "params/ffn/expert_0"}
    assert m["moe"]["ffn"]["routes_per_expert"] and sum(m["moe"]["ffn"]["tokens_per_expert"]) == 32
    tags = read_csv_metrics(tmp_path / "metrics.csv")
    assert [s for s, _ in tags["train/loss"]] == [1, 2]
    assert "group/params/ffn/expert_2/update_ratio" in tags and "moe/ffn/dropped_fraction" in tags
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_load_checkpoint_discards_metrics_of_the_steps_trained_again(tmp_path):
    """A run killed at step 3 after a checkpoint at step 1: the resumed engine trains steps 2-3 again, and
    metrics.csv must hold each step once (it used to get the replayed steps' rows a second time)."""
    logs, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    engine, *_ = moesaic.initialize(model=Net(), config=config(), log_dir=str(logs))
    x, y = batch(6)
    for step in (1, 2, 3):
        engine.backward(engine(x, y))
        engine.step()
        if step == 1:
            engine.save_checkpoint(ckpt)
    engine.close()  # killed here
    assert [s for s, _ in read_csv_metrics(logs)["train/loss"]] == [1, 2, 3]
    again, *_ = moesaic.initialize(model=Net(), config=config(), log_dir=str(logs))
    again.load_checkpoint(ckpt)
    for _ in (2, 3):
        again.backward(again(x, y))
        again.step()
    again.close()
    series = read_csv_metrics(logs)
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3]
    assert all(len({s for s, _ in rows}) == len(rows) for rows in series.values())


def test_config_file_and_bad_config(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config()))
    engine, *_ = moesaic.initialize(model=Net(), config=str(path))
    assert engine.config.optimizer.type == "AdamW"
    with pytest.raises(ValueError, match="optimizr"):
        moesaic.initialize(model=Net(), config=config(optimizr={}))
    with pytest.raises(TypeError, match="loss must be a scalar tensor"):
        engine.backward(torch.ones(3))


def test_model_parameters_must_cover_the_model():
    model = Net()
    with pytest.raises(ValueError, match="trainable parameters in no optimizer group"):
        moesaic.initialize(model=model, model_parameters=list(model.ffn.parameters()), config=config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moesaic.initialize(model=model, model_parameters=[{"params": list(model.parameters()), "lr": 0.1}],
                           config=config())


def test_initialize_takes_an_engine_config_and_zero_stages():
    cfg = moesaic.deepspeed.load_config(config(zero_optimization={"stage": 0}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine, *_ = moesaic.initialize(model=Net(), config=cfg)
        assert engine.config is cfg
        # one process owns every group: stage 2 trains exactly as stage 0
        sharded, opt, *_ = moesaic.initialize(model=Net(), config=config(zero_optimization={"stage": 2}))
    assert set(opt.ownership().values()) == {0}
    x, y = batch(9)
    for e in (engine, sharded):
        e.backward(e(x, y))
        e.step()
    for p, q in zip(engine.module.parameters(), sharded.module.parameters()):
        assert torch.equal(p, q)
    # stage 3 shards with FSDP2: without a process group it is refused before any is created
    with pytest.raises(ValueError, match=r"zero_optimization.stage=3 shards parameters with torch's FSDP2 and needs "
                                         r"torch.distributed"):
        moesaic.initialize(model=Net(), config=config(zero_optimization={"stage": 3}))
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"scheduler.params.total_num_steps is required for scheduler type "
                                         r"WarmupDecayLR"):
        moesaic.initialize(model=Net(), config=config(scheduler={"type": "WarmupDecayLR"}))
