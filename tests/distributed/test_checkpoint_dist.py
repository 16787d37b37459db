"""Checkpoints across ranks: exact resume with W=2, and resharding ep_size=2 -> 1 and -> 4."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402

D, E, GLOBAL_BATCH = 8, 4, 16


class Net(nn.Module):
    def __init__(self, ep_size, deterministic):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.ffn = moesaic.MoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), num_experts=E,
                               ep_size=ep_size, k=2, drop_tokens=not deterministic,
                               top2_2nd_expert_sampling=not deterministic, expert_group_name="ffn")
        self.out = nn.Linear(D, D)
        self.aux = 0.0 if deterministic else 0.01

    def forward(self, x, y):
        h, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return (self.out(h) - y).pow(2).mean() + self.aux * l_aux


def _engine(ep_size, deterministic):
    model = Net(ep_size, deterministic)
    if dist.is_initialized():
        moesaic.setup_expert_parallel(model)
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}}}
    engine, *_ = moesaic.initialize(model=model, config=cfg)
    return engine


def _global_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(GLOBAL_BATCH, D, generator=g), torch.randn(GLOBAL_BATCH, D, generator=g)


def _train(engine, steps, rank, world):
    """Each rank trains on its slice of the global batch; returns the global mean loss per step."""
    losses = []
    per = GLOBAL_BATCH // world
    for _ in range(steps):
        x, y = _global_batch(engine.global_steps)
        loss = engine(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        engine.backward(loss)
        engine.step()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
        losses.append(float(value) / world)
    return losses


def _write_then_continue(rank, world, path, out, deterministic):
    engine = _engine(world, deterministic)
    torch.manual_seed(7 + rank)
    first = _train(engine, 3, rank, world)
    engine.save_checkpoint(path, client_state={"note": f"rank {rank}"})
    later = _train(engine, 3, rank, world)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"first": first, "later": later}, f)


def _resume(rank, world, path, out, ep_size, deterministic):
    engine = _engine(ep_size, deterministic)
    folder, client = engine.load_checkpoint(path)
    assert engine.global_steps == 3
    losses = _train(engine, 3, rank, world)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"later": losses, "client": client}, f)


def test_w2_resume_is_exact(tmp_path):
    ref, res = tmp_path / "ref.json", tmp_path / "res.json"
    run_ranks(_write_then_continue, 2, str(tmp_path / "ck"), str(ref), False)
    run_ranks(_resume, 2, str(tmp_path / "ck"), str(res), 2, False)
    want, got = json.loads(ref.read_text()), json.loads(res.read_text())
    assert got["later"] == want["later"], "a resumed 2-rank run must continue bitwise identically"
    assert got["client"] == {"note": "rank 0"}


def test_checkpoint_from_ep2_reshards_to_ep1_and_ep4(tmp_path):
    ref = tmp_path / "ref.json"
    run_ranks(_write_then_continue, 2, str(tmp_path / "ck"), str(ref), True)
    manifest = json.loads((tmp_path / "ck" / "global_step3" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["moe_layers"]["ffn"] == {"num_experts": 4, "ep_size": 2}
    want = json.loads(ref.read_text())["later"]
    # one process holding all 4 experts
    one = tmp_path / "one.json"
    _resume(0, 1, str(tmp_path / "ck"), str(one), 1, True)
    # four processes holding one expert each
    four = tmp_path / "four.json"
    run_ranks(_resume, 4, str(tmp_path / "ck"), str(four), 4, True, timeout_s=180)
    for path in (one, four):
        got = json.loads(path.read_text())["later"]
        for a, b in zip(got, want):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (path.name, got, want)


class _ShardedView:
    """The engine's optimizer, but each rank writes a disjoint half of the dense state (as ZeRO will)."""

    def __init__(self, optimizer, rank):
        self._opt, self._rank = optimizer, rank
        dense = sorted(n for n in optimizer.state_names() if "/" not in n)
        self._mine = set(dense[rank::2])

    def __getattr__(self, name):
        return getattr(self._opt, name)

    def writes_state(self, name):
        return name in self._mine if "/" not in name else True  # expert state: its only holder (ep_size=2)


def _save_default_and_sharded(rank, world, path):
    from moesaic import checkpoint

    engine = _engine(world, True)
    _train(engine, 3, rank, world)
    engine.save_checkpoint(os.path.join(path, "default"))
    checkpoint.save(os.path.join(path, "sharded"), engine.module, tag="t",
                    optimizer=_ShardedView(engine.optimizer, rank), index=engine.index)


def test_optimizer_state_written_by_several_ranks_loads_the_same(tmp_path):
    from moesaic import checkpoint

    run_ranks(_save_default_and_sharded, 2, str(tmp_path))
    sharded = checkpoint.read_manifest(checkpoint.resolve(tmp_path / "sharded"))
    dense_files = {rel for name, rel in sharded["optimizer"]["state"].items() if "/" not in name}
    assert len(dense_files) == 2 and all(rel.startswith("optim/dense-") for rel in dense_files), dense_files
    default = checkpoint.read_manifest(checkpoint.resolve(tmp_path / "default"))
    assert len({rel for name, rel in default["optimizer"]["state"].items() if "/" not in name}) == 1
    a, b = _engine(1, True), _engine(1, True)
    a.load_checkpoint(tmp_path / "default")
    checkpoint.load(tmp_path / "sharded", b.module, optimizer=b.optimizer, index=b.index)
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, b.module.state_dict()[k]), k
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert set(sa) == set(sb)
    for name in sa:
        for field, v in sa[name].items():
            assert torch.equal(v, sb[name][field]), (name, field)


def _one_rank_fails_to_save(rank, world, path):
    import pytest

    from moesaic.checkpoint import CheckpointError

    engine = _engine(world, True)
    client = {"ok": 1} if rank == 0 else {"bad": {1, 2}}
    expected = (CheckpointError, r"rank 1 failed preparing checkpoint 'global_step0': TypeError") if rank == 0 else (
        TypeError, r"client_state\['bad'\] is a builtins.set")
    with pytest.raises(expected[0], match=expected[1]):
        engine.save_checkpoint(path, client_state=client)
    assert not os.path.exists(os.path.join(path, "latest"))


def test_a_save_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    run_ranks(_one_rank_fails_to_save, 2, str(tmp_path / "ck"), timeout_s=90)


def _load_fails_everywhere(rank, world, path):
    import pytest

    from moesaic.checkpoint import CheckpointError

    engine = _engine(world, True)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    match = r"experts/ffn/3.safetensors: checksum mismatch" if rank == 1 else r"rank 1 failed loading"
    with pytest.raises(CheckpointError, match=match):
        engine.load_checkpoint(path)
    assert all(torch.equal(v, before[k]) for k, v in engine.module.state_dict().items()), "nothing copied"


def test_a_corrupt_file_one_rank_reads_fails_the_load_on_every_rank(tmp_path):
    run_ranks(_write_then_continue, 2, str(tmp_path / "ck"), str(tmp_path / "ref.json"), True)
    f = tmp_path / "ck" / "global_step3" / "experts" / "ffn" / "3.safetensors"  # held by rank 1 only
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10
    f.write_bytes(bytes(data))
    run_ranks(_load_fails_everywhere, 2, str(tmp_path / "ck"), timeout_s=90)


def _bad_rng_refused_everywhere(rank, world, path):
    import random

    import pytest

    from moesaic.checkpoint import CheckpointError

    engine = _engine(world, True)
    torch.manual_seed(99)
    random.seed(99)
    before = ({k: v.clone() for k, v in engine.module.state_dict().items()},
              json.dumps(engine.optimizer.state_dict()["param_groups"]), engine.global_steps,
              torch.get_rng_state(), random.getstate())
    match = r"rank1.json: rng.python\[1\]: must list 625 ints" if rank == 1 else r"rank 1 failed loading"
    with pytest.raises(CheckpointError, match=match):
        engine.load_checkpoint(path)
    after = ({k: v.clone() for k, v in engine.module.state_dict().items()},
             json.dumps(engine.optimizer.state_dict()["param_groups"]), engine.global_steps,
             torch.get_rng_state(), random.getstate())
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items()), "model changed"
    assert after[1:3] == before[1:3] and torch.equal(after[3], before[3]) and after[4] == before[4]


def test_a_bad_value_only_one_rank_reads_refuses_the_load_on_every_rank_before_anything_changes(tmp_path):
    """rank1.json is read by rank 1 only: rank 0 must not apply its part while rank 1 refuses (the manifest
    is resealed, so only the check of the RNG state can refuse it)."""
    import zlib

    from moesaic.checkpoint.manifest import seal

    run_ranks(_write_then_continue, 2, str(tmp_path / "ck"), str(tmp_path / "ref.json"), True)
    folder = tmp_path / "ck" / "global_step3"
    state = json.loads((folder / "rank1.json").read_text())
    state["rng"]["python"][1] = state["rng"]["python"][1][:10]
    data = json.dumps(state).encode()
    (folder / "rank1.json").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("manifest_crc32")
    manifest["files"]["rank1.json"].update(bytes=len(data), crc32=zlib.crc32(data))
    (folder / "manifest.json").write_bytes(seal(manifest))
    run_ranks(_bad_rng_refused_everywhere, 2, str(tmp_path / "ck"), timeout_s=90)
