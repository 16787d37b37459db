"""Expert-parallel MoE layer on 2 gloo processes: step time and all-to-all bytes, moesaic vs DeepSpeed.

Settings (issue #3): ep_size=2 on 2 processes, 8192 tokens per rank, E=16, k=2, h=256, expert =
Linear(h,4h)-GELU-Linear(4h,h), fp32, one thread per process (2 processes on 2 cores). Each round
runs one forward+backward of every contender, with a barrier before each, and the medians over
rounds are reported by rank 0. DeepSpeed 0.19.8's layer runs side by side when it is installed.

Bytes: the rows each rank sends to its peers per step (dispatch and return), times h x 4 bytes,
worked out from the routing counts (the layer keeps no traffic counters). A rank's block for its
own experts is not traffic: moesaic keeps it out of the collective, DeepSpeed copies it locally.
Capacity mode moves fixed [L, C, h] blocks to each peer both ways (as DeepSpeed); dropless mode
moves exactly the routed rows; DeepSpeed's dropless mode pads every expert to the largest count
in the group.

Memory (``--memory``, instead of timing): the transient peak RSS of one forward+backward on each
rank (peak minus RSS before the step, the kernel's peak mark reset first), with glibc told to
return freed blocks to the OS so RSS follows the tensors (bench_layer's method); the larger rank.

    python benchmarks/bench_ep.py [--rounds 9] [--tokens 8192] [--memory]
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
from moesaic.layer.gate import expert_capacity  # noqa: E402

H, E, K = 256, 16, 2


def expert():
    return nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H))


def have_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
        return True
    except Exception:
        return False


def worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    use_ds = have_deepspeed() and not args.no_deepspeed
    if use_ds:
        import logging

        import deepspeed
        from deepspeed.moe.layer import MoE as DSMoE
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=600))
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    results = {}
    for mode in ("capacity", "dropless"):
        kw = dict(num_experts=E, k=K, capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
                  drop_tokens=mode == "capacity")
        torch.manual_seed(0)
        ours = moesaic.MoE(H, expert(), ep_size=world, **kw)
        ours.set_deepspeed_parallelism()
        layers = {"moesaic": ours}
        if use_ds:
            ds = DSMoE(H, expert(), ep_size=world, **kw)
            ds.set_deepspeed_parallelism()
            layers["deepspeed"] = ds
        x = torch.randn(args.tokens, H, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        g = torch.randn(args.tokens, H)

        def step(layer):
            out, l_aux, _ = layer(x)
            torch.autograd.backward([out, l_aux], [g, torch.ones(())])

        for layer in layers.values():
            step(layer)  # warm-up
        if args.memory:
            peaks = {}
            for name, layer in layers.items():
                dist.barrier()
                peaks[name] = transient_mib(lambda: step(layer))
            rows = [None] * world
            dist.all_gather_object(rows, peaks)
            results[mode] = {f"{n}_peak_mib": max(r[n] for r in rows) for n in layers}
            continue
        times = {name: [] for name in layers}
        for _ in range(args.rounds):
            for name, layer in layers.items():
                dist.barrier()
                t0 = time.perf_counter()
                step(layer)
                dist.barrier()
                times[name].append(time.perf_counter() - t0)
        routes = int(ours.tokens_per_expert.sum())
        # every rank's kept routes per expert: row p = what rank p routed to each global expert
        counts = [torch.zeros_like(ours.tokens_per_expert) for _ in range(world)]
        dist.all_gather(counts, ours.tokens_per_expert)
        counts_PE = torch.stack(counts)
        L = E // world
        mine = slice(rank * L, (rank + 1) * L)
        row = {f"{n}_ms": 1000 * statistics.median(t) for n, t in times.items()}
        if "deepspeed" in times:
            row["speedup_vs_deepspeed"] = statistics.median(d / m for d, m in zip(times["deepspeed"], times["moesaic"]))
        row["routes"] = routes
        mib = H * 4 / 2**20  # per row
        if mode == "capacity":
            C = expert_capacity(args.tokens, E, args.capacity_factor, K, 4)
            row["capacity"] = C
            # one [L, C, h] block to each peer, and one back: the same buffers as DeepSpeed's
            row["moesaic_a2a_mib"] = row["deepspeed_a2a_mib"] = 2 * (world - 1) * L * C * mib
        else:
            sent = int(counts_PE[rank].sum() - counts_PE[rank, mine].sum())  # my routes to peers' experts
            returned = int(counts_PE[:, mine].sum() - counts_PE[rank, mine].sum())  # peers' routes to mine
            row["moesaic_a2a_mib"] = (sent + returned) * mib
            cmax = ours.exp_counts.max().clone()
            dist.all_reduce(cmax, op=dist.ReduceOp.MAX)  # DeepSpeed pads every expert to this count
            row["deepspeed_a2a_mib"] = 2 * (world - 1) * L * int(cmax) * mib
        results[mode] = row
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def transient_mib(fn) -> float:
    """MiB of peak RSS above the RSS before ``fn()``."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _kib("VmRSS")
    fn()
    return (_kib("VmHWM") - before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    ap.add_argument("--capacity-factor", type=float, default=1.0)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--memory", action="store_true", help="measure transient peak RSS per rank instead of time")
    ap.add_argument("--out", default=None, help="results file (default: results/ep.json, ep_memory.json with --memory)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(Path(__file__).parent / "results" / ("ep_memory.json" if args.memory else "ep.json"))
    if args.rounds < 1 or args.tokens < 1:
        ap.error("--rounds and --tokens must be >= 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.memory:  # the ranks are fresh processes: glibc reads these when they start
        os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0")
    mp.start_processes(worker, args=(2, port, args, args.out), nprocs=2, join=True, start_method="spawn")
    results = json.loads(Path(args.out).read_text())
    print(json.dumps(results, indent=1))
    if args.memory:
        names = [k[:-len("_peak_mib")] for k in next(iter(results.values()))]
        print("| mode | " + " | ".join(f"peak MiB {n}" for n in names) + " |\n|" + "---|" * (len(names) + 1))
        for mode, r in results.items():
            print(f"| {mode} | " + " | ".join(f"{r[n + '_peak_mib']:.0f}" for n in names) + " |")
        return
    has_ds = any("deepspeed_ms" in r for r in results.values())
    head = ["mode", "moesaic ms"] + (["DeepSpeed ms", "speed-up"] if has_ds else []) + \
        ["a2a MiB/rank to peers moesaic", "DeepSpeed (same settings)", "routes kept on rank 0"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for mode, r in results.items():
        cells = [mode, f"{r['moesaic_ms']:.0f}"]
        if has_ds:
            cells += [f"{r['deepspeed_ms']:.0f}", f"{r['speedup_vs_deepspeed']:.2f}x"]
        cells += [f"{r['moesaic_a2a_mib']:.1f}", f"{r['deepspeed_a2a_mib']:.1f}", f"{r['routes']}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
