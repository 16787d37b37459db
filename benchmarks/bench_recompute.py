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
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hf import _kib, build_folder, run_worker  # noqa: E402

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

    def step(ids):
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    if mode == "memory":
        losses = [step(data[i]) for i in range(WARMUP)]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        before = _kib("VmRSS")
        losses.append(step(data[WARMUP]))
        peak = _kib("VmHWM")
        return {"step_peak_mib": peak / 1024, "resident_mib": before / 1024,
                "activation_mib": (peak - before) / 1024, "losses": losses}
    step(data[0])  # warm-up
    t0 = time.perf_counter()
    for ids in data[1:steps + 1]:
        step(ids)
    return {"tokens_per_s": steps * batch * seq / (time.perf_counter() - t0)}


def _spawn(name, folder, mode, args) -> dict:
    return run_worker(__file__, name, folder, mode, ["--steps", args.steps, "--batch", args.batch, "--seq", args.seq])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-mib", type=float, default=4096.0)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "recompute.json"))
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.mode, args.steps, args.batch, args.seq)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "olmoe"
        build_folder(args, folder)
        results = {}
        for name in args.contenders.split(","):
            results[name] = {**_spawn(name, folder, "memory", args), **_spawn(name, folder, "time", args)}
            print(name, json.dumps(results[name]), flush=True)
    base, hf_gc = results.get("moesaic"), results.get("hf-gc")
    print(f"\n| contender | step peak MiB | vs hf-gc | activation MiB | vs moesaic | tokens/s | vs moesaic | "
          f"largest micro-batch in {args.budget_mib:.0f} MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        per_seq = r["activation_mib"] / args.batch
        fit = int((args.budget_mib - r["resident_mib"]) // per_seq) if per_seq > 0 else None
        r["largest_micro_batch"] = fit
        vs_gc = f"{r['step_peak_mib'] / hf_gc['step_peak_mib']:.2f}x" if hf_gc else ""
        vs_act = f"{r['activation_mib'] / base['activation_mib']:.2f}x" if base else ""
        vs_tps = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        print(f"| {name} | {r['step_peak_mib']:.0f} | {vs_gc} | {r['activation_mib']:.0f} | {vs_act} | "
              f"{r['tokens_per_s']:.0f} | {vs_tps} | {fit} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
