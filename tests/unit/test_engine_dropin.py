"""moesaic.initialize with DeepSpeed's arguments: args/config, client optimizers and schedules, the engine's
DeepSpeed surface (progress line, accumulation boundary, no_sync, checkpoints). One process, tiny model."""

import argparse
import json

import pytest
import torch
from torch import nn

import moesaic
from moesaic.deepspeed.client import ClientOptimizer

D = 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.moe_1 = moesaic.MoE(D, nn.Linear(D, D), num_experts=2, k=1, drop_tokens=False)
        self.moe_2 = moesaic.MoE(D, nn.Linear(D, D), num_experts=2, k=1, drop_tokens=False)

    def forward(self, x):
        h, a, _ = self.moe_1(self.inp(x))
        h, b, _ = self.moe_2(h)
        return h.pow(2).mean() + 0.01 * (a + b)


CFG = {"train_batch_size": 4, "gradient_clipping": 0.0}


def x():
    return torch.randn(4, D)


def steps(engine, n):
    for _ in range(n):
        engine.backward(engine(x()))
        engine.step()


# --- arguments ---------------------------------------------------------------------------------------

def test_args_deepspeed_config_and_config_params(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    engine, opt, loader, sched = moesaic.initialize(args, Net())  # DeepSpeed's positional order
    assert (engine.train_batch_size(), engine.gradient_accumulation_steps(), engine.local_rank) == (6, 3, 0)
    assert loader is None and sched is None and opt is engine.optimizer
    engine, *_ = moesaic.initialize(model=Net(), config_params={"train_batch_size": 8})
    assert engine.train_micro_batch_size_per_gpu() == 8
    with pytest.raises(ValueError, match="config was given twice: args.deepspeed_config and config"):
        moesaic.initialize(args=args, model=Net(), config=CFG)
    with pytest.raises(ValueError, match="config is required"):
        moesaic.initialize(model=Net())
    with pytest.raises(ValueError, match="mpu is not supported: moesaic has no tensor or pipeline parallelism"):
        moesaic.initialize(model=Net(), config=CFG, mpu=object())
    with pytest.raises(ValueError, match="mesh_param is not supported"):
        moesaic.initialize(model=Net(), config=CFG, mesh_param=(1, 1))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        moesaic.initialize(config=CFG)
    with pytest.raises(TypeError, match="dist_init_required must be None or a bool"):
        moesaic.initialize(model=Net(), config=CFG, dist_init_required="yes")


def test_default_names_are_made_unique():
    engine, *_ = moesaic.initialize(model=Net(), config=CFG)
    assert [m.expert_group_name for m in (engine.moe_1, engine.moe_2)] == ["moe_1", "moe_2"]


# --- client optimizers -------------------------------------------------------------------------------

@pytest.mark.parametrize("make, kind, hyper", [
    (lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2), "AdamW",
     dict(lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2)),
    (lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.2), "Adam", dict(lr=0.1, weight_decay=0.2)),
    (lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.2, decoupled_weight_decay=True), "AdamW",
     dict(lr=0.1, weight_decay=0.2)),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "SGD",
     dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.0)),
])
def test_client_optimizer_update_and_hyperparameters(make, kind, hyper):
    model = Net()
    engine, opt, *_ = moesaic.initialize(model=model, optimizer=make(model.parameters()), config=CFG)
    assert opt.kind == kind
    assert all(all(g[k] == v for k, v in hyper.items()) for g in opt.param_groups)


def test_client_groups_and_moe_helpers():
    """Per-group values survive the split; groups made by the helper keep their base name; a callable works."""
    model = Net()
    groups = moesaic.split_params_into_different_moe_groups_for_optimizer(
        [{"params": list(model.inp.parameters()), "name": "first", "lr": 0.5, "layer_id": 3},
         {"params": list(model.moe_1.parameters()) + list(model.moe_2.parameters()), "name": "rest"}])
    engine, opt, *_ = moesaic.initialize(model=model, optimizer=lambda params: torch.optim.AdamW(groups, lr=0.1),
                                         config=CFG)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["first"]["lr"] == 0.5 and by_name["first"]["layer_id"] == 3
    assert {"rest/moe_1/expert_0", "rest/moe_2/expert_1", "rest"} <= set(by_name)
    assert by_name["rest/moe_1/expert_0"]["lr"] == 0.1 and "client_group" not in by_name["rest"]


def test_client_schedule_is_followed_and_direct_edits_stay():
    model = Net()
    client = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(client, step_size=1, gamma=0.5)
    engine, opt, _, ret = moesaic.initialize(model=model, optimizer=client, lr_scheduler=sched, config=CFG)
    assert ret is sched and engine.lr_scheduler is sched
    steps(engine, 2)
    assert set(engine.get_lr()) == {0.25} and sched.get_last_lr() == [0.25]
    opt.param_groups[0]["lr"] = 7.0  # set on moesaic's group directly: kept until the client's lr changes
    assert engine.get_lr()[0] == 7.0
    steps(engine, 1)
    assert set(engine.get_lr()) == {0.125}
    # a callable schedule gets the client optimizer; a config schedule drives it too
    model = Net()
    client = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, _, _, sched = moesaic.initialize(
        model=model, optimizer=client, config=CFG,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)))
    assert sched.optimizer is client
    steps(engine, 3)
    assert set(engine.get_lr()) == {0.25}
    engine, _, _, sched = moesaic.initialize(model=Net(), config={
        **CFG, "scheduler": {"type": "StepLR", "params": {"step_size": 1, "gamma": 0.1}},
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}}})
    steps(engine, 2)
    assert engine.get_lr() == pytest.approx([0.01] * len(engine.get_lr()))
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)


def test_client_optimizer_refusals():
    model = Net()

    class Lamb(torch.optim.SGD):
        pass

    with pytest.raises(ValueError, match=r"optimizer: moesaic cannot run .*Lamb: .*allowed client optimizers: "
                                         r"torch\.optim\.Adam, torch\.optim\.AdamW"):
        moesaic.initialize(model=model, optimizer=Lamb(model.parameters(), lr=0.1), config=CFG)
    with pytest.raises(ValueError, match=r"zero_optimization\.stage=2 cannot shard .*Adagrad \(whatever "
                                         r"zero_allow_untested_optimizer says\)"):
        moesaic.initialize(model=model, optimizer=torch.optim.Adagrad(model.parameters()),
                           config={**CFG, "zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['amsgrad'\]=True is not supported"):
        moesaic.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), amsgrad=True), config=CFG)
    used = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x()).backward()
    used.step()
    with pytest.raises(ValueError, match="already holds state"):
        ClientOptimizer(used)
    other = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model_parameters and the client optimizer hold different parameters"):
        moesaic.initialize(model=Net(), optimizer=torch.optim.SGD(Net().parameters(), lr=0.1),
                           model_parameters=other.param_groups[0]["params"], config=CFG)
    with pytest.warns(UserWarning, match="client optimizer is used and the config's optimizer section is not"):
        m = Net()
        moesaic.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                           config={**CFG, "optimizer": {"type": "AdamW"}})


# --- the engine's surface ----------------------------------------------------------------------------

def test_progress_line_and_wall_clock(capsys):
    engine, *_ = moesaic.initialize(model=Net(), config={**CFG, "steps_per_print": 2, "wall_clock_breakdown": True,
                                                         "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    steps(engine, 4)
    out = capsys.readouterr().out
    assert out.count("step=") == 2 and "step=2, skipped=0, lr=[0.1" in out and "step=4, skipped=0" in out
    assert "mom=[0.0" in out and out.count("time (ms) | forward: ") == 2 and "| backward: " in out


def test_accumulation_boundary_no_sync_and_step_applied():
    engine, *_ = moesaic.initialize(model=Net(), config={"train_batch_size": 4, "gradient_accumulation_steps": 2})
    seen = []
    for _ in range(4):
        seen.append(engine.is_gradient_accumulation_boundary())
        engine.backward(engine(x()))
        engine.step()
        seen.append(engine.was_step_applied())
    assert seen == [False, False, True, True] * 2 and engine.global_steps == 2 and engine.global_samples == 8
    engine.set_gradient_accumulation_boundary(True)  # DeepSpeed's manual boundary
    engine.backward(engine(x()))
    engine.step()
    assert engine.was_step_applied() and engine.global_steps == 3
    engine.set_gradient_accumulation_boundary(None)
    with engine.no_sync():
        with pytest.raises(RuntimeError, match="step\\(\\) cannot be called inside no_sync"):
            engine.step()
        with pytest.raises(RuntimeError, match="cannot be re-entered"):
            with engine.no_sync():
                pass
    stage2, *_ = moesaic.initialize(model=Net(), config={**CFG, "zero_optimization": {"stage": 2}})
    with pytest.raises(RuntimeError, match="no_sync\\(\\) is incompatible with zero_optimization.stage=2"):
        with stage2.no_sync():
            pass


def test_non_finite_step_is_not_applied():
    engine, *_ = moesaic.initialize(model=Net(), config=CFG)
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        engine.backward(engine(x()) * float("inf"))
        engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1 and engine.global_steps == 1
    assert engine.get_global_grad_norm() != engine.get_global_grad_norm()  # nan


def test_checkpoint_arguments(tmp_path):
    model = Net()
    engine, opt, *_ = moesaic.initialize(model=model, config={**CFG, "bf16": {"enabled": True}})
    engine.backward(engine(x().bfloat16()))
    engine.step()
    engine.save_checkpoint(tmp_path, client_state={"epoch": 1})
    engine.save_checkpoint(tmp_path, tag="side", save_latest=False)
    assert (tmp_path / "latest").read_text() == "global_step1"
    with pytest.raises(ValueError, match="exclude_frozen_parameters=True is not supported"):
        engine.save_checkpoint(tmp_path, exclude_frozen_parameters=True)
    with pytest.raises(ValueError, match="load_module_strict=False is not supported"):
        engine.load_checkpoint(tmp_path, load_module_strict=False)
    with pytest.warns(RuntimeWarning, match="no checkpoint .nope. in .*: nothing loaded"):
        assert engine.load_checkpoint(tmp_path, tag="nope") == (None, None)
    # weights alone: the master weights restart from the loaded weights, the step counters stay
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    engine.backward(engine(x().bfloat16()))
    engine.step()
    path, client = engine.load_checkpoint(tmp_path, load_module_only=True)
    assert client == {"epoch": 1} and engine.global_steps == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for gi in range(len(opt.param_groups)):
        for p, m in zip(opt.param_groups[gi]["params"], opt.masters(gi)):
            assert torch.equal(m.to(torch.bfloat16), p)
    path, client = engine.load_checkpoint(tmp_path)
    assert engine.global_steps == 1 and engine.global_samples == 4


def test_dist_init_required_from_the_launcher_environment(monkeypatch):
    import socket

    import torch.distributed as dist

    from moesaic.parallel import reset_expert_parallel_groups

    assert not dist.is_initialized()
    moesaic.initialize(model=Net(), config=CFG)  # no launcher environment: one process, nothing initialised
    assert not dist.is_initialized()
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="dist_init_required=True but RANK and WORLD_SIZE are not set"):
        moesaic.initialize(model=Net(), config=CFG, dist_init_required=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    try:
        engine, *_ = moesaic.initialize(model=Net(), config=CFG)  # torchrun's variables: joins the group
        assert dist.is_initialized() and engine.world_size == 1 and engine.dp_world_size == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        reset_expert_parallel_groups()


def test_groups_split_before_initialize_with_two_layers_of_one_ep_size():
    """DeepSpeedExamples' cifar ``--moe-param-group``: the script splits before ``initialize`` names the
    layers, so DeepSpeed's grouping by ``ep_size_1`` puts expert n of both layers in one group; each
    layer gets its own groups (before: 'an optimizer group mixes tensors of different replica sets')."""
    torch.manual_seed(0)
    expert = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(4, 8), moesaic.MoE(8, expert, num_experts=2, k=1),
                          moesaic.MoE(8, expert, num_experts=4, k=1))
    groups = moesaic.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters", "lr": 0.5})
    assert any(len({id(p) for p in g["params"]}) == 4 for g in groups if g.get("moe"))  # two layers' expert 0
    engine, opt, _, _ = moesaic.initialize(model=model, model_parameters=groups,
                                           config={"train_micro_batch_size_per_gpu": 2})
    index = engine.index
    for gi, g in enumerate(opt.param_groups):
        layers = {r.expert.layer for r in opt.refs(gi) if r.expert is not None}
        assert len(layers) <= 1, (g["name"], layers)
        assert g["lr"] == 0.5
    assert sum(len(opt.refs(gi)) for gi in range(len(opt.param_groups))) == len(index.refs(trainable_only=True))
