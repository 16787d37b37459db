"""The seed's question, measured: does a group per expert cost more than a group per layer?

Model: 8 MoE layers x 64 experts (expert = Linear(256, 512)-GELU-Linear(512, 256)), bf16
parameters with fp32 master weights, AdamW; only ``optimizer.step()`` is timed, on fixed
gradients. Configurations:

* ``layer``: ``split_by="layer"`` (8 groups);
* ``expert``: ``split_by="expert"`` (512 groups);
* each with fusion (consecutive groups with equal hyperparameters stepped by one ``foreach`` call
  up to ``fuse_elems`` elements) and without (a Python loop over the groups);
* ``fuse_elems`` = one layer's size: the fp32 working set of a layer, with per-expert identity;
* the engine's default: fusion up to ``min(max_group_size, 2**19)`` elements.

Step time: median over rounds, configurations interleaved in one process, plus the ratio to
``layer`` per round. Peak memory: a fresh process per configuration, optimizer transient =
peak RSS during one step minus RSS before it (glibc returns freed blocks; see
bench_mixed_precision.py for the method).

    python benchmarks/bench_param_groups.py [--rounds 7]
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
from moesaic.optim.mixed_precision import GroupedMixedPrecisionOptimizer, default_fuse_elems  # noqa: E402

H, FFN, LAYERS, EXPERTS = 256, 512, 8, 64
MIB = 2 ** 20
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
LAYER_ELEMS = EXPERTS * (H * FFN * 2 + FFN + H)
CONFIGS = {  # name: (split_by, fuse_elems)
    "layer, fused": ("layer", 178956971),
    "expert, fused": ("expert", 178956971),
    "expert, fused per layer": ("expert", LAYER_ELEMS),
    "expert, engine default": ("expert", "default"),
    "layer, unfused": ("layer", None),
    "expert, unfused": ("expert", None),
}


def build(config: str):
    torch.manual_seed(0)
    model = nn.ModuleList([moesaic.MoE(H, nn.Sequential(nn.Linear(H, FFN), nn.GELU(), nn.Linear(FFN, H)),
                                       num_experts=EXPERTS, k=2) for _ in range(LAYERS)])
    moesaic.name_moe_layers(model)
    model.to(torch.bfloat16)
    split_by, fuse = CONFIGS[config]
    cap = 178956971 if fuse == "default" else fuse
    groups = build_param_groups(model, index=ExpertIndex.build(model), split_by=split_by, max_group_size=cap)
    fuse = default_fuse_elems(cap) if fuse == "default" else fuse
    opt = GroupedMixedPrecisionOptimizer(groups, "AdamW", dict(lr=1e-4), fuse_elems=fuse)
    grads = [torch.randn_like(p) for p in model.parameters()]
    params = list(model.parameters())

    def step():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step, len(groups), len(opt._batches())


def _kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def child(config: str) -> dict:
    step, n_groups, n_batches = build(config)
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS")
    step()
    return {"opt_transient_mib": (_kib("VmHWM") - before) / 1024, "peak_mib": _kib("VmHWM") / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "param_groups.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    steps, info = {}, {}
    for name in CONFIGS:
        fn, n_groups, n_batches = build(name)
        fn()  # warm-up: optimizer state
        steps[name] = fn
        info[name] = {"groups": n_groups, "foreach_batches": n_batches}
    times = {n: [] for n in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    del steps
    rows = {}
    for name in CONFIGS:
        mem = json.loads(subprocess.run([sys.executable, __file__, "--child", name], env=dict(os.environ, **ENV),
                                        capture_output=True, text=True, check=True, timeout=900).stdout)
        rows[name] = {**info[name], "step_ms": 1000 * statistics.median(times[name]),
                      "vs_layer_fused": statistics.median(a / b for a, b in zip(times[name], times["layer, fused"])),
                      **mem}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| configuration | groups | foreach calls | step ms | vs layer, fused | optimizer transient MiB | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['groups']} | {r['foreach_batches']} | {r['step_ms']:.0f} | {r['vs_layer_fused']:.2f} | "
              f"{r['opt_transient_mib']:.0f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
