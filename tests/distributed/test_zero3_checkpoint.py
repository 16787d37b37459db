"""Checkpoints at ZeRO stage 3 (FSDP2) stay keyed by identity: any stage and layout reloads under any other.

The uninterrupted reference is one process at stage 0 training four AdamW steps (clipping, WarmupLR).

* W=4, ep_size=2, stage 3 loads the reference's stage-0 checkpoint of step 2, trains a step, saves
  (format 3: each rank writes only its rows), trains a step and saves again; that checkpoint
  loaded at W=1 stage 0 equals the reference after 4 steps, and its step-3 checkpoint continues at
  W=1 stage 0 and at W=2 stage 2 as the reference does (<= 1e-5).
* W=2: stage 2 trains from step 2 and saves; stage 3 (ep_size 1, EDP 2: experts in row pieces)
  continues from that stage-2 checkpoint as the reference does. A refused load (a corrupted piece,
  the wrong optimizer type) leaves the sharded parameters, AdamW's state, the scheduler, the
  counters and the RNG as they were. fp16: the loss scaler round-trips at stage 3. bf16: stage 2's
  fp32 masters become stage 3's parameters. ``moesaic.checkpoint.save``/``load`` of a model sharded
  by ``moesaic.shard_model`` round-trip each rank's shards, and the W=1 parent reads that checkpoint.
* Stacked experts (sharded along the expert dimension, each expert whole on one rank): a W=4
  stage-3 checkpoint loads at W=1 stage 0 with every expert's weights and moments.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic import checkpoint  # noqa: E402
from moesaic.layer.identity import ExpertIndex  # noqa: E402
from support.moe_net import MoENet  # noqa: E402

D, GLOBAL_BATCH = 8, 24


def make_engine(world, ep_size, stage, stacked=False, fp16=False, optimizer="AdamW", bf16=False):
    model = MoENet(ep_size, use_rts=False, stacked=stacked)
    if world > 1 and stage != 3:
        moesaic.setup_expert_parallel(model)
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_clipping": 0.5,
              "optimizer": {"type": optimizer, "params": {"lr": 1e-2, "weight_decay": 0.1}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}},
              "zero_optimization": {"stage": stage}}
    if fp16:
        config["fp16"] = {"enabled": True, "initial_scale_power": 6}
    if bf16:
        config["bf16"] = {"enabled": True}
    engine, *_ = moesaic.initialize(model=model, config=config)
    return engine


def train(engine, steps, rank=0, world=1, dtype=None):
    for _ in range(steps):
        g = torch.Generator().manual_seed(100 + engine.global_steps)
        x, y = torch.randn(GLOBAL_BATCH, D, generator=g), torch.randn(GLOBAL_BATCH, D, generator=g)
        part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        x, y = x[part], y[part]
        if dtype is not None:
            x, y = x.to(dtype), y.to(dtype)
        engine.backward(engine(x, y))
        engine.step()


def full_params(engine):
    """Every parameter whole (collective at stage 3)."""
    return {n: moesaic.safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def load_w1(folder, tag, steps=0):
    engine = make_engine(1, 1, 0)
    engine.load_checkpoint(folder, tag=tag)
    train(engine, steps)
    return engine


def assert_close(a, b, what):
    assert set(a) == set(b), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{what} {name}: {m}")


# --- W=4 -----------------------------------------------------------------------------------------

def _w4(rank, world, root):
    root = Path(root)
    # stage 0 (W=1) -> stage 3 (W=4, ep_size 2): continue, save at step 3, continue, save at step 4
    engine = make_engine(world, 2, 3)
    engine.load_checkpoint(root / "w1", tag="s2")
    assert engine.global_steps == 2 and engine.lr_scheduler.state_dict()["last_batch_iteration"] == 1
    train(engine, 1, rank, world)
    engine.save_checkpoint(root / "z3", tag="s3")
    train(engine, 1, rank, world)
    engine.save_checkpoint(root / "z3", tag="s4")
    # stacked experts: a stage-3 checkpoint holds every expert whole, from the rank holding its slice
    stacked = make_engine(world, 2, 3, stacked=True)
    train(stacked, 2, rank, world)
    stacked.save_checkpoint(root / "stacked", tag="s2")
    params = full_params(stacked)
    moments = {n: moesaic.safe_get_full_optimizer_state(p, "exp_avg").clone()
               for n, p in stacked.module.named_parameters()}
    first = stacked.module.ffn.deepspeed_moe.experts.first_expert_number  # this rank's experts: first, first + 1
    torch.save({"params": params, "moments": moments, "first": first}, root / f"stacked{rank}.pt")
    dist.barrier()


def test_stage3_checkpoint_w4_loads_at_stage0_and_stage2(tmp_path):
    ref = make_engine(1, 1, 0)
    train(ref, 2)
    ref.save_checkpoint(tmp_path / "w1", tag="s2")
    train(ref, 2)
    expected = {n: p.detach().clone() for n, p in ref.module.named_parameters()}
    expected_moments = {n: moesaic.safe_get_full_optimizer_state(p, "exp_avg") for n, p in
                        ref.module.named_parameters()}

    run_ranks(_w4, 4, str(tmp_path), timeout_s=300)

    # format 3, each rank its own rows: four dense files, every sharded tensor in pieces, nothing whole twice
    folder = checkpoint.verify(tmp_path / "z3", tag="s3")
    manifest = checkpoint.read_manifest(folder)
    assert manifest["format_version"] == 3 and manifest["world_size"] == 4
    assert len(manifest["dense"]["files"]) == 4, manifest["dense"]
    for rel in manifest["dense"]["files"]:
        entry = manifest["files"][rel]
        for key, meta in entry["tensors"].items():
            start, stop, total = entry["rows"][key]
            assert stop - start == meta["shape"][0] <= -(-total // 4), (rel, key)
    # ep_size 2 of 4 ranks: each expert's tensors in two pieces (its two expert-data-parallel ranks)
    assert all(len(parts) == 2 for parts in manifest["experts"]["ffn"].values()), manifest["experts"]

    # the stage-3 checkpoint at W=1 stage 0: weights and moments of step 4, and step 3 continues
    final = load_w1(tmp_path / "z3", "s4")
    assert final.global_steps == 4
    assert_close({n: p.detach() for n, p in final.module.named_parameters()}, expected, "W=4 z3 s4 at W=1:")
    assert_close({n: moesaic.safe_get_full_optimizer_state(p, "exp_avg") for n, p in
                  final.module.named_parameters()}, expected_moments, "W=4 z3 s4 exp_avg at W=1:")
    cont = load_w1(tmp_path / "z3", "s3", steps=1)
    assert_close({n: p.detach() for n, p in cont.module.named_parameters()}, expected, "W=4 z3 s3 + 1 at W=1:")

    # ... and at W=2 stage 2 (ep_size 2), then W=2 stage 2 -> stage 3 (ep_size 1): the W=2 launch
    run_ranks(_w2, 2, str(tmp_path), timeout_s=300)
    door = MoENet(1)
    checkpoint.load(tmp_path / "door", door, index=ExpertIndex.build(door))  # format 3 of a bare sharded model, whole at W=1
    assert_close({n: p.detach() for n, p in door.named_parameters()},
                 torch.load(tmp_path / "door.pt", weights_only=True), "shard_model + checkpoint.save at W=1:")
    for tag in ("z2-from-z3", "z3-from-z2"):
        got = load_w1(tmp_path / tag, "s4")
        assert_close({n: p.detach() for n, p in got.module.named_parameters()}, expected, f"{tag} at W=1:")

    # stacked experts: every expert's weights and moments, whole, at W=1
    one = make_engine(1, 1, 0, stacked=True)
    one.load_checkpoint(tmp_path / "stacked", tag="s2")
    for rank in range(4):
        saved = torch.load(tmp_path / f"stacked{rank}.pt", weights_only=True)
        first = saved["first"]

        def mine(p, t):  # a stacked tensor holds experts 0-3 here, the saving rank's two there
            return t[first:first + 2] if getattr(p, "moe_stacked", None) is not None else t

        assert_close({n: mine(p, p.detach()) for n, p in one.module.named_parameters()}, saved["params"],
                     f"stacked at W=1 (rank {rank}'s experts):")
        assert_close({n: mine(p, moesaic.safe_get_full_optimizer_state(p, "exp_avg")) for n, p in
                      one.module.named_parameters()}, saved["moments"], f"stacked exp_avg at W=1 (rank {rank}):")


# --- W=2 -----------------------------------------------------------------------------------------

def _snapshot(engine):
    """This rank's shards, optimizer state, scheduler, counters (no collectives: a refused load is local)."""
    state = {id(p): {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in s.items()}
             for p, s in engine.optimizer.state.items()}
    return ([p.to_local().clone() for p in engine.module.parameters()],
            [state[id(p)] for p in engine.module.parameters() if id(p) in state],
            engine.lr_scheduler.state_dict(), (engine.global_steps, engine.global_samples, engine.micro_steps),
            [dict((k, v) for k, v in g.items() if k != "params") for g in engine.optimizer.param_groups])


def _same(a, b):
    assert len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a[2:] == b[2:], (a[2:], b[2:])


def _w2(rank, world, root):
    root = Path(root)
    # stage 3 (W=4) -> stage 2 (W=2, ep_size 2), one step, save
    z2 = make_engine(world, 2, 2)
    z2.load_checkpoint(root / "z3", tag="s3")
    train(z2, 1, rank, world)
    z2.save_checkpoint(root / "z2-from-z3", tag="s4")
    # stage 0 (W=1) -> stage 2, one step, save; stage 2 -> stage 3 (ep_size 1: experts in two pieces), one step
    z2 = make_engine(world, 2, 2)
    z2.load_checkpoint(root / "w1", tag="s2")
    train(z2, 1, rank, world)
    z2.save_checkpoint(root / "z2", tag="s3")
    z3 = make_engine(world, 1, 3)
    z3.load_checkpoint(root / "z2", tag="s3")
    assert z3.global_steps == 3
    train(z3, 1, rank, world)
    z3.save_checkpoint(root / "z3-from-z2", tag="s4")
    manifest = json.loads((root / "z3-from-z2" / "s4" / "manifest.json").read_text())
    assert all(len(p) == 2 for p in manifest["experts"]["ffn"].values()), manifest["experts"]

    # a refused load changes nothing: a corrupted piece, then another optimizer type
    before = _snapshot(z3)
    rng = torch.get_rng_state()
    if rank == 0:
        bad = root / "bad"
        import shutil
        shutil.copytree(root / "z3-from-z2", bad)
        piece = bad / "s4" / manifest["dense"]["files"][1]
        data = bytearray(piece.read_bytes())
        data[-1] ^= 0xFF
        piece.write_bytes(bytes(data))
    dist.barrier()
    # rank 0 reads every dense piece, so it fails; the others refuse because it did
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch|failed loading"):
        z3.load_checkpoint(root / "bad", tag="s4")
    _same(_snapshot(z3), before)
    assert torch.equal(torch.get_rng_state(), rng)
    sgd = make_engine(world, 1, 3, optimizer="SGD")
    sgd_before = _snapshot(sgd)
    with pytest.raises(checkpoint.CheckpointError, match="resume with the optimizer type"):
        sgd.load_checkpoint(root / "z3-from-z2", tag="s4")
    _same(_snapshot(sgd), sgd_before)

    # bf16 at stage 2 keeps fp32 masters beside bf16 weights: at stage 3 the masters become the parameters
    low = make_engine(world, 2, 2, bf16=True)
    train(low, 3, rank, world, dtype=torch.bfloat16)  # (WarmupLR: the first steps have lr 0)
    masters = full_params(low)
    low.save_checkpoint(root / "bf16", tag="b")
    high = make_engine(world, 2, 3, bf16=True)
    high.load_checkpoint(root / "bf16", tag="b")
    got = full_params(high)
    assert any(not torch.equal(m, p.detach().float()) for m, p in zip(masters.values(), low.module.parameters()))
    assert all(torch.equal(got[n], masters[n]) for n in masters), "stage 3 parameters are stage 2's fp32 masters"

    # the torch-native door: moesaic.checkpoint.save / load of a model sharded by moesaic.shard_model
    door = moesaic.shard_model(MoENet(1), param_dtype=None)
    with torch.no_grad():
        for p in door.parameters():
            p.to_local().add_(0.5 + rank)
    checkpoint.save(root / "door", door, tag="d", index=ExpertIndex.build(door))
    back = moesaic.shard_model(MoENet(1), param_dtype=None)
    checkpoint.load(root / "door", back, index=ExpertIndex.build(back))
    assert all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(door.parameters(), back.parameters()))
    whole = {n: p.full_tensor() for n, p in door.named_parameters()}
    if rank == 0:
        torch.save(whole, root / "door.pt")

    # same world: the RNG resumes; fp16's loss scaler round-trips at stage 3
    torch.manual_seed(1234 + rank)
    z3.save_checkpoint(root / "rng", tag="r")
    after_save = torch.rand(3)
    again = make_engine(world, 1, 3)
    again.load_checkpoint(root / "rng", tag="r")
    assert torch.equal(torch.rand(3), after_save)
    _same(_snapshot(again), _snapshot(z3))
    half = make_engine(world, 1, 3, fp16=True)
    train(half, 2, rank, world, dtype=torch.float16)
    half.loss_scaler.cur_scale = 32.0  # a scale that is not the initial one
    half.save_checkpoint(root / "fp16", tag="h")
    other = make_engine(world, 1, 3, fp16=True)
    other.load_checkpoint(root / "fp16", tag="h")
    assert other.loss_scale == 32.0 and other.global_steps == 2
    _same(_snapshot(other), _snapshot(half))
    dist.barrier()
