"""Layout invariance (issue 24, item 5): every layout trains as W=1, ZeRO stage 0 does.

The CI subset: 6 layouts at W=2 and 4 (one process group per world size; W=1 computes the
references), covering every ZeRO stage, ep_size, expert storage, routing and recompute policy
(tests/distributed/invariance_matrix.py says what is compared and how).
``make invariance`` runs the whole matrix (``MOESAIC_INVARIANCE=full``); docs/invariance.md has
its table and tolerance.
"""

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from invariance_matrix import world_worker  # noqa: E402
from launch import run_ranks  # noqa: E402

FULL = os.environ.get("MOESAIC_INVARIANCE") == "full"


def test_every_layout_equals_w1_stage0():
    tmp = tempfile.mkdtemp(prefix="moesaic-invariance-")
    ref = os.path.join(tmp, "reference.pt")
    rows, started = [], time.perf_counter()
    for world in (1, 2, 4):
        report = os.path.join(tmp, f"report{world}.pt")
        print(f"W={world} from {time.perf_counter() - started:.1f} s")
        run_ranks(world_worker, world, FULL, ref, report, timeout_s=5400 if FULL else 300, pg_timeout_s=300)
        rows += torch.load(report, weights_only=False)
    worst = {}
    for _, w, _ in rows:
        for k, v in w.items():
            worst[k] = max(worst.get(k, 0.0), v)
    print(f"\n{len(rows)} layouts, {sum(t for *_, t in rows):.1f} s of layout runs; largest |difference| "
          f"per quantity: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(worst.items())))
    if FULL:
        for name, w, t in rows:
            print(f"{name}: {t:.2f} s, max |diff| {max(w.values()):.2e}")
    assert len(rows) == (32 + 64 + 96 if FULL else 6)
