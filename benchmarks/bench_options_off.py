"""Do the new layer options cost anything when they are off? This branch's layer against a baseline.

The baseline is the package as another git revision has it (default ``main``), extracted into a
temporary folder under the name ``moesaic_base`` and imported beside this checkout's ``moesaic``
in the same process. For each point of ``bench_layer``'s table both layers (same seed, so the same
weights) run forward+backward in paired rounds, alternating which goes first; the figure is the
median over rounds of this layer's CPU time over the baseline's in the same round (process CPU
time, all threads: a busy shared machine slows a round's wall clock far more than its CPU time).
The outputs of the two layers are checked to be bitwise equal first.

    python benchmarks/bench_options_off.py                  # against main
    python benchmarks/bench_options_off.py --base HEAD~3 --repeats 21
    python benchmarks/bench_options_off.py --base 8c08a7d --repeats 9 --threads 1   # before the modern-layer merge
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import moesaic  # noqa: E402

# (tokens, experts, k, capacity factor or None for dropless): points of bench_layer's table
POINTS = [(2048, 8, 1, 1.0), (2048, 64, 2, 1.25), (8192, 8, 2, 1.0), (8192, 64, 1, 1.25), (8192, 64, 2, None),
          (8192, 64, 8, None)]
H = 256


def load_base(ref: str):
    """The package at git revision ``ref``, importable as ``moesaic_base``."""
    tmp = Path(tempfile.mkdtemp(prefix="moesaic-base-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src/moesaic"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "src" / "moesaic").rename(tmp / "src" / "moesaic_base")
    sys.path.insert(0, str(tmp / "src"))
    return importlib.import_module("moesaic_base")


def build(pkg, point, seed=0):
    S, E, k, cf = point
    torch.manual_seed(seed)
    layer = pkg.MoE(H, nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H)), num_experts=E, k=k,
                    capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0, drop_tokens=cf is not None,
                    use_rts=False, top2_2nd_expert_sampling=False)
    x = torch.randn(S, H, requires_grad=True)
    g = torch.randn(S, H)

    def step():
        out, l_aux, _ = layer(x)
        torch.autograd.backward([out, l_aux], [g, torch.ones(())])
        return out

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="git revision of the baseline (default: main)")
    ap.add_argument("--repeats", type=int, default=15, help="paired rounds per point")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default: torch's choice; 1 is steadiest on a busy machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "options_off.json"))
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 0:
        ap.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.base)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; this checkout vs {args.base}", flush=True)
    rows = []
    for point in POINTS:
        new_step, base_step = build(moesaic, point), build(base, point)
        if not torch.equal(new_step(), base_step()):  # also the warm-up
            raise SystemExit(f"{point}: outputs differ from the baseline's")
        ratios, walls = [], []
        for i in range(args.repeats):
            order = [(new_step, "new"), (base_step, "base")] if i % 2 == 0 else [(base_step, "base"), (new_step, "new")]
            cpu, wall = {}, {}
            for fn, name in order:
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                cpu[name], wall[name] = time.process_time() - c0, time.perf_counter() - w0
            ratios.append(cpu["new"] / cpu["base"])
            walls.append(wall["new"] / wall["base"])
        q = statistics.quantiles(ratios, n=4)
        S, E, k, cf = point
        row = {"point": f"S={S} E={E} k={k} {'dropless' if cf is None else f'cf={cf}'}",
               "cpu_ratio": statistics.median(ratios), "cpu_ratio_q1": q[0], "cpu_ratio_q3": q[2],
               "wall_ratio": statistics.median(walls)}
        rows.append(row)
        print(json.dumps({k_: round(v, 3) if isinstance(v, float) else v for k_, v in row.items()}), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| point | CPU time new/base (median) | IQR | wall new/base |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['point']} | {r['cpu_ratio']:.3f} | {r['cpu_ratio_q1']:.3f}-{r['cpu_ratio_q3']:.3f} | "
              f"{r['wall_ratio']:.3f} |")


if __name__ == "__main__":
    main()
