"""Peak memory and time of a bf16 training step: group-by-group stepping vs the all-at-once recipe.

Model (issue #4): 8 MoE layers x 16 experts (h=512, ffn=2048, top-2, dropless) with a dense
Linear(h, 4h)-GELU-Linear(4h, h) block before each, bf16 parameters, AdamW.

* (a) moesaic: ``GroupedMixedPrecisionOptimizer`` with ``max_group_size`` = one expert's size:
  each group's gradients are upcast, stepped and released before the next group;
* (b) baseline, torch's plain mixed-precision recipe: every gradient upcast to fp32 first, then
  one ``torch.optim.AdamW(foreach=True)`` step over all fp32 master weights, then a copy back.

Method: a fresh process per run; glibc returns large blocks to the OS (``MALLOC_MMAP_THRESHOLD_``)
so RSS follows the tensors; after two warm-up steps (so optimizer state exists) the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``) and one training step (forward, backward,
optimizer) is measured: ``peak`` is VmHWM during the step, ``transient`` is VmHWM minus the RSS
before it. The optimizer phase alone is measured the same way (``opt transient``).
``--check-memory`` shows the method measures a known 256 MiB allocation.

    python benchmarks/bench_mixed_precision.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import moesaic  # noqa: E402
from moesaic.layer.identity import ExpertIndex  # noqa: E402
from moesaic.optim.build_groups import build_param_groups  # noqa: E402
from moesaic.optim.mixed_precision import GroupedMixedPrecisionOptimizer  # noqa: E402

H, FFN, LAYERS, EXPERTS, TOKENS = 512, 2048, 8, 16, 512
MIB = 2 ** 20
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        blocks = []
        for _ in range(LAYERS):
            blocks.append(nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H)))
            blocks.append(moesaic.MoE(H, nn.Sequential(nn.Linear(H, FFN), nn.GELU(), nn.Linear(FFN, H)),
                                      num_experts=EXPERTS, k=2, drop_tokens=False))
        self.blocks = nn.ModuleList(blocks)
        moesaic.name_moe_layers(self)

    def forward(self, x):
        for block in self.blocks:
            out = block(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x.float().pow(2).mean()


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class AllAtOnce:
    """Baseline: upcast every gradient, then one fp32 AdamW step, then copy back."""

    def __init__(self, model):
        self.params = [p for p in model.parameters()]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.masters, lr=1e-4, foreach=True)

    def step(self):
        for m, p in zip(self.masters, self.params):
            m.grad = p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.masters, self.params):
                p.copy_(m)
        for m, p in zip(self.masters, self.params):
            m.grad = None
            p.grad = None


def child(mode: str) -> dict:
    torch.manual_seed(0)
    model = Model().to(torch.bfloat16)
    expert_size = sum(p.numel() for p in model.blocks[1].experts[0].parameters())
    if mode == "grouped":
        groups = build_param_groups(model, index=ExpertIndex.build(model), split_by="expert",
                                    max_group_size=expert_size)
        opt = GroupedMixedPrecisionOptimizer(groups, "AdamW", dict(lr=1e-4), fuse_elems=expert_size)
        largest = max(sum(p.numel() for p in g["params"]) for g in groups)
        n_groups = len(groups)
    else:
        opt = AllAtOnce(model)
        largest = sum(p.numel() for p in model.parameters())
        n_groups = 1
    x = torch.randn(TOKENS, H, dtype=torch.bfloat16)

    def train_step(measure_opt=False):
        model(x).backward()
        if measure_opt:
            _reset_peak()
            before = _kib("VmRSS")
            opt.step()
            return (_kib("VmHWM") - before) * 1024
        opt.step()
        return None

    for _ in range(2):
        train_step()
    _reset_peak()
    before = _kib("VmRSS")
    t0 = time.perf_counter()
    train_step()
    elapsed = time.perf_counter() - t0
    peak = _kib("VmHWM") * 1024
    transient = peak - before * 1024
    opt_transient = train_step(measure_opt=True)
    return {"mode": mode, "peak_mib": peak / MIB, "step_transient_mib": transient / MIB,
            "opt_transient_mib": opt_transient / MIB, "largest_group_fp32_mib": largest * 4 / MIB,
            "groups": n_groups, "step_s": elapsed, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "peak_fp32_grad_mib": getattr(opt, "peak_fp32_grad_elems", largest) * 4 / MIB}


def run_child(mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode], env=dict(os.environ, **ENV),
                         capture_output=True, text=True, timeout=1800, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def check_memory() -> None:
    _reset_peak()
    before = _kib("VmRSS")
    t = torch.ones(64 * MIB)  # 256 MiB, written
    del t
    seen = (_kib("VmHWM") - before) / 1024
    print(f"known allocation 256.0 MiB -> measured {seen:.1f} MiB")
    if not 243 <= seen <= 282:
        raise SystemExit("the memory method failed to measure a known allocation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per mode (medians reported)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--check-memory", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mixed_precision.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    if args.check_memory:
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") != ENV["MALLOC_MMAP_THRESHOLD_"]:
            os.execve(sys.executable, [sys.executable, __file__, "--check-memory"], dict(os.environ, **ENV))
        check_memory()
        return
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    runs = {"grouped": [], "all_at_once": []}
    for _ in range(args.repeats):
        for mode in runs:  # alternate, so machine noise hits both
            runs[mode].append(run_child(mode))
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {k: statistics.median(r[k] for r in rs) if isinstance(rs[0][k], (int, float)) else rs[0][k]
                         for k in rs[0]}
    a, b = summary["grouped"], summary["all_at_once"]
    summary["peak_reduction"] = 1 - a["peak_mib"] / b["peak_mib"]
    summary["time_ratio"] = statistics.median(x["step_s"] / y["step_s"] for x, y in zip(runs["grouped"],
                                                                                        runs["all_at_once"]))
    summary["opt_transient_vs_largest_group"] = a["opt_transient_mib"] / a["largest_group_fp32_mib"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"| stepping | params (M) | groups | peak RSS MiB | step transient MiB | optimizer transient MiB | "
          f"largest group fp32 MiB | step s |\n|---|---|---|---|---|---|---|---|")
    for mode in ("grouped", "all_at_once"):
        r = summary[mode]
        print(f"| {mode} | {r['params_m']:.0f} | {r['groups']} | {r['peak_mib']:.0f} | {r['step_transient_mib']:.0f} | "
              f"{r['opt_transient_mib']:.0f} | {r['largest_group_fp32_mib']:.1f} | {r['step_s']:.2f} |")
    print(f"peak reduction {summary['peak_reduction']:.1%}, step time ratio {summary['time_ratio']:.3f}, optimizer "
          f"transient / largest group {summary['opt_transient_vs_largest_group']:.2f}")


if __name__ == "__main__":
    main()
