"""What is live at a training step's memory peak: every CPU allocation of one step of the OLMoE-shaped model.

One step (after two warm-up steps) of a ``bench_recompute.py`` contender runs under ``torch.profiler`` with
``profile_memory=True``; the allocator's events give the peak of bytes allocated during the step, the
tensors live at it grouped by where they were allocated (Python frames and op), and the highest level
reached in each phase (forward, recompute, each backward node)::

    python benchmarks/trace_recompute_memory.py moesaic-block            # batch 4, seq 1024
    PHASE=backward:_OutProjectionBackward python benchmarks/trace_recompute_memory.py moesaic-block

It measures allocations made during the step only (not the RSS), so it shows what a change removes.
"""
import sys, os, collections, json, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from bench_recompute import _model
from bench_hf import build_folder, training_step
import argparse
torch.set_num_threads(1)
name = sys.argv[1]
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 4
seq = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
folder = Path(os.environ.get("TRACE_FOLDER", "/tmp/moesaic_trace_olmoe"))
if not folder.exists():
    a = argparse.Namespace(layers=8, experts=64, top_k=8, hidden=256, expert_hidden=128, vocab=1024, seq=1024, batch=4)
    build_folder(a, folder)
model = _model(name, str(folder)).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
data = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=g) for _ in range(4)]
step = training_step(model, opt)
for i in range(2):
    step(data[i])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True, record_shapes=False) as prof:
    loss = step(data[2])
print("loss", loss)
tree = prof.profiler.kineto_results.experimental_event_tree()
from torch._C._profiler import _EventType
allocs = []
def walk(e, stack):
    if e.tag == _EventType.Allocation:
        allocs.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size, e.extra_fields.total_allocated, stack))
    else:
        st = stack + [e.name]
        for c in e.children:
            walk(c, st)
    return
for r in tree:
    walk(r, [])
allocs.sort(key=lambda a: a[0])
base_total = allocs[0][3] - allocs[0][2]
peak_i = max(range(len(allocs)), key=lambda i: allocs[i][3])
print("events", len(allocs), "total at start MiB", base_total / 2**20, "peak total MiB", allocs[peak_i][3] / 2**20,
      "peak above start", (allocs[peak_i][3] - base_total) / 2**20)
live = {}
for t, ptr, size, tot, stack in allocs[:peak_i + 1]:
    if size > 0:
        live[ptr] = (size, stack, t)
    else:
        live.pop(ptr, None)
def short(stack):
    # python frames from our code + op name
    keep = [s for s in stack if ("moesaic" in s or "transformers" in s or "torch/utils/checkpoint" in s or "aten::" in s or "autograd" in s.lower() or "optim" in s)]
    return " > ".join(s.split("/")[-1] for s in keep[-5:])
groups = collections.defaultdict(lambda: [0, 0])
for ptr, (size, stack, t) in live.items():
    k = short(stack)
    groups[k][0] += size; groups[k][1] += 1
tot = sum(v[0] for v in groups.values())
print("live at peak (allocated during the step) MiB", tot / 2**20)
for k, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:45]:
    if s < 2**19: break
    print(f"{s/2**20:8.1f} MiB {n:5d}  {k}")
# context of peak
print("peak at:", short(allocs[peak_i][4]))
# timeline samples
ts = [a[3] for a in allocs]
# local maxima by phase: label each allocation by the innermost known phase
def phase(stack):
    j = " ".join(stack)
    if "recompute_fn" in j: p = "recompute"
    elif "_engine_run_backward" in j or "evaluate_function" in j: p = "backward"
    elif "optim" in j.lower() and "step" in j: p = "optimizer"
    else: p = "forward"
    for s in reversed(stack):
        if "evaluate_function:" in s:
            return p + ":" + s.split("evaluate_function:")[1].strip()
    return p
best = {}
for t, ptr, size, tot, stack in allocs:
    k = phase(stack)
    if k not in best or tot > best[k][0]:
        best[k] = (tot, short(stack))
print("\nhighest total per phase:")
for k, (tot, s) in sorted(best.items(), key=lambda kv: -kv[1][0])[:14]:
    print(f"{tot/2**20:8.1f}  {k:45s} {s[-110:]}")
import os
want = os.environ.get("PHASE")
if want:
    idx = max((i for i in range(len(allocs)) if phase(allocs[i][4]) == want), key=lambda i: allocs[i][3])
    live = {}
    for t, ptr, size, tot, stack in allocs[:idx + 1]:
        if size > 0: live[ptr] = (size, stack)
        else: live.pop(ptr, None)
    groups = collections.defaultdict(lambda: [0, 0])
    for ptr, (size, stack) in live.items():
        k = short(stack); groups[k][0] += size; groups[k][1] += 1
    print(f"\nlive at the max of {want}: {allocs[idx][3]/2**20:.1f} MiB")
    for k, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]:
        if s < 2**19: break
        print(f"{s/2**20:8.1f} MiB {n:5d}  {k}")
