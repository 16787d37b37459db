"""Checkpoint save/load time and bytes: moesaic's per-expert layout vs one ``torch.save`` file.

Model: the engine benchmark's (8 MoE layers x 16 experts, h=512, ffn=2048, plus a dense block per
layer; bf16 parameters, AdamW with fp32 master weights and moments), after one training step so
the optimizer state exists. Baseline: ``torch.save({"model": state_dict, "optimizer": state})`` of
the same tensors (model + fp32 masters + moments) into one file (not fsynced). moesaic:
``engine.save_checkpoint`` (per-expert safetensors files, whole-file CRC-32, manifest, every file
and folder fsynced, atomic renames) and ``load_checkpoint`` (every file verified first) into a
fresh engine. Medians over rounds; the order alternates between rounds and the page cache
is synced before each timed save, so neither writer pays for the other's dirty pages.

    python benchmarks/bench_checkpoint.py [--rounds 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import moesaic  # noqa: E402
from bench_mixed_precision import TOKENS, H, Model  # noqa: E402


def make_engine():
    torch.manual_seed(0)
    engine, *_ = moesaic.initialize(model=Model(), config={
        "train_micro_batch_size_per_gpu": TOKENS, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "moe": {"split_by": "expert"}})
    return engine


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint.json"))
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    engine = make_engine()
    x = torch.randn(TOKENS, H, dtype=torch.bfloat16)
    engine.backward(engine(x))
    engine.step()
    target = make_engine()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="moesaic-ckpt-bench-"))
    times = {"torch_save": [], "moesaic_save": [], "torch_load": [], "moesaic_load": []}
    try:
        for r in range(args.rounds):
            base = work / f"torch{r}.pt"

            def save_torch():
                os.sync()  # start from clean page cache: the other writer's dirty pages would throttle this one
                t0 = time.perf_counter()
                torch.save({"model": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}, base)
                times["torch_save"].append(time.perf_counter() - t0)

            def save_ours():
                os.sync()
                t0 = time.perf_counter()
                folder = engine.save_checkpoint(work / "moesaic", tag=f"r{r}")
                times["moesaic_save"].append(time.perf_counter() - t0)
                return folder

            if r % 2 == 0:  # alternate the order between rounds
                save_torch()
                folder = save_ours()
            else:
                folder = save_ours()
                save_torch()
            t0 = time.perf_counter()
            state = torch.load(base, weights_only=False)
            target.module.load_state_dict(state["model"])
            times["torch_load"].append(time.perf_counter() - t0)
            del state
            t0 = time.perf_counter()
            target.load_checkpoint(work / "moesaic", tag=f"r{r}")
            times["moesaic_load"].append(time.perf_counter() - t0)
            torch_bytes, our_bytes = base.stat().st_size, folder_bytes(folder)
            base.unlink()
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["rounds"] = times
    result["save_ratio"] = statistics.median(a / b for a, b in zip(times["moesaic_save"], times["torch_save"]))
    result["load_ratio"] = statistics.median(a / b for a, b in zip(times["moesaic_load"], times["torch_load"]))
    result.update(torch_bytes=torch_bytes, moesaic_bytes=our_bytes, bytes_ratio=our_bytes / torch_bytes,
                  params_m=sum(p.numel() for p in engine.module.parameters()) / 1e6)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print("| | save s | load s | bytes |\n|---|---|---|---|")
    print(f"| torch.save (one file) | {result['torch_save']:.2f} | {result['torch_load']:.2f} | {torch_bytes / 2**30:.2f} GiB |")
    print(f"| moesaic (per expert) | {result['moesaic_save']:.2f} | {result['moesaic_load']:.2f} | "
          f"{our_bytes / 2**30:.2f} GiB |")
    print(f"| ratio | {result['save_ratio']:.2f} | {result['load_ratio']:.2f} | {result['bytes_ratio']:.3f} |")


if __name__ == "__main__":
    main()
