"""Importing a checkpoint written by DeepSpeed's own engine (runs where deepspeed is importable)."""

import os
import socket

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed not installed (make parity builds .venv-deepspeed)")

import moesaic  # noqa: E402
from moesaic.checkpoint import CheckpointError  # noqa: E402
from moesaic.deepspeed import convert_deepspeed_checkpoint  # noqa: E402
from moesaic.layer.identity import ExpertIndex  # noqa: E402


def _expert():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


class Net(nn.Module):
    def __init__(self, moe_cls):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([moe_cls(8, _expert(), num_experts=4, k=2, use_residual=(i == 1))
                                     for i in range(2)])

    def forward(self, x):
        h = self.inp(x)
        aux = 0
        for b in self.blocks:
            h, l_aux, _ = b(h)
            aux = aux + l_aux
        return h.pow(2).mean() + 0.01 * aux


_ENGINE = []


def ds_checkpoint_engine():
    """The DeepSpeed engine the module fixture trained (valid while the fixture is)."""
    return _ENGINE[0]


@pytest.fixture(scope="module")
def ds_checkpoint(tmp_path_factory):
    from deepspeed.moe.layer import MoE as DSMoE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Net(DSMoE)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_batch_size": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}})
    for _ in range(2):
        loss = engine(torch.randn(4, 8))
        engine.backward(loss)
        engine.step()
    out = tmp_path_factory.mktemp("ds")
    engine.save_checkpoint(str(out))
    _ENGINE.append(engine)
    yield out, {k: v.detach().clone() for k, v in model.state_dict().items()}
    _ENGINE.clear()
    torch.distributed.destroy_process_group()
    from moesaic.parallel import reset_expert_parallel_groups
    reset_expert_parallel_groups()


def test_import_reproduces_deepspeeds_weights_and_outputs(ds_checkpoint, tmp_path):
    ds_dir, ds_state = ds_checkpoint
    ours = Net(moesaic.MoE)
    moesaic.name_moe_layers(ours)
    folder = convert_deepspeed_checkpoint(ds_dir, ours, tmp_path)
    assert (folder / "experts" / "blocks.0" / "3.safetensors").exists()
    # every DeepSpeed tensor landed under its own name: the module structures are the same
    assert list(ours.state_dict()) == list(ds_state)
    for k, v in ds_state.items():
        assert torch.equal(ours.state_dict()[k], v), k
    # and the written checkpoint loads into a fresh model with the same result
    fresh = Net(moesaic.MoE)
    moesaic.name_moe_layers(fresh)
    moesaic.checkpoint.load(tmp_path, fresh, index=ExpertIndex.build(fresh))
    for p, q in zip(fresh.parameters(), ours.parameters()):
        assert torch.equal(p, q)


def test_import_refuses_a_mismatched_model(ds_checkpoint, tmp_path):
    ds_dir, _ = ds_checkpoint
    wrong = Net(lambda *a, **kw: moesaic.MoE(*a, **{**kw, "num_experts": 8}))
    moesaic.name_moe_layers(wrong)
    with pytest.raises(CheckpointError, match=r"'blocks.0.deepspeed_moe.gate.wg.weight' has shape \(4, 8\) in DeepSpeed's "
                                              r"checkpoint but \(8, 8\) in the model"):
        convert_deepspeed_checkpoint(ds_dir, wrong, tmp_path)


class RunState:
    """A user object in DeepSpeed's client_state: DeepSpeed pickles it into the model-states file."""

    def __init__(self, epoch):
        self.epoch = epoch


def test_deepspeed_files_load_without_unpickling_code_unless_trusted(ds_checkpoint, tmp_path):
    ds_dir, ds_state = ds_checkpoint
    # DeepSpeed's own files need no trust: the default (weights_only) import above already read them
    ours = Net(moesaic.MoE)
    moesaic.name_moe_layers(ours)
    convert_deepspeed_checkpoint(ds_dir, ours, tmp_path / "plain")
    # a client_state object makes the main file a general pickle: refused unless trusted explicitly
    engine = ds_checkpoint_engine()
    engine.save_checkpoint(str(tmp_path / "ds_obj"), client_state={"run": RunState(3)})
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: holds Python objects .* trust_pickle=True"):
        convert_deepspeed_checkpoint(tmp_path / "ds_obj", ours, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    folder = convert_deepspeed_checkpoint(tmp_path / "ds_obj", ours, tmp_path / "trusted", trust_pickle=True)
    assert folder.is_dir()
