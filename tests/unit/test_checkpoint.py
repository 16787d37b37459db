"""Per-expert checkpoints on one process: layout, exact resume after SIGKILL, atomicity, corruption."""

import json
import multiprocessing as mp
import os
import signal

import pytest
import torch
from torch import nn

import moesaic
from moesaic import checkpoint
from moesaic.checkpoint import CheckpointError


class Net(nn.Module):
    def __init__(self, d=8, experts=4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        # RTS and 2nd-expert sampling stay on: resuming must restore the RNG too
        self.ffn = moesaic.MoE(d, nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d)), num_experts=experts,
                               k=2, capacity_factor=1.0)
        moesaic.name_moe_layers(self)

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.pow(2).mean() + 0.01 * l_aux


CONFIG = {"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 1e-2}}}


def make_engine(bf16=False):
    cfg = dict(CONFIG, bf16={"enabled": bf16})
    engine, *_ = moesaic.initialize(model=Net(), config=cfg)
    return engine


def train(engine, steps, bf16=False):
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8)  # drawn from the global RNG: resume must restore it
        loss = engine(x.bfloat16() if bf16 else x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_layout_names_experts_by_layer_and_number(tmp_path):
    engine = make_engine()
    train(engine, 2)
    folder = engine.save_checkpoint(tmp_path)
    assert folder.name == "global_step2" and (tmp_path / "latest").read_text() == "global_step2"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["step"] == 2 and manifest["world_size"] == 1
    assert manifest["moe_layers"] == {"ffn": {"num_experts": 4, "ep_size": 1}}
    expected = {"dense.safetensors", "dense.optim.safetensors", "rank0.state.pt", "engine.json", "optimizer.json"}
    expected |= {f"experts/ffn/{i}.safetensors" for i in range(4)} | {f"experts/ffn/{i}.optim.safetensors"
                                                                      for i in range(4)}
    assert set(manifest["files"]) == expected
    from safetensors.torch import load_file
    assert set(load_file(folder / "experts/ffn/2.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    optim = load_file(folder / "experts/ffn/2.optim.safetensors")
    assert {"0.weight::exp_avg", "0.weight::exp_avg_sq", "0.weight::step"} <= set(optim)
    assert int(optim["0.weight::step"]) == 2
    dense_optim = load_file(folder / "dense.optim.safetensors")
    assert "inp.weight::exp_avg" in dense_optim and "ffn.deepspeed_moe.gate.wg.weight::exp_avg" in dense_optim


def _run(path, steps_before, steps_after, kill_after_save, out, bf16):
    """A training process; writes its losses to ``out`` (JSON) as it goes."""
    try:
        engine = make_engine(bf16)
        if steps_before is None:  # resume
            engine.load_checkpoint(path)
            out.write_text(json.dumps(train(engine, steps_after, bf16)))
            return
        torch.manual_seed(123)
        first = train(engine, steps_before, bf16)
        engine.save_checkpoint(path)
        later = train(engine, steps_after, bf16)
        out.write_text(json.dumps(first + later))
        if kill_after_save:
            os.kill(os.getpid(), signal.SIGKILL)
    except BaseException:
        import traceback
        out.write_text(json.dumps(traceback.format_exc()))
        raise


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_after_sigkill_gives_bitwise_identical_losses(tmp_path, bf16):
    ctx = mp.get_context("spawn")
    runs = []
    for i, args in enumerate(((tmp_path / "a", 4, 4, False), (tmp_path / "b", 4, 1, True),
                              (tmp_path / "b", None, 4, False))):
        out = tmp_path / f"losses{i}.json"
        p = ctx.Process(target=_run, args=(*args, out, bf16))
        p.start()
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            raise AssertionError("training process hung")
        result = json.loads(out.read_text())
        assert not isinstance(result, str), result
        assert p.exitcode == (-signal.SIGKILL if args[3] else 0)
        runs.append(result)
    uninterrupted, killed, resumed = runs
    assert killed[:5] == uninterrupted[:5]
    assert resumed == uninterrupted[4:], "a resumed run must continue exactly"


def test_bare_model_round_trip(tmp_path):
    a, b = Net(), Net()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    checkpoint.save(tmp_path, a, tag="t")
    checkpoint.load(tmp_path, b)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_a_save_that_dies_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    engine = make_engine()
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    train(engine, 1)
    written = []
    real_write = checkpoint.store._write

    def dying_write(path, *args):
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt("killed mid-save")
        return real_write(path, *args)

    monkeypatch.setattr(checkpoint.store, "_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "global_step1"
    assert not (tmp_path / "global_step2").exists() and (tmp_path / ".tmp-global_step2").exists()
    fresh = make_engine()
    fresh.load_checkpoint(tmp_path)
    assert fresh.global_steps == 1
    engine.save_checkpoint(tmp_path)  # the next save cleans the debris and publishes
    assert (tmp_path / "latest").read_text() == "global_step2" and not (tmp_path / ".tmp-global_step2").exists()


def test_corrupted_or_missing_files_fail_clearly_and_load_nothing(tmp_path):
    engine = make_engine()
    train(engine, 1)
    folder = engine.save_checkpoint(tmp_path)
    target = make_engine()
    snap = _snapshot(target.module)
    f = folder / "experts/ffn/3.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"experts/ffn/3.safetensors: checksum mismatch"):
        target.load_checkpoint(tmp_path)
    assert _unchanged(target.module, snap)
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        target.load_checkpoint(tmp_path)
    f.unlink()
    with pytest.raises(CheckpointError, match=r"experts/ffn/3.safetensors: file missing"):
        target.load_checkpoint(tmp_path)
    assert _unchanged(target.module, snap)


def test_newer_format_and_mismatched_models_are_refused(tmp_path):
    engine = make_engine()
    folder = engine.save_checkpoint(tmp_path, tag="t")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        checkpoint.load(tmp_path, Net(), tag="t")
    manifest["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    wide = Net(d=12)
    snap = _snapshot(wide)
    with pytest.raises(CheckpointError, match=r"dense.safetensors: '.*' has shape \(\d+, 8\) in the checkpoint but"):
        checkpoint.load(tmp_path, wide, tag="t")
    assert _unchanged(wide, snap)
    with pytest.raises(CheckpointError, match="layer 'ffn' has 4 experts in the checkpoint but 8 in the model"):
        checkpoint.load(tmp_path, Net(experts=8), tag="t")
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        checkpoint.load(tmp_path / "nowhere", Net())
    with pytest.raises(ValueError, match="tag must be a non-empty name"):
        checkpoint.save(tmp_path, Net(), tag="a/b")


def test_adamw_checkpoint_does_not_load_into_an_sgd_engine(tmp_path):
    engine = make_engine()
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    cfg = dict(CONFIG, optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}})
    sgd, *_ = moesaic.initialize(model=Net(), config=cfg)
    before = [p.detach().clone() for p in sgd.module.parameters()]
    with pytest.raises(CheckpointError, match=r"state is for 'AdamW' but this optimizer is 'SGD'"):
        sgd.load_checkpoint(tmp_path)
    assert all(torch.equal(p, b) for p, b in zip(sgd.module.parameters(), before)), "the model is untouched"
