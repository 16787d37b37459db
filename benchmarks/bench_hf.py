"""Fine-tuning a Hugging Face MoE model: moesaic's layers vs ``transformers``' own MoE blocks (issue 14's targets).

An OLMoE-shaped model is built from ``OlmoeConfig`` (default: 8 layers, 64 experts, k=8, D=256,
expert hidden 128, vocabulary 1024), saved once with ``save_pretrained``, and then fine-tuned
from that folder by each contender, on the same batches (random tokens, a fixed seed), with
``torch.optim.AdamW``:

* ``hf``: ``AutoModelForCausalLM.from_pretrained(folder)``, ``transformers``' blocks (its default
  experts implementation, which the table names);
* ``moesaic``: ``moesaic.hf.load(folder)`` (its default: stacked experts);
* ``moesaic-per-module``: ``moesaic.hf.load(folder, stacked_experts=False)`` (one module per expert);
* ``hf-eager``: ``transformers``' blocks with ``experts_implementation="eager"`` (its per-expert
  loop): the same model summed in another order, the yardstick for "the same loss curve within
  noise" (how far two correct implementations drift apart over the steps).

The loss is the model's (cross-entropy + ``router_aux_loss_coef * aux_loss``, ``output_router_logits=True``)
for all three. Figures, each from fresh processes:

* tokens/s over the steps after ``--warmup``, one process per contender per round, contenders
  round-robin; the ratio is the median over rounds of moesaic's rate over hf's in the same round
  (glibc keeps freed memory, the CPU equivalent of a caching allocator, as in bench_layer.py);
* peak memory, in separate processes where glibc returns large blocks (``MALLOC_MMAP_THRESHOLD_``
  fixed at 128 KiB, so RSS follows the live tensors): the transient peak RSS of one training step
  after three warm-up steps (peak mark reset), and the process's peak RSS over loading and three
  steps (``peak_mib``). The timing processes' peak (``process_peak_mib``) is also reported; there
  freed memory is kept by the allocator (as a caching allocator would), so it counts heap
  fragmentation too;
* the loss curve: the first round's per-step losses; the largest difference from hf's is reported.

Issue 14's targets: tokens/s >= 1.2x, peak memory <= 0.9x, the same loss curve within noise; load
time of a converted folder <= 1.2x ``from_pretrained``'s (``load_s`` below: from the folder to a
ready model, in the timing processes).

    python benchmarks/bench_hf.py                    # the issue's shape (several minutes per contender on 2 cores)
    python benchmarks/bench_hf.py --quick            # 2 layers, 16 experts, 10 steps
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

KEEP_MEMORY_ENV = {"MALLOC_TRIM_THRESHOLD_": "100000000000", "MALLOC_TOP_PAD_": "1000000000",
                   "MALLOC_MMAP_THRESHOLD_": "4000000000"}
RETURN_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
CONTENDERS = ("hf", "moesaic", "moesaic-per-module", "hf-eager")


def build_folder(args, folder: Path) -> None:
    import transformers

    cfg = transformers.OlmoeConfig(hidden_size=args.hidden, intermediate_size=args.expert_hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                   num_experts=args.experts, num_experts_per_tok=args.top_k, vocab_size=args.vocab,
                                   max_position_embeddings=args.seq, norm_topk_prob=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model(name: str, folder: str):
    import transformers

    import moesaic.hf

    if name == "hf":
        return transformers.AutoModelForCausalLM.from_pretrained(folder)
    if name == "hf-eager":
        return transformers.AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager")
    return moesaic.hf.load(folder, stacked_experts=name == "moesaic")


def training_step(model, opt):
    """One benchmark step of a causal LM: forward with the router logits, backward, AdamW, grads freed; the loss."""
    def step(ids) -> float:
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)
    return step


def worker(name: str, folder: str, mode: str, steps: int, warmup: int, batch: int, seq: int, seed: int) -> dict:
    """One contender in this process: ``mode`` "time" (losses, tokens/s, load time) or "memory"."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    t0 = time.perf_counter()
    model = _model(name, folder).train()
    load_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps)]

    step = training_step(model, opt)

    if mode == "memory":
        step(data[0])
        step(data[1])
        step(data[2])
        peak_before_reset = _kib("VmHWM")  # loading and three steps
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _kib("VmRSS")
        step(data[3])
        transient = (_kib("VmHWM") - before) / 1024
        return {"transient_mib": transient, "resident_mib": before / 1024, "peak_mib": peak_before_reset / 1024}
    losses, t_start = [], None
    for i, ids in enumerate(data):
        if i == warmup:
            t_start = time.perf_counter()
        losses.append(step(ids))
    elapsed = time.perf_counter() - t_start
    return {"losses": losses, "tokens_per_s": (steps - warmup) * batch * seq / elapsed, "load_s": load_s,
            "process_peak_mib": _kib("VmHWM") / 1024,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}


def run_worker(script: str, name: str, folder, mode: str, worker_args) -> dict:
    """Run ``script --worker name`` in a fresh process (allocator set for ``mode``); its last stdout line as JSON."""
    env = dict(os.environ, **(KEEP_MEMORY_ENV if mode == "time" else RETURN_MEMORY_ENV))
    cmd = [sys.executable, script, "--worker", name, "--folder", str(folder), "--mode", mode, *map(str, worker_args)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spawn(name, folder, mode, args) -> dict:
    return run_worker(__file__, name, folder, mode, ["--steps", args.steps if mode == "time" else 4,
                                                     "--warmup", args.warmup, "--batch", args.batch, "--seq", args.seq])


SHAPE_ARGUMENTS = ("layers", "experts", "top_k", "hidden", "expert_hidden", "vocab", "seq", "batch")


def add_shape_arguments(ap: argparse.ArgumentParser, seq: int) -> None:
    """The OLMoE-shaped benchmark model's arguments (shared by bench_sft.py and bench_recompute.py)."""
    for name, default in (("layers", 8), ("experts", 64), ("top-k", 8), ("hidden", 256), ("expert-hidden", 128),
                          ("vocab", 1024), ("seq", seq), ("batch", 4)):
        ap.add_argument(f"--{name}", type=int, default=default)


def check_positive(args: argparse.Namespace, names) -> None:
    """Every one of ``names`` is >= 1, or exit naming the flag and its value."""
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(ap, seq=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 layers, 16 experts, k=4, 10 steps, 1 round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf.json"))
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.mode, args.steps, args.warmup, args.batch, args.seq, 0)))
        return
    if args.quick:
        args.layers, args.experts, args.top_k, args.steps, args.warmup, args.rounds = 2, 16, 4, 10, 2, 1
    check_positive(args, SHAPE_ARGUMENTS + ("steps", "rounds"))
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup must be in [0, --steps), got {args.warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "olmoe"
        build_folder(args, folder)
        rounds = []
        for r in range(args.rounds):
            rounds.append({name: _spawn(name, folder, "time", args) for name in CONTENDERS})
            print(f"round {r + 1}: " + ", ".join(f"{n} {v['tokens_per_s']:.0f} tok/s" for n, v in rounds[-1].items()),
                  flush=True)
        memory = {name: _spawn(name, folder, "memory", args) for name in CONTENDERS}
    first = rounds[0]
    result = {"shape": {k: getattr(args, k) for k in ("layers", "experts", "top_k", "hidden", "expert_hidden", "vocab",
                                                      "seq", "batch", "steps", "warmup", "rounds")},
              "torch_threads": torch.get_num_threads(), "rounds": rounds, "memory": memory}
    table = ["| contender | tokens/s (median) | speed vs hf | step transient MiB | vs hf | peak MiB | vs hf | "
             "timing processes' peak MiB | load s | max loss diff vs hf |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in CONTENDERS:
        speed = statistics.median(r[name]["tokens_per_s"] for r in rounds)
        ratio = statistics.median(r[name]["tokens_per_s"] / r["hf"]["tokens_per_s"] for r in rounds)
        mem = memory[name]["transient_mib"] / memory["hf"]["transient_mib"]
        diff = max(abs(a - b) for a, b in zip(first[name]["losses"], first["hf"]["losses"]))
        load = statistics.median(r[name]["load_s"] for r in rounds)
        peak = statistics.median(r[name]["process_peak_mib"] for r in rounds)
        whole = memory[name]["peak_mib"] / memory["hf"]["peak_mib"]
        result.setdefault("summary", {})[name] = {"tokens_per_s": speed, "speed_ratio": ratio, "memory_ratio": mem,
                                                  "peak_mib": memory[name]["peak_mib"], "peak_ratio": whole,
                                                  "max_loss_diff": diff, "load_s": load, "process_peak_mib": peak}
        table.append(f"| {name} | {speed:.0f} | {ratio:.2f}x | {memory[name]['transient_mib']:.0f} | {mem:.2f}x | "
                     f"{memory[name]['peak_mib']:.0f} | {whole:.2f}x | {peak:.0f} | {load:.2f} | {diff:.2e} |")
    print(f"\nhf experts implementation: {first['hf']['experts_implementation']}")
    print("\n".join(table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
