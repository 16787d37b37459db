"""``moesaic.initialize`` as a drop-in for ``deepspeed.initialize``: conformance with DeepSpeed 0.19.8.

Each test runs the same thing through both (DeepSpeed's ``MoE`` layer and engine on one side,
moesaic's on the other; same weights, same data) and compares what a DeepSpeed user sees: the
signature and return shapes, the batch-size arithmetic, the engine's surface, the loss curve
and gradient norm of a small MoE model (fp32, ZeRO 0 and 2, a config optimizer and a client
optimizer with a client schedule), the lr sequence, the data loader, state dicts moving both
ways, and the checkpoint API. One process on gloo; DeepSpeed's Adam is asked with
``torch_adam`` so that no extension is compiled (the same update as its fused kernel).
"""

import inspect
import logging
import os
import socket

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed not installed (make parity builds .venv-deepspeed)")
from deepspeed.moe.layer import MoE as DSMoE  # noqa: E402
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402

import moesaic  # noqa: E402
from moesaic.deepspeed import load_config  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

H, E, SEQ = 8, 4, 6


def _forget_groups():
    """Drop both libraries' cached process groups (another module may have destroyed the world they lived in)."""
    from deepspeed.utils import groups

    from moesaic.parallel import reset_expert_parallel_groups
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = None
    reset_expert_parallel_groups()


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """A gloo group of one process (DeepSpeed's engine needs one); torn down if this module made it."""
    made = not torch.distributed.is_initialized()
    _forget_groups()
    if made:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    if made:
        torch.distributed.destroy_process_group()
        _forget_groups()


class Net(nn.Module):
    """DeepSpeed's test model shape: dense -> MoE -> dense -> MoE -> head, a cross-entropy loss."""

    def __init__(self, moe_cls):
        super().__init__()
        expert = nn.Sequential(nn.Linear(H, 2 * H), nn.ReLU(), nn.Linear(2 * H, H))
        kw = dict(num_experts=E, k=1, use_rts=False, min_capacity=2 * SEQ)  # room for every token of a micro-batch
        self.linear1 = nn.Linear(H, H)
        self.moe_1 = moe_cls(H, expert, **kw)
        self.linear2 = nn.Linear(H, H)
        self.moe_2 = moe_cls(H, expert, **kw)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x, y):
        h = self.linear1(x)
        out, aux1, _ = self.moe_1(h)
        out, aux2, _ = self.moe_2(self.linear2(out))
        return self.loss((h + out).mean(1), y) + 0.01 * (aux1 + aux2)


def pair():
    """A DeepSpeed model and a moesaic model holding the same weights (moved with plain load_state_dict)."""
    torch.manual_seed(0)
    ds = Net(DSMoE)
    ours = Net(moesaic.MoE)
    ours.load_state_dict(ds.state_dict(), strict=True)
    return ds, ours


def batches(n, micro=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(micro, SEQ, H, generator=g), torch.randint(0, H, (micro,), generator=g)) for _ in range(n)]


def train(engine, data):
    losses, norms = [], []
    for x, y in data:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if engine.was_step_applied():
            norms.append(engine.get_global_grad_norm())
    return losses, norms


def params_of(engine):
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


# --- signature and arithmetic ------------------------------------------------------------------------

def test_signature_is_deepspeeds():
    ds = inspect.signature(deepspeed.initialize).parameters
    ours = inspect.signature(moesaic.initialize).parameters
    positional = [n for n, p in ours.items() if p.kind is not p.KEYWORD_ONLY]
    assert positional == list(ds)
    assert [ours[n].default for n in positional] == [ds[n].default for n in ds]
    assert [n for n, p in ours.items() if p.kind is p.KEYWORD_ONLY] == ["log_dir", "telemetry_every"]
    for method, extra in (("save_checkpoint", ("model_config", "keep_last")), ("load_checkpoint", ())):
        ds_m = list(inspect.signature(getattr(deepspeed.DeepSpeedEngine, method)).parameters)
        ours_m = list(inspect.signature(getattr(moesaic.MoEEngine, method)).parameters)
        assert ours_m == ds_m + list(extra), method


@pytest.mark.parametrize("sizes", [dict(train_batch_size=32, train_micro_batch_size_per_gpu=4),
                                   dict(train_batch_size=32, gradient_accumulation_steps=2),
                                   dict(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=3),
                                   dict(train_batch_size=24), dict(train_micro_batch_size_per_gpu=5),
                                   dict(train_batch_size=32, train_micro_batch_size_per_gpu=4,
                                        gradient_accumulation_steps=2),
                                   dict(train_batch_size=30, train_micro_batch_size_per_gpu=4),
                                   dict(train_batch_size=2)])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_arithmetic_is_deepspeeds(sizes, world):
    """DeepSpeed's own resolution (its DeepSpeedConfig code, world size set by hand) against check_batch."""
    ds = DeepSpeedConfig.__new__(DeepSpeedConfig)
    ds.world_size = world
    ds.train_batch_size = sizes.get("train_batch_size")
    ds.train_micro_batch_size_per_gpu = sizes.get("train_micro_batch_size_per_gpu")
    ds.gradient_accumulation_steps = sizes.get("gradient_accumulation_steps")
    try:
        ds._configure_train_batch_size()
        expected = (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps)
    except AssertionError:
        expected = None
    try:
        got = load_config(sizes).check_batch(world)
    except ValueError:
        got = None
    assert got == expected


# --- the engine ----------------------------------------------------------------------------------------

def _configs(stage):
    return {"train_batch_size": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "steps_per_print": 100, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "Adam", "params": {"lr": 2e-2, "weight_decay": 0.1, "torch_adam": True}}}


@pytest.mark.parametrize("stage", [0, 2])
def test_same_losses_norms_and_weights_as_deepspeed(stage):
    """fp32, a config optimizer (DeepSpeed's Adam: decoupled weight decay), clipping, accumulation over 2."""
    ds_model, our_model = pair()
    ds, *_ = deepspeed.initialize(model=ds_model, model_parameters=ds_model.parameters(), config=_configs(stage))
    ours, *_ = moesaic.initialize(model=our_model, model_parameters=our_model.parameters(), config=_configs(stage))
    data = batches(8)
    ds_losses, ds_norms = train(ds, data)
    our_losses, our_norms = train(ours, data)
    assert ours.global_steps == ds.global_steps == 4 and ours.global_samples == ds.global_samples == 16
    torch.testing.assert_close(our_losses, ds_losses, rtol=1e-5, atol=1e-6)
    # DeepSpeed reports the norm where its ZeRO optimizer computes one (not at fp32 stage 0); moesaic always
    assert all(n is not None for n in our_norms) and (stage == 0 or None not in ds_norms)
    if stage > 0:
        torch.testing.assert_close([float(n) for n in our_norms], [float(n) for n in ds_norms], rtol=1e-4, atol=1e-6)
    ds_params, our_params = params_of(ds), params_of(ours)
    assert list(our_params) == list(ds_params)
    for name in ds_params:
        torch.testing.assert_close(our_params[name], ds_params[name], rtol=1e-5, atol=1e-6, msg=name)


def test_client_optimizer_and_schedule_as_deepspeed():
    """A torch AdamW over MoE param groups (two lrs) and a client StepLR: same lr sequence, losses, weights."""
    def client(model):
        groups = deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer(
            [{"params": [p for n, p in model.named_parameters() if "linear1" not in n], "name": "rest"},
             {"params": list(model.linear1.parameters()), "name": "first", "lr": 5e-3}])
        opt = torch.optim.AdamW(groups, lr=2e-2, weight_decay=0.05, betas=(0.8, 0.99))
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    ds_model, our_model = pair()
    ds_opt, ds_sched = client(ds_model)
    groups = moesaic.split_params_into_different_moe_groups_for_optimizer(
        [{"params": [p for n, p in our_model.named_parameters() if "linear1" not in n], "name": "rest"},
         {"params": list(our_model.linear1.parameters()), "name": "first", "lr": 5e-3}])
    our_opt = torch.optim.AdamW(groups, lr=2e-2, weight_decay=0.05, betas=(0.8, 0.99))
    our_sched = torch.optim.lr_scheduler.StepLR(our_opt, step_size=1, gamma=0.5)
    config = {"train_batch_size": 2, "steps_per_print": 100}
    ds, ds_ret_opt, ds_loader, ds_ret_sched = deepspeed.initialize(model=ds_model, optimizer=ds_opt,
                                                                   lr_scheduler=ds_sched, config=config)
    ours, our_ret_opt, our_loader, our_ret_sched = moesaic.initialize(model=our_model, optimizer=our_opt,
                                                                      lr_scheduler=our_sched, config=config)
    assert ds_loader is None and our_loader is None and our_ret_sched is our_sched and ds_ret_sched is ds_sched
    assert isinstance(our_ret_opt, torch.optim.Optimizer)
    ds_lrs, our_lrs = [], []
    for x, y in batches(4):
        for engine, lrs in ((ds, ds_lrs), (ours, our_lrs)):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            lrs.append(sorted(set(engine.get_lr())))
    assert our_lrs == ds_lrs == [[2.5e-3, 1e-2], [1.25e-3, 5e-3], [6.25e-4, 2.5e-3], [3.125e-4, 1.25e-3]]
    assert set(our_sched.get_last_lr()) == set(ds_sched.get_last_lr())  # the helpers split groups differently
    ds_params, our_params = params_of(ds), params_of(ours)
    for name in ds_params:
        torch.testing.assert_close(our_params[name], ds_params[name], rtol=1e-5, atol=1e-6, msg=name)


def test_engine_surface_matches():
    ds_model, our_model = pair()
    config = {"train_batch_size": 6, "gradient_accumulation_steps": 3, "steps_per_print": 100,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}
    ds, *_ = deepspeed.initialize(model=ds_model, model_parameters=ds_model.parameters(), config=config)
    ours, *_ = moesaic.initialize(model=our_model, model_parameters=our_model.parameters(), config=config)
    for name in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "zero_optimization_stage", "fp16_enabled", "bfloat16_enabled", "gradient_clipping",
                 "steps_per_print", "zero_optimization", "wall_clock_breakdown"):
        assert getattr(ours, name)() == getattr(ds, name)(), name
    for name in ("device", "local_rank", "global_rank", "world_size", "dp_world_size", "global_steps",
                 "global_samples", "skipped_steps", "micro_steps"):
        assert getattr(ours, name) == getattr(ds, name), name
    assert ours.module is our_model and isinstance(ours, nn.Module) and ours.moe_1 is our_model.moe_1
    assert ours.get_global_grad_norm() is ds.get_global_grad_norm() is None
    boundaries = {id(ds): [], id(ours): []}
    applied = {id(ds): [], id(ours): []}
    for x, y in batches(6):
        for engine in (ds, ours):
            boundaries[id(engine)].append(engine.is_gradient_accumulation_boundary())
            engine.backward(engine(x, y))
            engine.step()
            applied[id(engine)].append(engine.was_step_applied())
    assert boundaries[id(ours)] == boundaries[id(ds)] == [False, False, True] * 2
    assert applied[id(ours)] == applied[id(ds)] == [False, False, True] * 2
    assert (ours.global_steps, ours.global_samples, ours.micro_steps) == (ds.global_steps, ds.global_samples,
                                                                         ds.micro_steps) == (2, 12, 6)
    assert set(ours.get_lr()) == set(ds.get_lr()) == {0.1}
    assert set(ours.get_mom()) == set(ds.get_mom()) == {0.9}


def test_training_data_loader_as_deepspeed():
    data = torch.utils.data.TensorDataset(torch.arange(22.).view(11, 2), torch.arange(11))
    collate = torch.utils.data.default_collate
    ds_model, our_model = pair()
    config = {"train_micro_batch_size_per_gpu": 3, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    _, _, ds_loader, _ = deepspeed.initialize(model=ds_model, model_parameters=ds_model.parameters(),
                                              training_data=data, collate_fn=collate, config=config)
    _, _, our_loader, _ = moesaic.initialize(model=our_model, model_parameters=our_model.parameters(),
                                             training_data=data, collate_fn=collate, config=config)
    assert len(our_loader) == len(ds_loader) == 4
    for (a, b), (c, d) in zip(our_loader, ds_loader, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert isinstance(our_loader.sampler, torch.utils.data.DistributedSampler)


def test_state_dicts_move_both_ways():
    """A DeepSpeed-trained model's state dict loads into moesaic's engine and back, strictly, with equal outputs."""
    ds_model, our_model = pair()
    config = {"train_batch_size": 2, "steps_per_print": 100, "optimizer": {"type": "SGD", "params": {"lr": 0.5}}}
    ds, *_ = deepspeed.initialize(model=ds_model, model_parameters=ds_model.parameters(), config=config)
    ours, *_ = moesaic.initialize(model=our_model, model_parameters=our_model.parameters(), config=config)
    train(ds, batches(2))  # the weights now differ from moesaic's
    ours.module.load_state_dict(ds.module.state_dict(), strict=True)
    x, y = batches(1)[0]
    ds.eval(), ours.eval()
    torch.testing.assert_close(ours(x, y), ds(x, y))
    train(ours, batches(2))
    ds.module.load_state_dict(ours.module.state_dict(), strict=True)
    torch.testing.assert_close(ds(x, y), ours(x, y))


def test_checkpoint_api_shapes(tmp_path):
    ds_model, our_model = pair()
    config = {"train_batch_size": 2, "steps_per_print": 100, "optimizer": {"type": "SGD", "params": {"lr": 0.5}}}
    ds, *_ = deepspeed.initialize(model=ds_model, model_parameters=ds_model.parameters(), config=config)
    ours, *_ = moesaic.initialize(model=our_model, model_parameters=our_model.parameters(), config=config)
    for engine, root in ((ds, tmp_path / "ds"), (ours, tmp_path / "ours")):
        train(engine, batches(2))
        assert engine.save_checkpoint(str(root), client_state={"epoch": 3})
        assert (root / "latest").read_text().strip() == "global_step2"  # the default tag, DeepSpeed's
        assert engine.save_checkpoint(str(root), tag="extra", save_latest=False)
        assert (root / "latest").read_text().strip() == "global_step2"
        train(engine, batches(1))
        path, client = engine.load_checkpoint(str(root))
        assert os.path.exists(path) and client.get("epoch") == 3 and engine.global_steps == 2
        path, client = engine.load_checkpoint(str(root), tag="extra", load_optimizer_states=False,
                                              load_lr_scheduler_states=False)
        assert os.path.exists(path) and "epoch" not in client  # saved without client_state
        with pytest.warns(Warning) if engine is ours else _no_check():
            assert engine.load_checkpoint(str(tmp_path / "missing")) == (None, None)


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
