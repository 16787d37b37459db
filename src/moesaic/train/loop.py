"""The training run behind ``moesaic train``: data, model, engine, evaluation, checkpoints, plots.

One function, :func:`run`, executed by every process (one process, or each rank under torchrun):

1. read the launcher's environment once, pick the device (``train.device``), join the process
   group (when launched by torchrun; NCCL on CUDA, gloo on the CPU) and seed;
2. open the corpus (the standard library's sources by default) and this rank's batch stream;
3. build the MoE GPT on the device, put its MoE layers on their expert-parallel groups, build the
   engine from the config's ``engine`` section;
4. resume from ``<out>/checkpoints`` when asked (model, optimizer, scheduler, RNG, data position,
   history); refuse a checkpoint written with another model or data config;
5. train: micro-batches (moved to the device) through ``engine``; a progress line on rank 0; every ``eval_every`` steps
   the validation loss; every ``checkpoint_every`` steps and at the end a checkpoint;
6. at the end, rank 0 writes ``history.json`` and PNG plots and prints where everything is.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import moesaic
from moesaic.checkpoint import CheckpointError, read_manifest, resolve
from moesaic.models import GPT, unigram_baseline_loss

from moesaic.parallel.launch import LaunchEnv, backend_for, resolve_device

from .config import TrainConfig
from .data import BatchStream, byte_counts, load_corpus, validation_batches
from .progress import Progress

RUN_FILE = "run.json"


def _param_groups(model: GPT) -> List[Dict]:
    """Weight decay on matrices only (nanoGPT's rule): biases, norms and embeddings are not decayed."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


def check_out_dir(out: Path, cfg: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite another run, or to resume from a checkpoint of another config."""
    run_file = out / RUN_FILE
    if not resume:
        if run_file.exists() or (out / "checkpoints").exists():
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return
    if not (out / "checkpoints" / "latest").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'} (nothing to resume)")
    manifest = read_manifest(resolve(out / "checkpoints"))
    saved = (manifest.get("model_config") or {})
    now = cfg.to_dict()
    for section in ("model", "data"):
        if saved.get(section) != now[section]:
            raise CheckpointError(f"--resume: the checkpoint in {out / 'checkpoints'} was written with another "
                                  f"[{section}] config ({saved.get(section)} vs {now[section]})")


def _evaluate(engine, model: GPT, batches, device: torch.device) -> float:
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in batches:
            _, loss, _ = model(x.to(device), y.to(device))
            total += float(loss)
    engine.train()
    return total / max(len(batches), 1)


def _global_tokens_per_expert(engine, world: int, device: torch.device) -> Dict[str, List[int]]:
    stats = engine.last_metrics.get("moe", {})
    out = {}
    for name in sorted(stats):
        # on the run's device: NCCL reduces CUDA tensors only
        counts = torch.tensor(stats[name]["tokens_per_expert"], dtype=torch.int64, device=device)
        if world > 1:
            dist.all_reduce(counts)  # every rank routed its own tokens: the layer's load is the sum
        out[name] = counts.tolist()
    return out


def run(cfg: TrainConfig, out: Path, resume: bool = False, quiet: bool = False, model_factory=None,
        env: Optional[LaunchEnv] = None) -> Dict:
    """Train (see module docstring); returns the final summary on rank 0 (an empty dict elsewhere).

    ``model_factory(cfg.model)`` replaces ``GPT(cfg.model)`` (the benchmark swaps in DeepSpeed's layer);
    ``env`` is this process's launch environment (default: read from ``os.environ``).
    """
    env = LaunchEnv.from_environ() if env is None else env
    t = cfg.train
    device = resolve_device(t.device, env.local_rank, "train.device")
    rank, world = env.rank, env.world_size
    if world > 1:
        rank, world = moesaic.init_distributed(backend=backend_for(device), timeout_s=300)
    if world != t.nproc:
        raise ValueError(f"train.nproc={t.nproc} but {world} processes are running; launch with --nproc {t.nproc}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _, micro, accum = cfg.batch()
    torch.manual_seed(t.seed + rank)
    random.seed(t.seed + rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        check_out_dir(out, cfg, resume)
    if world > 1:
        dist.barrier()  # nobody starts before rank 0 checked the output folder

    split = load_corpus(cfg.data.path, cfg.data.val_percent, cfg.data.suffixes)
    stream = BatchStream(split.train, cfg.model.block_size, micro, seed=t.seed, rank=rank, world_size=world)
    val = validation_batches(split.val, cfg.model.block_size, micro, t.eval_batches)
    baseline = unigram_baseline_loss(byte_counts(split.train, max_bytes=4 << 20))

    model = model_factory(cfg.model) if model_factory is not None else GPT(cfg.model)
    model.to(device)
    if world > 1:
        moesaic.setup_expert_parallel(model)
    log_dir = str(out / "logs")
    engine, _, _, _ = moesaic.initialize(model=model, model_parameters=_param_groups(model),
                                         config=cfg.engine_config(), log_dir=log_dir, telemetry_every=t.log_every)
    history: Dict = {"train": [], "val": [], "load": {}, "unigram_baseline": baseline}
    if resume:
        _, client = engine.load_checkpoint(out / "checkpoints")
        stream.load_state_dict(client["data"])
        history = client.get("history", history)
    elif rank == 0:
        (out / RUN_FILE).write_text(json.dumps({"config": cfg.to_dict(), "world_size": world}, indent=1))

    bytes_per_step = micro * accum * cfg.model.block_size * world
    progress = Progress(total=t.steps, start=engine.global_steps, enabled=rank == 0 and not quiet)
    deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else None
    start_step = engine.global_steps
    t0 = time.perf_counter()

    def save(step: int) -> None:
        client = {"data": stream.state_dict(), "history": history}
        engine.save_checkpoint(out / "checkpoints", tag=f"step{step}", client_state=client,
                               model_config=cfg.to_dict())

    while engine.global_steps < t.steps:
        step_loss = step_aux = 0.0
        for _ in range(accum):
            x, y = next(stream)
            _, loss, aux = engine(x.to(device), y.to(device))
            engine.backward(model.objective(loss, aux))
            engine.step()
            step_loss += float(loss.detach()) / accum
            step_aux += float(aux.detach()) / accum
        step = engine.global_steps
        dropped = _dropped_fraction(engine)
        history["train"].append([step, step_loss, step_aux, dropped])
        load = _global_tokens_per_expert(engine, world, device)
        for name, counts in load.items():
            history["load"].setdefault(name, []).append([step] + counts)
        elapsed = time.perf_counter() - t0
        tps = bytes_per_step * (step - start_step) / max(elapsed, 1e-9)
        progress.update(step, loss=step_loss, aux=step_aux, dropped=dropped, tokens_per_s=tps)
        if step % t.eval_every == 0 or step == t.steps:
            val_loss = _evaluate(engine, model, val, device)
            history["val"].append([step, val_loss])
            engine.log_metrics({"val": {"loss": val_loss, "unigram_baseline": baseline}})
            progress.note(f"step {step}: val loss {val_loss:.3f} (unigram baseline {baseline:.3f})")
        out_of_time = deadline is not None and time.monotonic() > deadline
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps or out_of_time:
            save(step)
        if out_of_time:
            progress.note(f"stopping at step {step}: train.max_minutes={t.max_minutes} reached")
            break
    progress.close()
    engine.close()
    summary = {}
    if rank == 0:
        elapsed = time.perf_counter() - t0
        final_val = history["val"][-1][1] if history["val"] else math.nan
        summary = {"steps": engine.global_steps, "val_loss": final_val, "unigram_baseline": baseline,
                   "tokens_per_s": bytes_per_step * (engine.global_steps - start_step) / max(elapsed, 1e-9),
                   "seconds": elapsed, "world_size": world}
        (out / "history.json").write_text(json.dumps(history))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        from .plots import write_plots
        plots = write_plots(history, out / "plots")
        if not quiet:
            print(f"\nvalidation loss {final_val:.3f} nats/byte vs unigram baseline {baseline:.3f} "
                  f"({engine.global_steps} steps, {summary['tokens_per_s']:.0f} bytes/s, {elapsed:.0f} s)")
            print(f"checkpoint: {out / 'checkpoints'}\nlogs (CSV, TensorBoard): {log_dir}")
            print("plots: " + ", ".join(str(p) for p in plots))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _dropped_fraction(engine) -> float:
    stats = engine.last_metrics.get("moe", {})
    if not stats:
        return 0.0
    return sum(s["dropped_fraction"] for s in stats.values()) / len(stats)
