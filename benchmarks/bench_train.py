"""Training throughput of `moesaic train` on configs/tiny.toml: W=1, W=2 (ep_size=2), and DeepSpeed's layer.

Runs the tiny config for ``--steps`` steps (the same seed, data and schedule) as:

* moesaic, 1 process (ep_size=1);
* moesaic, 2 processes, expert parallel (ep_size=2), launched by `moesaic train --nproc 2`;
* the same model with every ``moesaic.MoE`` swapped for ``deepspeed.moe.layer.MoE`` (same
  arguments, same initial weights), 1 process, in the same training loop — where DeepSpeed is
  installed (``make bench-ds`` style: run this script with .venv-deepspeed's python).

Reports tokens (bytes) per second over the run and the validation loss reached.

    python benchmarks/bench_train.py [--steps 150] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def run_cli(out: Path, steps: int, nproc: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "moesaic", "train", str(ROOT / "configs" / "tiny.toml"), "--out", str(out),
           "--nproc", str(nproc), "--set", f"model.ep_size={nproc}", "--set", f"train.steps={steps}",
           "--set", f"train.eval_every={steps}", "--set", "train.checkpoint_every=0", "--device", device, "--quiet"]
    subprocess.run(cmd, check=True, timeout=3600)
    return json.loads((out / "summary.json").read_text())


def deepspeed_factory(model_cfg):
    """The tiny GPT with DeepSpeed's MoE layer in place of moesaic's (same arguments and weights)."""
    from deepspeed.moe.layer import MoE as DSMoE

    import moesaic
    from moesaic.layer.keys import NESTED_LAYOUT, respell_key
    from moesaic.models import GPT

    model = GPT(model_cfg)
    for block in model.blocks:
        ours = block.ffn
        if not isinstance(ours, moesaic.MixtureOfExperts):
            continue
        c = ours.gate.config
        ds = DSMoE(ours.hidden_size, ours.experts[0], num_experts=ours.num_experts, ep_size=1, k=ours.k,
                   capacity_factor=c.capacity_factor, eval_capacity_factor=c.eval_capacity_factor,
                   min_capacity=c.min_capacity, drop_tokens=c.drop_tokens, use_rts=c.use_rts,
                   top2_2nd_expert_sampling=c.top2_2nd_expert_sampling)
        # the same tensors; DeepSpeed nests them under deepspeed_moe (moesaic.layer.keys)
        ds.load_state_dict({respell_key(k, NESTED_LAYOUT): v for k, v in ours.state_dict().items()})
        block.ffn = ds
    return model


def run_deepspeed(out: Path, steps: int, device: str) -> dict:
    import logging

    from moesaic.train.config import load_train_config
    from moesaic.train.gpt import run

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg = load_train_config(ROOT / "configs" / "tiny.toml", {
        "model.ep_size": 1, "train.nproc": 1, "train.steps": steps, "train.eval_every": steps,
        "train.checkpoint_every": 0, "train.device": device,
        "engine.moe.split_by": "layer"})  # DeepSpeed's params carry no expert_number
    return run(cfg, out, quiet=True, model_factory=deepspeed_factory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--device", default="cpu", help="train.device of every run (default cpu: the README's figures)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    try:
        import deepspeed  # noqa: F401
        has_ds = True
    except Exception:
        has_ds = False
    results = {}
    with tempfile.TemporaryDirectory(prefix="moesaic-train-bench-") as work:
        results["moesaic W=1"] = run_cli(Path(work, "w1"), args.steps, 1, args.device)
        results["moesaic W=2 (ep_size=2)"] = run_cli(Path(work, "w2"), args.steps, 2, args.device)
        if has_ds:
            results["DeepSpeed layer W=1"] = run_deepspeed(Path(work, "ds"), args.steps, args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"| run ({args.steps} steps, tiny.toml) | bytes/s | validation loss | unigram baseline |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['val_loss']:.3f} | {r['unigram_baseline']:.3f} |")


if __name__ == "__main__":
    main()
