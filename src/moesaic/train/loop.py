"""The training run behind ``moesaic train``: data, model, engine, evaluation, checkpoints, plots.

One function, :func:`run`, executed by every process (one process, or each rank of a launch):

1. read the launcher's environment once, pick the device (``train.device``), join the process
   group (NCCL on CUDA, gloo on the CPU; ``train.dist_timeout_s`` bounds every wait for a peer),
   check that every rank runs the same config (an error names the keys that differ), that the run
   fits in memory (:mod:`.memory`), and seed;
2. open the corpus (the standard library's sources by default) and this rank's batch stream;
3. build the MoE GPT on the device, put its MoE layers on their expert-parallel groups, build the
   engine from the config's ``engine`` section (which gives every replica rank 0's weights);
4. resume from ``<out>/checkpoints`` when asked (model, optimizer, scheduler, RNG, data position,
   history; metrics after the checkpoint's step are discarded), under the same or another number of
   processes and ``ep_size`` (the engine reshards; the data order then restarts);
5. train: micro-batches through ``engine``; a progress line on rank 0; every ``eval_every`` steps
   the validation loss; every ``checkpoint_every`` steps and at the end a checkpoint. At every step
   boundary the ranks agree whether to stop (a signal or ``train.max_minutes``, :mod:`.stop`);
6. at the end, rank 0 writes ``history.json``, ``summary.json`` (seconds and tokens/s of the whole run,
   every segment of a stopped and resumed run included, :mod:`.timing`) and PNG plots and prints where
   everything is. A signal ends the run with :class:`~.stop.Stopped` after the checkpoint is saved.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import moesaic
from moesaic.engine import build_engine
from moesaic.checkpoint import CheckpointError, read_manifest, resolve
from moesaic.models import GPT, GPTConfig, unigram_baseline_loss
from moesaic.optim.schedulers import WarmupLongerThanScheduleWarning
from moesaic.parallel.agree import check_same_on_all_ranks
from moesaic.parallel.launch import LaunchEnv, backend_for, resolve_device
from moesaic.telemetry.writer import tensorboard_available

from . import memory
from .heartbeat import phase
from .config import TrainConfig
from .data import BatchStream, byte_counts, load_corpus, validation_batches
from .progress import Progress
from .stop import Stopped, StopRequest
from .timing import RunClock, check_segments

RUN_FILE = "run.json"
# keys that fix the checkpoint's tensors (names, shapes) or the function they compute; the rest of the
# config (model.ep_size, capacity factors, train.*, engine.*) may change when a run is resumed
MODEL_KEYS_FIXED = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_mult", "moe_every", "num_experts",
                    "use_residual")


def _param_groups(model: GPT) -> List[Dict]:
    """Weight decay on matrices only (nanoGPT's rule): biases, norms and embeddings are not decayed."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


def check_out_dir(out: Path, cfg: TrainConfig, resume: bool) -> Optional[int]:
    """Refuse to overwrite another run, or to resume from a checkpoint that cannot continue this config.

    Returns:
        The step of the checkpoint to resume from (None when not resuming).

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is False.
        FileNotFoundError: ``resume`` and there is no checkpoint.
        CheckpointError: a key that must match (:data:`MODEL_KEYS_FIXED`, the ``data`` section)
            differs; the message names it with both values.
    """
    run_file = out / RUN_FILE
    if not resume:
        if run_file.exists() or (out / "checkpoints").exists():
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return None
    if not (out / "checkpoints" / "latest").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'} (nothing to resume)")
    manifest = read_manifest(resolve(out / "checkpoints"))
    saved = manifest.get("model_config") or {}
    now = cfg.to_dict()
    defaults = GPTConfig().to_dict()
    pairs = [(f"model.{k}", (saved.get("model") or {}).get(k, defaults[k]), now["model"][k]) for k in MODEL_KEYS_FIXED]
    pairs += [(f"data.{k}", (saved.get("data") or {}).get(k), v) for k, v in now["data"].items()]
    for key, then, here in pairs:
        if then != here:
            raise CheckpointError(f"--resume: {key} is {json.dumps(here)} here but the checkpoint in "
                                  f"{out / 'checkpoints'} was written with {json.dumps(then)}; this key must match "
                                  f"(the number of processes, model.ep_size, the train and engine sections may "
                                  f"change)")
    step = manifest.get("step")
    return int(step) if isinstance(step, int) else None


def finished_message(out: Path, step: int, cfg: TrainConfig) -> str:
    """What ``--resume`` of a run that already reached ``train.steps`` says."""
    return (f"{out}: the run already finished at step {step} (train.steps={cfg.train.steps}); nothing to train. "
            f"To train further, resume with a larger train.steps, e.g. --set train.steps={2 * cfg.train.steps}")


def memory_estimate(cfg: TrainConfig) -> memory.MemoryEstimate:
    """One process's training memory for this config (see :mod:`.memory`)."""
    e = cfg.engine
    params = dict(e.optimizer.params) if e.optimizer is not None else {}
    return memory.estimate(cfg.model, cfg.batch()[1], recompute=cfg.train.recompute, dtype_bytes=2 if (e.bf16.enabled or e.fp16.enabled) else 4,
                           optimizer=e.optimizer.type if e.optimizer is not None else "AdamW",
                           momentum=bool(params.get("momentum", 0.0)), zero_stage=e.zero_optimization.stage,
                           replicas=cfg.train.nproc)


def check_memory(cfg: TrainConfig, device: torch.device, processes_here: int) -> Optional[str]:
    """Refuse a micro-batch (or model) that cannot fit; returns a warning when it may not fit right now."""
    return memory.check_fits(memory_estimate(cfg), processes_here if device.type == "cpu" else 1, device,
                             key="engine.train_micro_batch_size_per_gpu",
                             model_keys="model.n_layer, model.n_embd, model.num_experts")


def initialize_engine(cfg: TrainConfig, rank: int, quiet: bool, **kwargs):
    """The engine of the run's engine config (:func:`moesaic.engine.build_engine`; the process group is joined
    by :func:`join_processes`); a warmup longer than the run is said once, on rank 0, as one line naming the
    config keys (:meth:`TrainConfig.warmup_warning`), not as the schedule's own warning."""
    line = cfg.warmup_warning()
    if line and rank == 0 and not quiet:
        print(f"moesaic train: warning: {line}", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WarmupLongerThanScheduleWarning)
        engine = build_engine(kwargs.pop("model"), cfg.engine_config(), **kwargs)
    return engine


def _evaluate(engine, model: GPT, batches, device: torch.device) -> float:
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in batches:
            _, loss, _ = model(x.to(device), y.to(device))
            total += float(loss)
    engine.train()
    return total / max(len(batches), 1)


def _moe_stats(engine) -> Dict[str, Any]:
    """The engine's MoE figures of the last step: every rank's tokens, every expert (engine.last_metrics)."""
    return engine.last_metrics.get("moe", {})


def _dropped_fraction(stats: Dict[str, Any]) -> float:
    if not stats:
        return 0.0
    return sum(s["dropped_fraction"] for s in stats.values()) / len(stats)


def _restart_seed(seed: int, step: int) -> int:
    """A data/RNG seed for a run resumed at ``step`` under another layout (not the start's stream again)."""
    return (seed + 1_000_003 * step) % (2 ** 63)


def join_processes(cfg: TrainConfig, env: LaunchEnv) -> Tuple[torch.device, int, int]:
    """This process's device, rank and world size for a run: joins the process group when launched
    with several processes (NCCL on CUDA, gloo on the CPU) and makes a CUDA device the current one."""
    t = cfg.train
    device = resolve_device(t.device, env.local_rank, "train.device")
    rank, world = env.rank, env.world_size
    if world > 1:
        rank, world = moesaic.init_distributed(backend=backend_for(device), timeout_s=t.dist_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, rank, world


def run(cfg: TrainConfig, out: Path, resume: bool = False, quiet: bool = False, model_factory=None,
        env: Optional[LaunchEnv] = None, resume_command: Optional[str] = None) -> Dict:
    """Train (see module docstring); returns the final summary on rank 0 (an empty dict elsewhere).

    Args:
        cfg: the checked config.
        out: the run folder.
        resume: continue from ``out/checkpoints``.
        quiet: no progress output.
        model_factory: ``model_factory(cfg.model)`` replaces ``GPT(cfg.model)`` (the benchmark swaps in
            DeepSpeed's layer).
        env: this process's launch environment (default: read from ``os.environ``).
        resume_command: the command that continues this run, for the messages of a stopped run.

    Raises:
        Stopped: a signal stopped the run; the checkpoint of the last step is saved.
    """
    env = LaunchEnv.from_environ() if env is None else env
    t = cfg.train
    phase("joining the process group")
    device, rank, world = join_processes(cfg, env)
    phase("start-up checks")
    # 1. every rank runs the same config, into the same folder (else weights diverge or a collective hangs)
    check_same_on_all_ranks({**cfg.to_dict(), "run": {"out": str(out), "resume": resume}}, "the training config",
                            device=device)
    if world != t.nproc:
        raise ValueError(f"train.nproc={t.nproc} but {world} processes are running; launch with --nproc {t.nproc}")
    note = check_memory(cfg, device, env.local_world_size)
    if note and rank == 0 and not quiet:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    _, micro, accum = cfg.batch()
    torch.manual_seed(t.seed + rank)
    random.seed(t.seed + rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))
    saved_step = check_out_dir(out, cfg, resume)  # every rank: a refusal must stop all of them
    if resume and saved_step is not None and saved_step >= t.steps:
        if rank == 0 and not quiet:
            print(finished_message(out, saved_step, cfg))
        if world > 1:
            dist.destroy_process_group()
        return {}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()

    # 2. data
    split = load_corpus(cfg.data.path, cfg.data.val_percent, cfg.data.suffixes)
    stream = BatchStream(split.train, cfg.model.block_size, micro, seed=t.seed, rank=rank, world_size=world)
    val = validation_batches(split.val, cfg.model.block_size, micro, t.eval_batches)
    baseline = unigram_baseline_loss(byte_counts(split.train, max_bytes=4 << 20))

    # 3. model and engine
    phase("building the model and engine")
    model = model_factory(cfg.model) if model_factory is not None else GPT(cfg.model)
    model.to(device)
    if world > 1:
        moesaic.setup_expert_parallel(model)
    if t.recompute != "none":
        moesaic.apply_recompute(model, t.recompute)
    log_dir = str(out / "logs")
    engine = initialize_engine(cfg, rank, quiet, model=model, param_groups=_param_groups(model),
                               log_dir=log_dir, telemetry_every=t.log_every)
    progress = Progress(total=t.steps, start=0, enabled=rank == 0 and not quiet)

    # 4. resume
    history: Dict = {"train": [], "val": [], "load": {}, "unigram_baseline": baseline}
    earlier: List[Dict] = []  # the run's segments before this one (see .timing)
    if resume:
        phase("loading the checkpoint")
        _, client = engine.load_checkpoint(out / "checkpoints")
        history = client.get("history", history)
        earlier = check_segments(client.get("segments"), f"--resume: the checkpoint in {out / 'checkpoints'}")
        data_state = client.get("data") or {}
        if data_state.get("world_size") == world and data_state.get("batch_size") == micro:
            if data_state.get("seed") != stream.seed:  # the stream was restarted by an earlier resume (below)
                stream = BatchStream(split.train, cfg.model.block_size, micro, seed=int(data_state["seed"]), rank=rank,
                                     world_size=world)
            stream.load_state_dict(data_state)
        else:  # another layout: the position of each former rank's stream has no counterpart here
            step = engine.global_steps
            stream = BatchStream(split.train, cfg.model.block_size, micro, seed=_restart_seed(t.seed, step), rank=rank,
                                 world_size=world)
            torch.manual_seed(_restart_seed(t.seed, step) + rank)
            random.seed(_restart_seed(t.seed, step) + rank)
            progress.note(f"resuming at step {step} with {world} process(es) x {micro} sequences instead of "
                          f"{data_state.get('world_size')} x {data_state.get('batch_size')}: weights, optimizer and "
                          "schedule continue exactly; the data order restarts (a new shuffle)")
    elif rank == 0:
        (out / RUN_FILE).write_text(json.dumps({"config": cfg.to_dict(), "world_size": world}, indent=1))

    bytes_per_step = micro * accum * cfg.model.block_size * world
    progress.start, progress.t0 = engine.global_steps, time.monotonic()  # the rate counts this session's steps
    deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else None
    start_step = engine.global_steps
    saved: Optional[Path] = None

    def save(step: int) -> Path:
        phase(f"saving checkpoint step{step}")
        client = {"data": stream.state_dict(), "history": history, "segments": clock.segments(step)}
        return engine.save_checkpoint(out / "checkpoints", tag=f"step{step}", client_state=client,
                                      model_config=cfg.to_dict(), keep_last=t.keep_last)

    def on_signal(signum: int) -> None:
        if rank == 0 and not quiet:
            progress.note(f"{_signal_name(signum)}: stopping after this step and saving a checkpoint "
                          "(send it again to abort without saving)")

    # 5. train
    signum, late = None, False
    t0 = time.perf_counter()
    clock = RunClock(earlier, start_step, bytes_per_step, world)  # the whole run's seconds and tokens/s
    with StopRequest(on_first=on_signal) as stop:
        while engine.global_steps < t.steps:
            phase(f"step {engine.global_steps + 1}")
            step_loss = step_aux = 0.0
            for _ in range(accum):
                x, y = next(stream)
                _, loss, aux = engine(x.to(device), y.to(device))
                engine.backward(model.objective(loss, aux))
                engine.step()
                step_loss += float(loss.detach()) / accum
                step_aux += float(aux.detach()) / accum
            step = engine.global_steps
            stats = _moe_stats(engine)
            dropped = _dropped_fraction(stats)
            history["train"].append([step, step_loss, step_aux, dropped])
            for name, figures in stats.items():
                history["load"].setdefault(name, []).append([step] + list(figures["tokens_per_expert"]))
            elapsed = time.perf_counter() - t0
            tps = bytes_per_step * (step - start_step) / max(elapsed, 1e-9)
            progress.update(step, loss=step_loss, aux=step_aux, dropped=dropped, tokens_per_s=tps)
            if step % t.eval_every == 0 or step == t.steps:
                phase(f"evaluation after step {step}")
                val_loss = _evaluate(engine, model, val, device)
                history["val"].append([step, val_loss])
                engine.log_metrics({"val": {"loss": val_loss, "unigram_baseline": baseline}})
                progress.note(f"step {step}: val loss {val_loss:.3f} (unigram baseline {baseline:.3f})")
            phase(f"the stop agreement after step {step}")
            signum, late = stop.agree(deadline is not None and time.monotonic() > deadline, device)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps or signum or late:
                saved = save(step)
            if signum or late:
                break
    progress.close()
    engine.close()
    step = engine.global_steps
    phase(f"ending the run after step {step}")
    if signum and step < t.steps:  # (a signal during the last step: the run is complete, report it as such)
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        raise Stopped(step, saved, signum, resume_command)

    # 6. report
    summary: Dict = {}
    if rank == 0:
        final_val = history["val"][-1][1] if history["val"] else math.nan
        timing = clock.summary(step)  # every segment of the run: seconds and tokens/s of the whole run
        summary = {"steps": step, "target_steps": t.steps, "complete": step >= t.steps, "val_loss": final_val,
                   "unigram_baseline": baseline, "tokens_per_s": timing["tokens_per_s"], "seconds": timing["seconds"],
                   "world_size": world, "segments": timing["segments"]}
        (out / "history.json").write_text(json.dumps(history))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        from .plots import write_plots
        plots = write_plots(history, out / "plots")
        if not quiet:
            parts = f" in {len(timing['segments'])} segments" if len(timing["segments"]) > 1 else ""
            print(f"\nvalidation loss {final_val:.3f} nats/byte vs unigram baseline {baseline:.3f} "
                  f"({step} steps{parts}, {summary['tokens_per_s']:.0f} bytes/s, {summary['seconds']:.0f} s)")
            if late:
                print(f"stopped early: train.max_minutes={t.max_minutes} ran out at step {step} of {t.steps}; figures "
                      f"of a full run need all {t.steps} steps. Finish with: "
                      f"{resume_command or 'moesaic train ... --resume'}")
            print(f"checkpoint: {saved if saved is not None else out / 'checkpoints'}\n"
                  f"logs: {log_dir} (metrics.csv{', TensorBoard' if tensorboard_available() else ''})")
            print("plots: " + (", ".join(str(p) for p in plots) if plots else
                               "none (matplotlib is not installed: pip install 'moesaic[train]')"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name
