"""Forward+backward of one MoE layer: moesaic vs the limit vs DeepSpeed 0.19.8 (where installed).

The *limit* is the same expert modules run on exactly the pieces moesaic's router kept at that
point (its tokens per expert), inputs and output gradients already split per expert: no router,
no gather, no concatenation, no combine. (An earlier version split the kept count evenly and
concatenated the outputs, so it also timed one `(N, D)` copy forward and a split backward, which
is not expert compute: that copy made every layer's ratio look smaller, the more so at E=256;
``results/layer.json`` was measured with it.) ``ratio`` is the median over rounds of a layer's
time over the limit's in the same round (contenders run round-robin, so a slow patch of this
shared machine hits both sides of a ratio).

Transient peak memory is measured in a fresh process per (point, contender): inputs and the layer
are built, one warm-up step runs, the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``),
one more step runs, and the transient is peak RSS (VmHWM) minus RSS before that step. glibc is
told to return large blocks to the OS (``MALLOC_MMAP_THRESHOLD_``), so RSS follows the tensors.
``--check-memory`` shows the method detects a known 256 MiB allocation.

Allocator: by default the script re-runs itself with glibc told to keep freed memory
(``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_``/``MALLOC_MMAP_THRESHOLD_``), the CPU equivalent
of a caching allocator (PyTorch's CPU tuning guide recommends jemalloc/tcmalloc for the same
reason). Otherwise every step pays the VM's page faults on freshly mapped memory, a cost that
grows with the number of bytes allocated and says nothing about the layer. It applies to every
contender alike; ``--system-malloc`` measures with glibc's defaults instead.

Fine-grained points (``--fine``: DeepSeek/Qwen3-style many small experts, S=8192, D=256, E=256,
k=8, expert hidden 128) add a ``stacked`` contender (the same layer with ``stacked_experts=True``)
and ``router``: the layer's router alone, forward and backward (its `(S, D) x (D, E)` GEMM,
softmax, top-k, capacity and weights). With E=256 the router is no longer small next to experts
of hidden 128 (its GEMMs are ``E / (2 k F)`` = 1/8 of the experts' FLOPs), so ``1 + router ratio``
is a floor for any layer's ratio to the limit, which counts expert compute only.

    python benchmarks/bench_layer.py                 # the full table (about 20-30 min on 2 cores)
    python benchmarks/bench_layer.py --quick         # three points
    python benchmarks/bench_layer.py --fine          # the fine-grained points only
    python benchmarks/bench_layer.py --fine --threads 1 --clock cpu   # steadier on a shared machine
    python benchmarks/bench_layer.py --check-memory  # validate the memory method
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import moesaic  # noqa: E402

H = 256
KEEP_MEMORY_ENV = {"MALLOC_TRIM_THRESHOLD_": "100000000000", "MALLOC_TOP_PAD_": "1000000000",
                   "MALLOC_MMAP_THRESHOLD_": "4000000000"}
MIB = 1024 * 1024

try:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.moe.layer import MoE as DeepSpeedMoE  # type: ignore
except Exception:  # DeepSpeed is optional: the table then has no DeepSpeed column
    DeepSpeedMoE = None


@dataclass(frozen=True)
class Point:
    tokens: int
    experts: int
    k: int
    capacity_factor: float
    dropless: bool = False
    hidden: int = H
    ffn: int = 4 * H

    @property
    def fine(self) -> bool:
        return self.ffn != 4 * self.hidden

    @property
    def label(self) -> str:
        mode = "dropless" if self.dropless else f"cf={self.capacity_factor}"
        shape = f" D={self.hidden} F={self.ffn}" if self.fine else ""
        return f"S={self.tokens} E={self.experts} k={self.k} {mode}{shape}"


def fine_points() -> list:
    """DeepSeek/Qwen3-style fine-grained experts: many small experts, k=8."""
    return [Point(8192, 256, 8, 1.0, hidden=256, ffn=128), Point(8192, 256, 8, 1.0, dropless=True, hidden=256, ffn=128)]


def all_points(quick: bool) -> list:
    if quick:
        return [Point(2048, 8, 1, 1.0), Point(8192, 64, 2, 1.25), Point(8192, 64, 2, 1.0, dropless=True)]
    pts = [Point(s, e, k, cf) for s in (2048, 8192, 32768) for e in (8, 64) for k in (1, 2) for cf in (1.0, 1.25)]
    return pts + [Point(8192, 64, 2, 1.0, dropless=True), Point(8192, 64, 8, 1.0, dropless=True)]


def expert(p: Point) -> nn.Module:
    return nn.Sequential(nn.Linear(p.hidden, p.ffn), nn.GELU(), nn.Linear(p.ffn, p.hidden))


def layer_kwargs(p: Point) -> dict:
    return dict(num_experts=p.experts, k=p.k, capacity_factor=p.capacity_factor, eval_capacity_factor=p.capacity_factor,
                drop_tokens=not p.dropless)


def build(p: Point, which: str, seed: int = 0):
    """Returns (step_fn, routed_count) for one contender at one point; step_fn runs forward+backward."""
    torch.manual_seed(seed)
    H = p.hidden
    x = torch.randn(p.tokens, H, requires_grad=True)
    if which in ("moesaic", "limit", "router"):
        layer = moesaic.MoE(H, expert(p), **layer_kwargs(p))
    elif which == "stacked":
        layer = moesaic.MoE(H, expert(p), stacked_experts=True, **layer_kwargs(p))
    else:
        layer = DeepSpeedMoE(H, expert(p), **layer_kwargs(p))
    g_out = torch.randn(p.tokens, H)

    def step_layer():
        out, l_aux, _ = layer(x)
        torch.autograd.backward([out, l_aux], [g_out, torch.ones(())])

    if which == "router":  # the router alone: logits GEMM, scores, top-k, capacity, weights, l_aux; + backward
        with torch.no_grad():
            g_weight = torch.randn_like(layer.gate(x).weight_N)

        def step_router():
            routing = layer.gate(x)
            torch.autograd.backward([routing.weight_N, routing.l_aux], [g_weight, torch.ones(())])

        return step_router, None
    if which != "limit":
        return step_layer, None
    # the limit: the experts on exactly the pieces moesaic's router kept (its tokens per expert),
    # inputs and output gradients already split: no router, no gather, no concatenation, no combine
    with torch.no_grad():
        layer(x)
    splits = layer.tokens_per_expert.tolist()
    routed = sum(splits)
    experts = list(layer.experts)
    xs = [t.detach().requires_grad_() for t in torch.randn(routed, H).split(splits)]
    gs = list(torch.randn(routed, H).split(splits))

    def step_limit():
        torch.autograd.backward([e(chunk) for e, chunk in zip(experts, xs)], gs)

    return step_limit, routed


def contenders(p: Point) -> list:
    stacked = ["stacked", "router"] if p.fine else []
    # DeepSpeed 0.19.8 dispatches top-k routes by index (sparse routes), so dropless k=8 runs too
    # (its capacity is then the fullest expert's count, and every expert computes that many rows)
    ds = ["deepspeed"] if DeepSpeedMoE is not None else []
    return ["limit", "moesaic"] + stacked + ds


def time_point(p: Point, repeats: int, clock=time.perf_counter) -> dict:
    steps = {}
    routed = None
    for which in contenders(p):
        fn, r = build(p, which)
        routed = r if r is not None else routed
        fn()  # warm-up
        steps[which] = fn
    times = {w: [] for w in steps}
    for _ in range(repeats):
        for w, fn in steps.items():  # round-robin: noise hits every contender alike
            t0 = clock()
            fn()
            times[w].append(clock() - t0)
    result = {"routed": routed, **{f"{w}_ms": 1000 * statistics.median(t) for w, t in times.items()}}
    # paired ratios: each round's contenders ran back to back, so a slow patch of the machine
    # inflates both sides of a ratio; the median over rounds is robust to the rest
    for w in steps:
        if w != "limit":
            result[f"{w}_ratio"] = statistics.median(a / b for a, b in zip(times[w], times["limit"]))
    if "deepspeed" in steps:
        result["speedup_vs_deepspeed"] = statistics.median(d / m for d, m in zip(times["deepspeed"], times["moesaic"]))
        if "stacked" in steps:
            result["stacked_speedup_vs_deepspeed"] = statistics.median(
                d / m for d, m in zip(times["deepspeed"], times["stacked"]))
    return result


# --- memory, in a fresh process -----------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def measure_transient(fn) -> int:
    """Bytes of peak RSS above the RSS before ``fn()``."""
    _reset_peak()
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def memory_child(p: Point, which: str) -> None:
    torch.set_num_threads(1)  # threads' scratch buffers would add noise unrelated to the layer
    fn, _ = build(p, which)
    fn()
    print(json.dumps({"bytes": measure_transient(fn)}))


def memory_point(p: Point, which: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0")
    cmd = [sys.executable, __file__, "--memory-child", which, json.dumps(asdict(p))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["bytes"]


def check_memory() -> None:
    """The method must see a known allocation: a 256 MiB tensor written then freed inside fn."""
    def fn():
        t = torch.ones(64 * MIB, dtype=torch.float32)  # 256 MiB, touched
        del t
    seen = measure_transient(fn)
    print(f"known allocation 256.0 MiB -> measured transient {seen / MIB:.1f} MiB")
    if not 0.95 * 256 * MIB <= seen <= 1.1 * 256 * MIB:
        raise SystemExit("memory method failed to measure a known allocation")


# --- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three points instead of the full table")
    ap.add_argument("--fine", action="store_true", help="the fine-grained points only (E=256, k=8, F=128)")
    ap.add_argument("--repeats", type=int, default=0, help="timed steps per contender (default: by size)")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    ap.add_argument("--check-memory", action="store_true", help="validate the memory method and exit")
    ap.add_argument("--system-malloc", action="store_true", help="time with glibc's default allocator settings")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: process CPU time (steadier on a busy machine; "
                         "best with --threads 1)")
    ap.add_argument("--out", default=None,
                    help="results JSON (default results/layer.json, layer_fine.json with --fine)")
    ap.add_argument("--memory-child", nargs=2, metavar=("WHICH", "POINT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(Point(**json.loads(args.memory_child[1])), args.memory_child[0])
        return
    if args.check_memory:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0")
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
            os.execve(sys.executable, [sys.executable, __file__, "--check-memory"], env)
        check_memory()
        return
    if not args.system_malloc and os.environ.get("MOESAIC_BENCH_ALLOCATOR") != "keep":
        env = dict(os.environ, MOESAIC_BENCH_ALLOCATOR="keep", **KEEP_MEMORY_ENV)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.repeats < 0:
        ap.error(f"--repeats must be >= 0, got {args.repeats}")
    if args.threads < 0:
        ap.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DeepSpeed: "
          f"{'yes' if DeepSpeedMoE is not None else 'not installed'}, allocator: "
          f"{'glibc defaults' if args.system_malloc else 'glibc keeping freed memory'}, clock: {args.clock}",
          flush=True)
    rows = []
    for p in (fine_points() if args.fine else all_points(args.quick)):
        repeats = args.repeats or (11 if p.tokens <= 8192 else 5)
        row = {"point": p.label, **asdict(p), "threads": torch.get_num_threads(), "clock": args.clock,
               **time_point(p, repeats, clock)}
        row["ratio_to_limit"] = row.pop("moesaic_ratio")
        if "deepspeed_ms" in row:
            row["deepspeed_ratio_to_limit"] = row.pop("deepspeed_ratio")
        if not args.no_memory:
            for which in (w for w in contenders(p) if w != "router"):
                row[f"{which}_peak_mib"] = memory_point(p, which) / MIB
            row["mem_vs_limit"] = row["moesaic_peak_mib"] / row["limit_peak_mib"]
            if "deepspeed_peak_mib" in row:
                row["mem_vs_deepspeed"] = row["moesaic_peak_mib"] / row["deepspeed_peak_mib"]
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out is None:
        args.out = str(Path(__file__).parent / "results" / ("layer_fine.json" if args.fine else "layer.json"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list) -> None:
    has_ds = any("deepspeed_ms" in r for r in rows)
    has_mem = any("moesaic_peak_mib" in r for r in rows)
    has_stacked = any("stacked_ms" in r for r in rows)
    head = ["point", "routed", "limit ms", "moesaic ms", "ratio"]
    head += ["stacked ms", "stacked ratio", "router ms", "floor (1 + router ratio)"] if has_stacked else []
    if has_ds:
        head += ["DeepSpeed ms", "DS ratio", "speed-up vs DS"] + (["stacked speed-up vs DS"] if has_stacked else [])
    if has_mem:
        head += ["peak MiB limit", "peak MiB moesaic"] + (["peak MiB DS"] if has_ds else []) + ["mem/limit"]
        head += ["mem/DS"] if has_ds else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["point"], str(r["routed"]), f"{r['limit_ms']:.1f}", f"{r['moesaic_ms']:.1f}",
                 f"{r['ratio_to_limit']:.3f}"]
        if has_stacked:
            cells += [f"{r['stacked_ms']:.1f}", f"{r['stacked_ratio']:.3f}", f"{r['router_ms']:.1f}",
                      f"{1 + r['router_ratio']:.3f}"] if "stacked_ms" in r else ["-"] * 4
        if has_ds:
            cells += [f"{r['deepspeed_ms']:.1f}", f"{r['deepspeed_ratio_to_limit']:.2f}",
                      f"{r['speedup_vs_deepspeed']:.2f}x"] if "deepspeed_ms" in r else ["-", "-", "-"]
            if has_stacked:
                cells += [f"{r['stacked_speedup_vs_deepspeed']:.2f}x" if "stacked_speedup_vs_deepspeed" in r else "-"]
        if has_mem:
            cells += [f"{r['limit_peak_mib']:.0f}", f"{r['moesaic_peak_mib']:.0f}"]
            cells += [f"{r['deepspeed_peak_mib']:.0f}" if "deepspeed_peak_mib" in r else "-"] if has_ds else []
            cells += [f"{r['mem_vs_limit']:.2f}"]
            cells += [f"{r['mem_vs_deepspeed']:.2f}" if "mem_vs_deepspeed" in r else "-"] if has_ds else []
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
