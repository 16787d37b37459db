"""Stacked experts at ZeRO stage 3 keep stage 0-2's per-expert optimizer groups (issue 24, item 1).

FSDP2 shards a stacked expert tensor on dim 0, the expert dim: each rank holds whole experts. The
engine's stage-3 optimizer puts each expert's slice in its own group, named as at stages 0-2, with its
``lr_scale``. Checked here against W=1, ZeRO stage 0 (the layout-invariance model,
tests/distributed/invariance_matrix.py, stacked experts, one expert's and one layer's ``lr_scale``):
at W=2 and W=4 with ep_size 1 and 2, every step's loss and global norm, the parameters after three
AdamW steps (fp32 round-off), the group names, and every group's telemetry (grad_norm, param_norm,
update_ratio per expert). At W=4 a small net with 3 experts gives uneven shards, one of them empty
(1, 1, 1, 0 experts per rank), and must equal stage 0 at its layout. Freezing one
expert of a stacked tensor is refused at stage 3 as at stages 0-2 (same message); freezing all of
them leaves the stacked tensors unchanged and trains the rest as stage 0. A stage-3 checkpoint
written before (one ``params/ffn/stacked`` group per layer) loads at stage 3 as at stage 0, its layer
group's settings in every expert's group, and the next step is the same. No step warns that FSDP2's
stacked-experts unit "returned a view tensor".
"""

import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from invariance_matrix import (ATOL, MICRO, RTOL, STEPS, Layout, build, canonical, micro_batch,  # noqa: E402
                               _config)
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.parallel.dtensor import local_rows  # noqa: E402
from support.moe_net import MoENet  # noqa: E402

LR_SCALE = {"blocks.0.moe/1": 2.0, "blocks.0.moe/5": 0.25, "blocks.1.moe": 0.5}


def _run(rank, lay, log_dir):
    model = build(lay)
    config = {**_config(lay), "moe": {"lr_scale": LR_SCALE}}
    engine, *_ = moesaic.initialize(model=model, config=config, log_dir=log_dir)
    world, accum = lay.world, MICRO // lay.world
    losses, norms, stats = [], [], []
    for step in range(STEPS):
        total = torch.zeros((), dtype=torch.float64)
        for j in range(accum):
            loss = engine(*micro_batch(step, rank * accum + j))
            total += loss.detach().double()
            engine.backward(loss)
            engine.step()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / MICRO)
        norms.append(float(engine.get_global_grad_norm()))
        stats.append(engine.last_metrics["group"])
    names = [g["name"] for g in engine.optimizer.param_groups]
    if world > 1:  # every rank's groups: the union is W=1's
        everyone = [None] * world
        dist.all_gather_object(everyone, names)
        names = sorted({n for part in everyone for n in part})
    return {"losses": losses, "norms": norms, "stats": stats, "names": sorted(names),
            "params": canonical(model, moesaic.safe_get_full_fp32_param), "engine": engine}


def _close(tag, a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=ATOL, rtol=RTOL, msg=lambda m: f"{tag}: {m}")


def _check(tag, got, ref):
    _close(f"{tag} loss", got["losses"], ref["losses"])
    _close(f"{tag} grad norm", got["norms"], ref["norms"])
    assert got["names"] == ref["names"], (tag, got["names"], ref["names"])
    assert sum("/expert_" in n for n in got["names"]) == 16, (tag, got["names"])  # 2 layers x 8 experts
    for step, (g, r) in enumerate(zip(got["stats"], ref["stats"])):
        assert sorted(g) == sorted(r), (tag, step, sorted(g), sorted(r))
        for name in r:
            for key in ("grad_norm", "param_norm", "update_ratio"):
                _close(f"{tag} step {step} group {name} {key}", g[name][key], r[name][key])
    for key, value in got["params"].items():
        _close(f"{tag} param {key}", value, ref["params"][key])


def _reference(rank, world, path, logs):
    ref = _run(rank, Layout(1, 1, 0, True, False, "none"), logs)
    ref.pop("engine")
    torch.save(ref, path)


def _uneven(rank, world, lr_scale):
    """3 experts per layer: uneven (W=2) or empty (W=4) shards of the stacked tensor; equal to stage 0."""
    out = {}
    for stage in (0, 3):
        model = MoENet(1, use_rts=False, stacked=True, num_experts=3)
        engine, *_ = moesaic.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 12, "gradient_clipping": 0.05,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
            "moe": {"lr_scale": lr_scale}, "zero_optimization": {"stage": stage}}, log_dir=tempfile.mkdtemp())
        for step in range(3):
            g = torch.Generator().manual_seed(100 * step + rank)
            engine.backward(engine(torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)))
            engine.step()
        out[stage] = ([moesaic.safe_get_full_fp32_param(p) for p in model.parameters()],
                      engine.last_metrics.get("group"), [g["name"] for g in engine.optimizer.param_groups])
    stacked = next(p for p in model.parameters() if getattr(p, "moe_stacked", None) is not None)
    start, stop, _ = local_rows(stacked)
    (p0, s0, n0), (p3, s3, n3) = out[0], out[3]
    assert n3 == n0 and len(n3) == 1 + 3, (n0, n3)  # dense, then one group per expert
    for a, b in zip(p3, p0):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    for name in s0 if rank == 0 else ():  # stage 0 reports on rank 0, stage 3 on every rank
        assert sorted(s3) == sorted(s0), (s0, s3)
        for key in ("grad_norm", "param_norm", "update_ratio"):
            _close(f"uneven W={world} group {name} {key}", s3[name][key], s0[name][key])
    return stop - start


def _old_checkpoint(rank):
    """The stage-3 checkpoint of the old layout (one ``params/ffn/stacked`` group) loads at stage 3 and 0 alike."""
    fixture = Path(__file__).parents[1] / "unit" / "data" / "checkpoint_v3_stage3_stacked_layer_group"
    saved = load_file(str(fixture / "state_dict.safetensors"))
    after = {}
    for stage in (3, 0):
        model = MoENet(1, use_rts=False, stacked=True)
        engine, *_ = moesaic.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 12, "gradient_clipping": 0.05,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "zero_optimization": {"stage": stage}})
        engine.load_checkpoint(str(fixture), tag="step2")
        for name, p in model.named_parameters():
            assert torch.equal(moesaic.safe_get_full_fp32_param(p), saved[name]), (stage, name)
        scales = {g["name"]: (g["lr_scale"], g["weight_decay"]) for g in engine.optimizer.param_groups}
        assert scales == {"params": (1.0, 0.1), **{f"params/ffn/expert_{n}": (0.5, 0.1) for n in range(4)}}, scales
        g = torch.Generator().manual_seed(200 + rank)
        engine.backward(engine(torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)))
        engine.step()
        after[stage] = [moesaic.safe_get_full_fp32_param(p) for p in model.parameters()]
    for a, b in zip(after[3], after[0]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def _worker(rank, world, path, logs):
    ref = torch.load(path, weights_only=False)
    for ep in (1, 2):
        lay = Layout(world, ep, 3, True, False, "none")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = _run(rank, lay, os.path.join(logs, f"w{world}ep{ep}"))
        # the stacked experts' outputs are row blocks of one buffer, not views (layer/ops.row_blocks)
        views = [str(w.message) for w in seen if "returned a view tensor" in str(w.message)]
        assert not views, (len(views), views[:1])
        scales = {g["name"]: g["lr_scale"] for g in got["engine"].optimizer.param_groups}
        want = {n: 2.0 if n.endswith("blocks.0.moe/expert_1") else 0.25 if n.endswith("blocks.0.moe/expert_5")
                else 0.5 if "/blocks.1.moe/" in n else 1.0 for n in scales}
        assert scales == want, scales
        _check(str(lay), got, ref)
    if world == 4:
        rows = _uneven(rank, world, {"ffn/1": 2.0})
        held = [0] * world
        dist.all_gather_object(held, rows)
        assert held == [1, 1, 1, 0], held  # torch's chunking of 3 rows over 4: uneven, one rank empty
    if world == 2:
        _old_checkpoint(rank)
    if world == 2:  # freezing one expert of a stacked tensor: refused at stage 3 as at stage 0
        messages = []
        for stage in (0, 3):
            with pytest.raises(ValueError, match="would freeze only some experts of stacked tensor") as err:
                moesaic.initialize(model=MoENet(1, stacked=True), config={
                    "train_micro_batch_size_per_gpu": 12, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
                    "moe": {"freeze_experts": ["ffn/1"]}, "zero_optimization": {"stage": stage}})
            messages.append(str(err.value))
        assert messages[0] == messages[1], messages
        # ... and freezing every expert of it is allowed at both: the stacked tensors never change
        after = {}
        for stage in (0, 3):
            model = MoENet(1, use_rts=False, stacked=True)
            start = [p.detach().clone() for p in model.parameters()]
            engine, *_ = moesaic.initialize(model=model, config={
                "train_micro_batch_size_per_gpu": 12, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
                "moe": {"freeze_experts": [0, 1, 2, 3]}, "zero_optimization": {"stage": stage}})
            assert [g["name"] for g in engine.optimizer.param_groups] == ["params"]
            for step in range(2):
                g = torch.Generator().manual_seed(300 + 10 * step + rank)
                engine.backward(engine(torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)))
                engine.step()
            full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
            for p, a, b in zip(model.parameters(), full, start):
                assert torch.equal(a, b) == (getattr(p, "moe_stacked", None) is not None)
            after[stage] = full
        for a, b in zip(after[3], after[0]):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """W=1, stage 0's run, computed once for both world sizes."""
    folder = tmp_path_factory.mktemp("zero3-stacked")
    run_ranks(_reference, 1, str(folder / "reference.pt"), str(folder / "w1"), timeout_s=120)
    return folder


@pytest.mark.parametrize("world", [2, 4])
def test_stacked_experts_at_stage3_step_per_expert_groups_as_w1_stage0(world, reference, tmp_path):
    run_ranks(_worker, world, str(reference / "reference.pt"), str(tmp_path), timeout_s=300)
