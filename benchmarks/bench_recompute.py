"""Activation memory and speed of recompute on the OLMoE-shaped model of ``bench_hf.py`` (4 x 1024 tokens).

Contenders, each in fresh processes (one for memory, one for time):

* ``hf`` / ``hf-gc``: ``transformers``' own blocks, without and with ``gradient_checkpointing_enable()``;
* ``moesaic`` and ``moesaic-{block,moe,experts}``: ``moesaic.hf.load`` (stacked experts) without recompute and
  with ``moesaic.apply_recompute(model, policy)``.

Memory: the process's RSS high-water mark over one training step (forward, backward, AdamW) after two
warm-up steps, with glibc returning large blocks (RSS follows the live tensors). ``step peak`` is that
mark; ``activation`` is the mark minus the RSS before the step's forward (what the step adds: saved
activations, gradients' growth is nil after warm-up, temporaries). ``largest micro-batch`` divides a
fixed budget (``--budget-mib``) minus the resident memory by the activation per sequence: an estimate
that assumes activations grow linearly with the batch. Speed: tokens/s over ``--steps`` timed steps.

``python benchmarks/bench_recompute.py --steps 3 --out benchmarks/results/recompute.json``

Speed on a shared machine: ``--speed`` runs only the moesaic policies, in turn step after step on one
model in one single-thread process (the ratios see the same load), and reports median wall and CPU
seconds per step: ``python benchmarks/bench_recompute.py --speed --steps 5 --out benchmarks/results/recompute_speed.json``
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hf import (KEEP_MEMORY_ENV, SHAPE_ARGUMENTS, _kib, add_shape_arguments, build_folder, training_step,  # noqa: E402
                      check_positive, run_worker)

CONTENDERS = ("moesaic", "moesaic-block", "hf-gc", "moesaic-moe", "moesaic-experts", "hf")
WARMUP = int(os.environ.get("BENCH_WARMUP", 2))  # steps before the measured one (AdamW's state exists after the first)


def _model(name: str, folder: str):
    import transformers

    import moesaic
    import moesaic.hf

    if name.startswith("hf"):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        if name == "hf-gc":
            model.gradient_checkpointing_enable()
        return model
    model = moesaic.hf.load(folder)
    if "-" in name:
        moesaic.apply_recompute(model, name.split("-", 1)[1])
    return model


def worker(name, folder, mode, steps, batch, seq) -> dict:
    model = _model(name, folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=g) for _ in range(steps + 4)]

    step = training_step(model, opt)

    if mode == "memory":
        losses = [step(data[i]) for i in range(WARMUP)]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        before = _kib("VmRSS")
        losses.append(step(data[WARMUP]))
        peak = _kib("VmHWM")
        # the gradients: freed by zero_grad(set_to_none=True) before the step, all alive at the end of
        # its backward, so inside "activation" (a floor no recompute removes)
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
        return {"step_peak_mib": peak / 1024, "resident_mib": before / 1024,
                "activation_mib": (peak - before) / 1024, "grad_mib": grads,
                "activation_minus_grads_mib": (peak - before) / 1024 - grads, "losses": losses}
    step(data[0])  # warm-up
    t0 = time.perf_counter()
    for ids in data[1:steps + 1]:
        step(ids)
    return {"tokens_per_s": steps * batch * seq / (time.perf_counter() - t0)}


def interleaved(folder, policies, steps, batch, seq) -> dict:
    """One model, one batch, the policies in turn step after step (``apply_recompute`` between steps):
    the median wall and CPU seconds of a step per policy. Every policy sees the same machine load, so
    the ratios hold on a shared machine; with one thread the CPU seconds are the work done."""
    import statistics

    import moesaic
    import moesaic.hf

    model = moesaic.hf.load(folder).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    wall = {p: [] for p in policies}
    cpu = {p: [] for p in policies}
    for r in range(steps + 1):
        for p in policies:
            moesaic.apply_recompute(model, p)
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            if r:  # the first round warms up
                wall[p].append(time.perf_counter() - w0)
                cpu[p].append(time.process_time() - c0)
    return {p: {"step_wall_s": statistics.median(wall[p]), "step_cpu_s": statistics.median(cpu[p]),
                "wall_s": wall[p], "cpu_s": cpu[p],
                "tokens_per_s": batch * seq / statistics.median(wall[p]),
                "tokens_per_cpu_s": batch * seq / statistics.median(cpu[p])} for p in policies}


def _spawn(name, folder, mode, args) -> dict:
    return run_worker(__file__, name, folder, mode, ["--steps", args.steps, "--batch", args.batch, "--seq", args.seq])


POLICIES = ("none", "block", "moe", "experts")


def _interleaved(folder, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **KEEP_MEMORY_ENV)
    cmd = [sys.executable, __file__, "--interleaved-worker", "--folder", str(folder), "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"interleaved speed run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_speed(speed: dict) -> None:
    base = speed["none"]
    print("\n| policy | step s (wall, median) | tokens/s vs none (wall) | step CPU s (median) | "
          "tokens/s vs none (CPU) |")
    print("|---|---|---|---|---|")
    for p, r in speed.items():
        print(f"| {p} | {r['step_wall_s']:.2f} | {base['step_wall_s'] / r['step_wall_s']:.2f}x | "
              f"{r['step_cpu_s']:.2f} | {base['step_cpu_s'] / r['step_cpu_s']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(ap, seq=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-mib", type=float, default=4096.0)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "recompute.json"))
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("time", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--speed", action="store_true",
                    help="only the interleaved speed comparison of the moesaic policies (one process, one thread)")
    ap.add_argument("--memory-only", action="store_true", help="skip the per-contender tokens/s processes")
    ap.add_argument("--interleaved-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_positive(args, SHAPE_ARGUMENTS + ("steps",))
    if args.interleaved_worker:
        torch.set_num_threads(1)
        print(json.dumps(interleaved(args.folder, POLICIES, args.steps, args.batch, args.seq)))
        return
    if args.worker:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(worker(args.worker, args.folder, args.mode, args.steps, args.batch, args.seq)))
        return
    if args.speed:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "olmoe"
            build_folder(args, folder)
            speed = _interleaved(folder, args)
        _print_speed(speed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "interleaved": speed}, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "olmoe"
        build_folder(args, folder)
        results = {}
        for name in args.contenders.split(","):
            results[name] = _spawn(name, folder, "memory", args)
            if not args.memory_only:
                results[name].update(_spawn(name, folder, "time", args))
            print(name, json.dumps(results[name]), flush=True)
    base, hf_gc = results.get("moesaic"), results.get("hf-gc")
    print(f"\n| contender | step peak MiB | vs hf-gc | activation MiB | vs moesaic | activation - gradients MiB | "
          f"vs moesaic | tokens/s | vs moesaic | largest micro-batch in {args.budget_mib:.0f} MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        per_seq = r["activation_mib"] / args.batch
        fit = int((args.budget_mib - r["resident_mib"]) // per_seq) if per_seq > 0 else None
        r["largest_micro_batch"] = fit
        vs_gc = f"{r['step_peak_mib'] / hf_gc['step_peak_mib']:.2f}x" if hf_gc else ""
        vs_act = f"{r['activation_mib'] / base['activation_mib']:.2f}x" if base else ""
        tps = r.get("tokens_per_s")
        vs_tps = f"{tps / base['tokens_per_s']:.2f}x" if base and tps else ""
        no_g = r["activation_minus_grads_mib"]
        vs_no_g = f"{no_g / base['activation_minus_grads_mib']:.2f}x" if base else ""
        print(f"| {name} | {r['step_peak_mib']:.0f} | {vs_gc} | {r['activation_mib']:.0f} | {vs_act} | {no_g:.0f} | "
              f"{vs_no_g} | {f'{tps:.0f}' if tps else '-'} | {vs_tps} | {fit} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
