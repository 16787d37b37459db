"""Peak memory and time of a whole training step: moesaic's engine vs torch's plain recipe vs DeepSpeed.

Model (issue #10): 8 MoE layers x 16 experts (h=512, ffn=2048, top-2, dropless) with a dense
Linear(h, 4h)-GELU-Linear(4h, h) block before each, bf16 parameters, AdamW, 64 tokens per step.

``single`` (one process):

* ``moesaic``: ``moesaic.initialize`` with bf16, AdamW and ``moe.max_group_size`` = one expert,
  then ``engine(x)``, ``engine.backward(loss)``, ``engine.step()``;
* ``moesaic-in-backward``: the same with ``optimizer_in_backward: true`` (each group steps during
  backward as soon as its gradients are complete);
* ``plain``: torch's plain mixed-precision recipe: fp32 master copies of every parameter, every
  gradient upcast to fp32, one ``torch.optim.AdamW`` step (torch's defaults), a copy back;
* ``deepspeed`` (only where DeepSpeed 0.19.8 is importable): the same model built with
  ``deepspeed.moe.layer.MoE``, ``deepspeed.initialize`` with ``bf16`` and a torch AdamW over
  ``split_params_into_different_moe_groups_for_optimizer`` groups (``max_group_size`` = one
  expert), ZeRO stage 0.

``sharded`` (W processes, gloo, ``ep_size`` P): moesaic with ``zero_optimization.stage`` 0, 1,
2 and 3 and DeepSpeed with ZeRO-2 and its MoE groups, the same model and batch per rank. Stage 3
(FSDP2) keeps fp32 sharded parameters and computes in bf16; "tensors held between steps" counts
this rank's weights, gradients, masters and optimizer state (a DTensor by its local shard) after
the measured step, against the ideal 16 B x (dense / W + local experts / EDP size).

Method: a fresh process per run (per rank); glibc returns large blocks to the OS
(``MALLOC_MMAP_THRESHOLD_``) so RSS follows the tensors; after two warm-up steps (optimizer
state exists) the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and one training
step (forward, backward, optimizer step) is measured: ``peak`` is VmHWM during it. ``step peak``
resets the mark again just before the optimizer step (``engine.step()``, or the recipe's upcast
and ``AdamW.step()``) and reads it after, so it is the optimizer step's own peak. No engine clips gradients
(``gradient_clipping: 0.0``, as the plain recipe). ``--check-memory``
shows the method measures a known 256 MiB allocation.

``limit`` (W processes): stage 2 and stage 3 train the same model under the same per-process
memory limit (``RLIMIT_DATA``, ``--limit-mib``): the stage that cannot hold it fails with the
allocator's out-of-memory error, the other trains ``--steps`` steps.

    python benchmarks/bench_step_memory.py single [--repeats 3]
    python benchmarks/bench_step_memory.py sharded --world 4 --ep-size 1 --steps 3 --modes moesaic-z2 moesaic-z3
    python benchmarks/bench_step_memory.py limit --world 4 --ep-size 1 --steps 2 --limit-mib 1950
    .venv-deepspeed/bin/python benchmarks/bench_step_memory.py single sharded   # with the DeepSpeed columns
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import moesaic  # noqa: E402

H, FFN, LAYERS, EXPERTS, TOKENS = 512, 2048, 8, 16, 64
MIB = 2 ** 20
# No gradient clipping in any engine: torch's plain recipe does not clip, and optimizer_in_backward
# cannot (the global norm is known only after the whole backward). DeepSpeed's default is 1.0.
CLIP = 0.0
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0",
       "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _have_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def expert_module():
    return nn.Sequential(nn.Linear(H, FFN), nn.GELU(), nn.Linear(FFN, H))


class Model(nn.Module):
    """Dense block + MoE layer, LAYERS times; ``moe_cls`` is moesaic.MoE or DeepSpeed's MoE."""

    def __init__(self, moe_cls, ep_size=1):
        super().__init__()
        torch.manual_seed(0)
        blocks = []
        for _ in range(LAYERS):
            blocks.append(nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H)))
            blocks.append(moe_cls(H, expert_module(), num_experts=EXPERTS, ep_size=ep_size, k=2, drop_tokens=False))
        self.blocks = nn.ModuleList(blocks)
        if moe_cls is moesaic.MoE:
            moesaic.name_moe_layers(self)

    def forward(self, x):
        aux = 0.0
        for block in self.blocks:
            out = block(x)
            if isinstance(out, tuple):
                x = x + out[0]
                aux = aux + out[1]
            else:
                x = x + out
        return x.float().pow(2).mean() + 0.01 * aux


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _expert_numel() -> int:
    return sum(p.numel() for p in expert_module().parameters())


class PlainRecipe:
    """torch's plain mixed precision: fp32 masters, every gradient upcast, one AdamW step, copy back."""

    def __init__(self, model):
        self.params = list(model.parameters())
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.masters, lr=1e-4)

    def step(self):
        for m, p in zip(self.masters, self.params):
            m.grad = p.grad.float()
            p.grad = None
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.masters, self.params):
                p.copy_(m)
        for m in self.masters:
            m.grad = None


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes_moesaic(opt) -> int:
    """Masters and optimizer state this rank holds (a DTensor counts its local shard: stage 3)."""
    if hasattr(opt, "_inner"):  # stage 3: torch's state over the sharded parameters
        entries = opt.state.values()
    else:
        entries = opt.state_dict()["state"].values()
    return sum(_local(t).numel() * _local(t).element_size() for entry in entries for k, t in entry.items()
               if k != "step" and isinstance(t, torch.Tensor))


def _held_bytes(model, opt) -> int:
    """Tensor bytes held between steps on this rank: weights, gradients, masters and optimizer state."""
    weights = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size() for p in model.parameters()
                if p.grad is not None)
    return weights + grads + _state_bytes_moesaic(opt)


def _held_parts(model, opt) -> dict:
    """:func:`_held_bytes` by kind, in MiB: weights, gradients, masters + optimizer state."""
    weights = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size() for p in model.parameters()
                if p.grad is not None)
    return {"weights": weights / MIB, "grads": grads / MIB, "masters_and_state": _state_bytes_moesaic(opt) / MIB}


def _cpu_s() -> float:
    """This process's CPU time so far, user + system, every thread (gloo's included)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure_iteration(loss_fn, backward, step, x, steps: int = 1, between=None, warmup: int = 2) -> dict:
    """Warm up, then measure ``steps`` iterations: the whole step's peak and the optimizer step's own.

    Peaks are the largest over the measured iterations, times their medians (``iter_times_s`` has
    each). ``between()``, when given, is called after backward and before the optimizer step of the
    last measured iteration (its result is returned as ``between``; not counted in the times).
    """
    for _ in range(warmup):
        backward(loss_fn(x))
        step()
    peaks, step_peaks, transients, iters, steps_s, befores, seen, cpus = [], [], [], [], [], [], None, []
    for i in range(steps):
        _reset_peak()
        befores.append(_kib("VmRSS"))
        t0, c0 = time.perf_counter(), _cpu_s()
        backward(loss_fn(x))
        t1, c1 = time.perf_counter(), _cpu_s()
        fwd_bwd_peak = _kib("VmHWM")
        if between is not None and i == steps - 1:
            seen = between()
        _reset_peak()
        step_before = _kib("VmRSS")
        t1b, c1b = time.perf_counter(), _cpu_s()
        step()
        t2, c2 = time.perf_counter(), _cpu_s()
        step_peak = _kib("VmHWM")
        peaks.append(max(fwd_bwd_peak, step_peak))
        step_peaks.append(step_peak)
        transients.append(step_peak - step_before)
        iters.append((t1 - t0) + (t2 - t1b))
        cpus.append((c1 - c0) + (c2 - c1b))
        steps_s.append(t2 - t1b)
    out = {"peak_mib": max(peaks) / 1024, "step_peak_mib": max(step_peaks) / 1024,
           "step_transient_mib": max(transients) / 1024, "before_mib": befores[0] / 1024,
           "iter_s": statistics.median(iters), "step_s": statistics.median(steps_s), "iter_times_s": iters,
           "iter_cpu_s": statistics.median(cpus), "iter_cpu_times_s": cpus}
    if seen is not None:
        out["between"] = seen
    return out


def child_single(mode: str) -> dict:
    torch.set_num_threads(1)
    x = torch.randn(TOKENS, H).bfloat16()
    if mode in ("moesaic", "moesaic-in-backward"):
        model = Model(moesaic.MoE)
        engine, opt, _, _ = moesaic.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": TOKENS, "bf16": {"enabled": True}, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "moe": {"max_group_size": _expert_numel()},
            "optimizer_in_backward": mode == "moesaic-in-backward"})
        out = _measure_iteration(engine, engine.backward, engine.step, x)
        out["state_mib"] = _state_bytes_moesaic(opt) / MIB
    elif mode == "plain":
        model = Model(moesaic.MoE).to(torch.bfloat16)
        recipe = PlainRecipe(model)
        out = _measure_iteration(model, lambda loss: loss.backward(), recipe.step, x)
    elif mode == "deepspeed":
        out = _deepspeed_child(x, world=1, ep_size=1, stage=0)
    else:
        raise ValueError(mode)
    out["mode"] = mode
    return out


def _deepspeed_child(x, world: int, ep_size: int, stage: int) -> dict:
    import logging

    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # one process: a world of one on a free port (else DeepSpeed asks MPI)
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
    model = Model(DSMoE, ep_size=ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"}, max_group_size=_expert_numel())
    opt = torch.optim.AdamW(groups, lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": TOKENS, "bf16": {"enabled": True}, "gradient_clipping": CLIP,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return _measure_iteration(engine, engine.backward, engine.step, x)


def _sharded_rank(rank: int, world: int, port: int, mode: str, ep_size: int, out_dir: str, steps: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    x = torch.randn(TOKENS, H).bfloat16()
    if mode.startswith("deepspeed"):
        out = _deepspeed_child(x, world, ep_size, stage=int(mode[-1]))
    else:
        if mode == "moesaic-z3-torch-collectives":
            # the A/B of moesaic.optim.fsdp_comms: the same engine with FSDP2's own gloo collectives
            import functools

            import moesaic.engine.build as build
            build.shard_model = functools.partial(build.shard_model, collectives="torch")
        moesaic.init_distributed(backend="gloo")
        model = Model(moesaic.MoE, ep_size=ep_size)
        moesaic.setup_expert_parallel(model)
        engine, opt, _, _ = moesaic.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": TOKENS, "bf16": {"enabled": True}, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "moe": {"max_group_size": _expert_numel()},
            "zero_optimization": _zero_section(mode)})
        dense = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True))
        local_experts = sum(p.numel() for p in model.parameters() if not getattr(p, "allreduce", True))
        out = _measure_iteration(engine, engine.backward, engine.step, x, steps=steps,
                                 between=lambda: _held_parts(model, opt),
                                 warmup=int(os.environ.get("MOESAIC_BENCH_WARMUP", "2")))
        out["state_mib"] = _state_bytes_moesaic(opt) / MIB
        out["held_mib"] = _held_bytes(model, opt) / MIB
        out["held_parts_mib"] = _held_parts(model, opt)
        out["held_before_step_parts_mib"] = out.pop("between")
        out["held_before_step_mib"] = sum(out["held_before_step_parts_mib"].values())
        out["local_numel"] = sum(_local(p).numel() for p in model.parameters())
        out["dense_m"], out["local_experts_m"] = dense / 1e6, local_experts / 1e6
    out.update(mode=mode, rank=rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()


def child_sharded(mode: str, world: int, ep_size: int, steps: int = 1) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = tempfile.mkdtemp(prefix="bench-step-memory-")
    mp.start_processes(_sharded_rank, args=(world, port, mode, ep_size, out_dir, steps), nprocs=world, join=True,
                       start_method="spawn")
    ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    return {"mode": mode, "ranks": ranks, "peak_mib": max(r["peak_mib"] for r in ranks),
            "step_s": max(r["step_s"] for r in ranks), "iter_s": max(r["iter_s"] for r in ranks),
            "iter_cpu_s": statistics.mean(r["iter_cpu_s"] for r in ranks),
            "state_mib": max(r.get("state_mib", float("nan")) for r in ranks),
            "held_mib": max(r.get("held_mib", float("nan")) for r in ranks),
            "held_before_step_mib": max(r.get("held_before_step_mib", float("nan")) for r in ranks),
            "local_numel": max(r.get("local_numel", 0) for r in ranks)}


def _limited_rank(rank: int, world: int, port: int, mode: str, ep_size: int, out_dir: str, limit_mib: int,
                  steps: int) -> None:
    """Train ``steps`` steps of the step-memory model under ``RLIMIT_DATA`` = ``limit_mib`` (this rank's data segment).

    Linux counts every private writable mapping against ``RLIMIT_DATA`` (torch's tensors are malloc'd,
    large ones mmap'd), so an allocation past the limit fails as a catchable "can't allocate memory"
    error in torch. ``RLIMIT_AS`` would also count the reservations of threads and libraries, which
    torch makes generously and never touches. A rank that fails writes what it was doing and exits;
    its peers then fail in their next collective (or are killed by the parent).
    """
    import resource

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    moesaic.init_distributed(backend="gloo", timeout_s=120.0)
    resource.setrlimit(resource.RLIMIT_DATA, (limit_mib * MIB, limit_mib * MIB))
    out = {"mode": mode, "rank": rank, "limit_mib": limit_mib, "losses": [], "phase": "build the model"}
    try:
        x = torch.randn(TOKENS, H).bfloat16()
        model = Model(moesaic.MoE, ep_size=ep_size)
        moesaic.setup_expert_parallel(model)
        out["phase"] = "moesaic.initialize"
        engine, _, _, _ = moesaic.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": TOKENS, "bf16": {"enabled": True}, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "moe": {"max_group_size": _expert_numel()},
            "zero_optimization": {"stage": int(mode[-1])}})
        for step in range(steps):
            out["phase"] = f"step {step}: forward and backward"
            loss = engine(x)
            engine.backward(loss)
            out["phase"] = f"step {step}: optimizer step"
            engine.step()
            out["losses"].append(float(loss))
        out.update(ok=True, phase="done", peak_rss_mib=_kib("VmHWM") / 1024)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
        torch.distributed.barrier()
    except (RuntimeError, MemoryError) as e:
        out.update(ok=False, error=str(e).splitlines()[0][:300], peak_rss_mib=_kib("VmHWM") / 1024,
                   out_of_memory=_is_oom(e))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
        os._exit(3)


def _is_oom(e: BaseException) -> bool:
    """An allocation refused by the limit: torch's CPU allocator's message, or C++'s ``std::bad_alloc`` (gloo, ATen)."""
    return isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "bad_alloc" in str(e)


def child_limited(mode: str, world: int, ep_size: int, limit_mib: int, steps: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = tempfile.mkdtemp(prefix="bench-step-memory-limit-")
    ctx = mp.start_processes(_limited_rank, args=(world, port, mode, ep_size, out_dir, limit_mib, steps),
                             nprocs=world, join=False, start_method="spawn")
    failed_at = None
    while any(p.is_alive() for p in ctx.processes):
        if failed_at is None and any(p.exitcode not in (None, 0) for p in ctx.processes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 30:
            for p in ctx.processes:  # peers stuck in a collective with the failed rank
                if p.is_alive():
                    p.kill()
        time.sleep(0.2)
    ranks = []
    for r in range(world):
        f = Path(out_dir, f"rank{r}.json")
        ranks.append(json.loads(f.read_text()) if f.exists() else
                     {"rank": r, "ok": False, "error": "killed: stuck after a peer failed"})
    return {"mode": mode, "limit_mib": limit_mib, "trained": all(r.get("ok") for r in ranks), "ranks": ranks}


def bench_limit(world: int, ep_size: int, limit_mib: int, steps: int) -> dict:
    """Stage 2 and stage 3 under the same per-process data limit: which one trains the model."""
    out = {}
    for mode in ("moesaic-z2", "moesaic-z3"):
        r = run_child("limit", mode, world, ep_size, limit_mib, steps)
        out[mode] = r
        if r["trained"]:
            losses = r["ranks"][0]["losses"]
            print(f"{mode} under RLIMIT_DATA {limit_mib} MiB per rank (W={world}, ep_size={ep_size}): trained {steps} "
                  f"steps, losses {[round(v, 4) for v in losses]}, peak RSS per rank (max) "
                  f"{max(x['peak_rss_mib'] for x in r['ranks']):.0f} MiB")
        else:
            oom = [x for x in r["ranks"] if x.get("out_of_memory")]
            first = oom[0] if oom else r["ranks"][0]
            print(f"{mode} under RLIMIT_DATA {limit_mib} MiB per rank (W={world}, ep_size={ep_size}): FAILED; "
                  f"{len(oom)} rank(s) out of memory, e.g. rank {first['rank']} at {first.get('phase')!r}: "
                  f"{first.get('error')}")
    return out


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], env=dict(os.environ, **ENV),
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_memory() -> None:
    _reset_peak()
    before = _kib("VmRSS")
    t = torch.ones(64 * MIB)  # 256 MiB, written
    del t
    seen = (_kib("VmHWM") - before) / 1024
    print(f"known allocation 256.0 MiB -> measured {seen:.1f} MiB")
    if not 243 <= seen <= 282:
        raise SystemExit("the memory method failed to measure a known allocation")


def _median(runs, key):
    return statistics.median(r[key] for r in runs)


def bench_single(repeats: int) -> dict:
    modes = ["moesaic", "moesaic-in-backward", "plain"] + (["deepspeed"] if _have_deepspeed() else [])
    runs = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:  # alternate, so machine noise hits every mode
            runs[mode].append(run_child("single", mode))
    summary = {m: {k: _median(rs, k) for k in rs[0] if isinstance(rs[0][k], (int, float))} for m, rs in runs.items()}
    print("| run | peak RSS MiB (whole step) | optimizer step peak MiB | step time s (fwd+bwd+step) |\n|---|---|---|---|")
    for m, r in summary.items():
        print(f"| {m} | {r['peak_mib']:.0f} | {r['step_peak_mib']:.0f} | {r['iter_s']:.2f} |")
    for ours in ("moesaic", "moesaic-in-backward"):
        for peer in modes[2:]:
            ratio = summary[ours]["peak_mib"] / summary[peer]["peak_mib"]
            t = statistics.median(a["iter_s"] / b["iter_s"] for a, b in zip(runs[ours], runs[peer]))
            print(f"{ours} vs {peer}: peak {ratio:.3f}x ({1 - ratio:.1%} lower), time {t:.3f}x")
            summary[f"{ours}_vs_{peer}"] = {"peak_ratio": ratio, "time_ratio": t}
    return {"summary": summary, "runs": runs}


def _zero_section(mode: str) -> dict:
    """``moesaic-zN`` is stage N; ``moesaic-z3-gathered`` is stage 3 with ``reshard_after_forward: false``
    (the parameters gathered in forward stay gathered for backward: one all-gather per unit instead of two);
    ``moesaic-z3-torch-collectives`` is stage 3 with FSDP2's own gloo all-gather and reduce-scatter instead of
    moesaic's broadcasts and reduces (``shard_model(collectives="torch")``)."""
    if mode == "moesaic-z3-gathered":
        return {"stage": 3, "reshard_after_forward": False}
    if mode == "moesaic-z3-torch-collectives":
        return {"stage": 3}
    return {"stage": int(mode[-1])}


def bench_sharded(repeats: int, world: int, ep_size: int, modes=None, steps: int = 1) -> dict:
    modes = modes or (["moesaic-z0", "moesaic-z1", "moesaic-z2", "moesaic-z3"] +
                      (["deepspeed-z2"] if _have_deepspeed() else []))
    runs = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            runs[mode].append(run_child("sharded", mode, world, ep_size, steps))
    summary = {m: {k: _median(rs, k) for k in ("peak_mib", "step_s", "iter_s", "iter_cpu_s", "state_mib", "held_mib",
                                                 "held_before_step_mib", "local_numel")}
               for m, rs in runs.items()}
    first = runs[modes[0]][0]["ranks"][0]
    dense, local = first["dense_m"], first["local_experts_m"]
    expected = (dense / world + local / (world // ep_size)) / (dense + local)
    ideal = 16 * (dense / world + local / (world // ep_size)) * 1e6 / MIB
    print(f"| run (W={world}, ep_size={ep_size}) | peak RSS MiB per rank (max) | masters+state MiB per rank (max) | "
          f"tensors held between steps MiB per rank (max) | step s | step CPU s per rank (mean) |\n|---|---|---|---|---|---|")
    for m, r in summary.items():
        print(f"| {m} | {r['peak_mib']:.0f} | {r['state_mib']:.0f} | {r['held_mib']:.0f} | {r['iter_s']:.2f} | "
              f"{r['iter_cpu_s']:.2f} |")
    if "moesaic-z3" in summary:
        held = summary["moesaic-z3"]["held_mib"]
        print(f"moesaic-z3: tensors held between steps {held:.0f} MiB = {held / ideal:.3f}x the ideal 16 B x "
              f"(dense/{world} + local experts/{world // ep_size}) = {ideal:.0f} MiB")
        summary["moesaic-z3"]["held_vs_ideal16"] = held / ideal
        z3 = runs["moesaic-z3"][0]["ranks"]
        numel = max(r["local_numel"] for r in z3)
        parts = {k: max(r["held_parts_mib"][k] for r in z3) for k in z3[0]["held_parts_mib"]}
        before = {k: max(r["held_before_step_parts_mib"][k] for r in z3) for k in z3[0]["held_before_step_parts_mib"]}
        print(f"moesaic-z3 held, by kind (MiB, max over ranks): after the step {parts}; after backward, before the "
              f"step {before}. The largest rank holds {numel} parameter elements (fp32 shards): 12 B x that = "
              f"{12 * numel / MIB:.1f} MiB (fp32 weight + AdamW's two moments), 16 B x that = {16 * numel / MIB:.1f} "
              f"MiB (+ the fp32 gradient shard, held from backward to the step)")
        before_sum = summary["moesaic-z3"]["held_before_step_mib"]
        print(f"moesaic-z3: held after backward, before the optimizer step {before_sum:.0f} MiB = "
              f"{before_sum / ideal:.3f}x the ideal")
        summary["moesaic-z3"]["held_before_step_vs_ideal16"] = before_sum / ideal
    for mode in [m for m in summary if m.startswith("moesaic-z3") and "moesaic-z2" in summary]:
        peak = summary[mode]["peak_mib"] / summary["moesaic-z2"]["peak_mib"]
        t = statistics.median(a["iter_s"] / b["iter_s"] for a, b in zip(runs[mode], runs["moesaic-z2"]))
        cpu = statistics.median(a["iter_cpu_s"] / b["iter_cpu_s"] for a, b in zip(runs[mode], runs["moesaic-z2"]))
        print(f"{mode}: peak RSS {peak:.3f}x stage 2's, step time {t:.3f}x stage 2's, step CPU time {cpu:.3f}x "
              f"stage 2's (same run order)")
        summary[mode].update(peak_vs_z2=peak, time_vs_z2=t, cpu_vs_z2=cpu)
    if "moesaic-z0" not in summary:
        return {"summary": summary, "runs": runs}
    z0s = summary["moesaic-z0"]["state_mib"]
    for stage in [m for m in ("moesaic-z1", "moesaic-z2") if m in summary]:
        got = summary[stage]["state_mib"] / z0s
        t = statistics.median(a["iter_s"] / b["iter_s"] for a, b in zip(runs[stage], runs["moesaic-z0"]))
        print(f"{stage}: masters+state {got:.3f} of stage 0's (expected (dense/{world} + local experts/"
              f"{world // ep_size}) = {expected:.3f} plus one group), time {t:.3f}x stage 0")
        summary[stage]["state_fraction"] = got
        summary[stage]["time_vs_z0"] = t
    summary["expected_state_fraction"] = expected
    if "deepspeed-z2" in summary:
        ratio = summary["moesaic-z2"]["peak_mib"] / summary["deepspeed-z2"]["peak_mib"]
        print(f"moesaic stage 2 vs DeepSpeed ZeRO-2 peak: {ratio:.3f}x")
        summary["z2_vs_deepspeed_peak"] = ratio
    return {"summary": summary, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="*", help="which comparisons: single and/or sharded (default: single)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per mode (medians reported)")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--ep-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="sharded: measured steps per run after the two warm-up "
                                                              "steps (peak: the largest; time: the median)")
    ap.add_argument("--warmup", type=int, help="sharded: warm-up steps before the measured ones (default 2; "
                                                "the optimizer state exists after one)")
    ap.add_argument("--limit-mib", type=int, default=1900, help="limit: RLIMIT_DATA per rank, MiB")
    ap.add_argument("--modes", nargs="+", help="sharded runs to make (default: moesaic-z0..z3, deepspeed-z2 "
                                                "where DeepSpeed is importable)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--check-memory", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_memory.json"))
    args = ap.parse_args()
    if args.child:
        kind, mode, *rest = args.child
        if kind == "limit":
            result = child_limited(mode, *map(int, rest))
        else:
            result = child_single(mode) if kind == "single" else child_sharded(mode, *map(int, rest))
        print(json.dumps(result))
        return
    if args.check_memory:
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") != ENV["MALLOC_MMAP_THRESHOLD_"]:
            os.execve(sys.executable, [sys.executable, __file__, "--check-memory"], dict(os.environ, **ENV))
        check_memory()
        return
    if args.warmup is not None:  # the rank processes read it (they are started two processes down)
        if args.warmup < 1:
            ap.error("--warmup must be >= 1")
        os.environ["MOESAIC_BENCH_WARMUP"] = str(args.warmup)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    results = {}
    args.what = args.what or ["single"]
    if set(args.what) - {"single", "sharded", "limit"}:
        ap.error(f"choose from single, sharded, limit; got {args.what}")
    if "single" in args.what:
        results["single"] = bench_single(args.repeats)
    if "sharded" in args.what:
        results["sharded"] = bench_sharded(args.repeats, args.world, args.ep_size, args.modes, args.steps)
    if "limit" in args.what:
        results["limit"] = bench_limit(args.world, args.ep_size, args.limit_mib, args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
