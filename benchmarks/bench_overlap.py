"""Gradient reduction overlapped with backward (``overlap_comm``) vs after it, W gloo processes.

Model: the engine benchmark model of bench_mixed_precision.py (MoE layers, top-2 dropless, each
after a dense Linear(h, 4h)-GELU-Linear(4h, h) block, AdamW), scaled down by default (h=256,
ffn=1024, 4 layers x 8 experts, 18 M parameters, 128 tokens per rank) and in fp32 (``--bf16``:
bf16 parameters; CPU bf16 matmuls are slow) so that W=4 runs in minutes on a 2-core machine;
ep_size 1 (every gradient crosses the data-parallel world). ``reduce_bucket_size`` 2 M elements
for both engines (torch DDP's bucket order of magnitude), so backward has several buckets to overlap.

Each round times, in the same processes and with a barrier before each, one accumulation-boundary
``forward + backward`` (the reduction included: it is what overlap changes; the optimizer step is
the same code either way) of:

* ``off``: ``overlap_comm: false``, buckets reduced after backward;
* ``on``: ``overlap_comm: true``, buckets reduced while backward runs;
* ``compute``: the ``off`` engine under ``no_sync()``: the same forward + backward, no reduction.

Reported by rank 0 (the slowest rank's time per round): medians over rounds, ``ratio`` = median of
the per-round ``on / off`` ratios, and ``hidden`` = (off - on) / (off - compute), the share of the
reduction time no longer on the critical path (1: fully hidden, 0: nothing hidden).

    python benchmarks/bench_overlap.py --world 2 [--rounds 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import moesaic  # noqa: E402


class Model(nn.Module):
    def __init__(self, h: int, ffn: int, layers: int, experts: int):
        super().__init__()
        torch.manual_seed(0)
        blocks = []
        for _ in range(layers):
            blocks.append(nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h)))
            blocks.append(moesaic.MoE(h, nn.Sequential(nn.Linear(h, ffn), nn.GELU(), nn.Linear(ffn, h)),
                                      num_experts=experts, k=2, drop_tokens=False))
        self.blocks = nn.ModuleList(blocks)
        moesaic.name_moe_layers(self)

    def forward(self, x):
        for block in self.blocks:
            out = block(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x.float().pow(2).mean()


def _engine(args, overlap: bool):
    model = Model(args.hidden, args.ffn, args.layers, args.experts)
    moesaic.setup_expert_parallel(model)
    engine, _, _, _ = moesaic.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": args.tokens, "bf16": {"enabled": args.bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 0, "overlap_comm": overlap, "reduce_bucket_size": args.bucket}})
    return engine


def _timed(engine, x, no_sync: bool = False) -> float:
    dist.barrier()
    start = time.perf_counter()
    if no_sync:
        with engine.no_sync():
            engine.backward(engine(x))
    else:
        engine.backward(engine(x))
    elapsed = time.perf_counter() - start
    engine.zero_grad()
    slowest = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    off, on = _engine(args, False), _engine(args, True)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(torch.bfloat16 if args.bf16 else torch.float32)
    for e in (off, on):  # warm-up
        _timed(e, x)
    rows = []
    for r in range(args.rounds):
        order = [("off", off, False), ("on", on, False), ("compute", off, True)]
        if r % 2:
            order.reverse()
        rows.append({name: _timed(e, x, ns) for name, e, ns in order})
    if rank == 0:
        med = {k: statistics.median(row[k] for row in rows) for k in ("off", "on", "compute")}
        ratio = statistics.median(row["on"] / row["off"] for row in rows)
        reduce_s = med["off"] - med["compute"]
        hidden = (med["off"] - med["on"]) / reduce_s if reduce_s > 0 else float("nan")
        params = sum(p.numel() for p in on.module.parameters())
        queue.put({"world": world, "dtype": "bf16" if args.bf16 else "fp32", "params": params, "rounds": args.rounds, "median_s": med, "ratio_on_off": ratio,
                   "reduction_s": reduce_s, "hidden_share": hidden,
                   "buckets_started_in_backward": on._overlap.last_launched_in_backward,
                   "buckets": sum(len(b) for b in on._overlap.buckets().values())})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank per micro-batch")
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters (default fp32)")
    parser.add_argument("--bucket", type=int, default=2 * 1024 * 1024, help="reduce_bucket_size (elements)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args.world, port, args, queue), nprocs=args.world, start_method="spawn")
    result = queue.get()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
