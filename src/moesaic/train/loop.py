"""The one training run behind ``moesaic train`` and ``moesaic train --hf``, and the interface of what differs.

:func:`run_training` is executed by every process (one process, or each rank of a launch) for any
kind of run; a :class:`RunKind` supplies the model (its build, parameter groups, memory parts and
export) and opens a :class:`Feed`, which supplies the data and the loss (one optimizer step of
micro-batches, the validation loss, its state in a checkpoint). The kinds are the byte-level GPT
(:mod:`.gpt`) and a Hugging Face model (:mod:`.hf`) fed raw-text windows or the packed
instruction/chat rows of :mod:`.sft`.

1. read the launcher's environment once, pick the device (``train.device``), join the process
   group (NCCL on CUDA, gloo on the CPU; ``train.dist_timeout_s`` bounds every wait for a peer);
   resolve ``train.recompute = "auto"`` to the kind's default (``"block"`` for fine-tuning, ``"none"``
   for the GPT); check that every rank runs the same config (an error names the keys that differ),
   the kind's own config rules, that the run fits in memory (:mod:`.memory`, from the kind's parts),
   that ``<out>`` holds no other run (or, with ``--resume``, a checkpoint this config can continue);
   seed;
2. open the kind's data (its :class:`Feed`);
3. build the model on the device, turn on the recompute policy, build the engine from the config's
   ``engine`` section (which gives every replica rank 0's weights);
4. resume from ``<out>/checkpoints`` when asked (model, optimizer, scheduler, RNG, history, the
   run's timed segments, the feed's position; metrics after the checkpoint's step are discarded),
   under the same or another number of processes and ``ep_size`` (the engine reshards);
5. train: the feed's steps through the engine; progress on rank 0; every ``eval_every`` steps the
   validation loss; every ``checkpoint_every`` steps and at the end a checkpoint. At every step
   boundary the ranks agree whether to stop (a signal or ``train.max_minutes``, :mod:`.stop`);
6. at the end the kind's export (the Hugging Face folder), then rank 0 writes ``history.json``,
   ``summary.json`` (seconds and tokens/s of the whole run, every segment of a stopped and resumed
   run included, :mod:`.timing`; the resolved recompute policy) and PNG plots and prints where
   everything is. A signal ends the run with :class:`~.stop.Stopped` after the checkpoint is saved
   (and before any export: the resumed run exports at its end).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import moesaic
from moesaic.engine import build_engine
from moesaic.checkpoint import CheckpointError, read_manifest, resolve
from moesaic.models import GPTConfig
from moesaic.optim.schedulers import WarmupLongerThanScheduleWarning
from moesaic.parallel.agree import check_same_on_all_ranks
from moesaic.parallel.launch import LaunchEnv, backend_for, resolve_device

from . import memory
from .config import TrainConfig
from .heartbeat import phase
from .progress import Progress
from .stop import Stopped, StopRequest
from .timing import RunClock, check_segments

RUN_FILE = "run.json"


@dataclass
class StepRecord:
    """What one optimizer step of a feed reports: its loss and aux loss (means over the step)."""

    loss: float
    aux: float = 0.0


@dataclass
class RunContext:
    """This process's view of a run, shared by the skeleton, the kind and its feed."""

    cfg: TrainConfig  # with train.recompute resolved
    out: Path
    rank: int
    world: int
    device: torch.device
    micro: int  # sequences per micro-batch
    accum: int  # micro-batches per optimizer step
    resume: bool
    quiet: bool
    progress: Progress
    history: Dict[str, Any] = field(default_factory=dict)

    @property
    def show(self) -> bool:
        """This process prints progress (rank 0, not quiet)."""
        return self.rank == 0 and not self.quiet


class Feed(ABC):
    """The data of a run and the loss of its steps."""

    @abstractmethod
    def step(self, engine, model, ctx: RunContext) -> StepRecord:
        """Run optimizer step ``engine.global_steps + 1``: its ``ctx.accum`` micro-batches, each through
        ``engine`` (forward, ``engine.backward``, ``engine.step``)."""

    @abstractmethod
    def evaluate(self, engine, model, ctx: RunContext) -> float:
        """The validation loss (the same batches on every rank and at every evaluation)."""

    def history(self) -> Dict[str, Any]:
        """Entries of a fresh run's ``history.json`` beside ``train``, ``val`` and ``load``."""
        return {}

    def state(self) -> Dict[str, Any]:
        """Client state to keep in a checkpoint (the feed's position, its data files' hashes)."""
        return {}

    def resume(self, client: Dict[str, Any], engine, ctx: RunContext) -> None:
        """Continue from a checkpoint's client state (or refuse it, naming why)."""

    def show_step(self, step: int, record: StepRecord, dropped: float, tokens_per_s: float, ctx: RunContext) -> None:
        """Progress after ``step``: the progress bar (a feed may print its own line instead)."""
        ctx.progress.update(step, loss=record.loss, aux=record.aux, dropped=dropped, tokens_per_s=tokens_per_s)

    def val_metrics(self, val: float) -> Dict[str, float]:
        """The ``val`` figures logged to metrics.csv / TensorBoard."""
        return {"loss": val}

    def val_line(self, step: int, val: float) -> str:
        return f"step {step}: val loss {val:.4f}"

    def summary(self, history: Dict[str, Any], ctx: RunContext) -> Dict[str, Any]:
        """Entries of ``summary.json`` this feed adds or replaces (e.g. tokens/s counting real tokens only)."""
        return {}


class RunKind(ABC):
    """What differs between kinds of ``moesaic train`` run: the model, the data, the export."""

    #: ``train.recompute = "auto"`` means this policy
    default_recompute: str = "none"
    #: the keys a resumed run must share with its checkpoint (``model.*`` by name, then every ``data.*`` key)
    fixed_model_keys: Sequence[str] = ()
    #: the keys that size the model, named when the model alone does not fit in memory (None: a given model)
    model_keys: Optional[str] = None

    def check(self, cfg: TrainConfig) -> None:
        """Config rules of this kind (before any work)."""

    def identity(self) -> Dict[str, Any]:
        """What every rank must agree on beside the config (e.g. the model folder)."""
        return {}

    @abstractmethod
    def memory_parts(self, cfg: TrainConfig) -> memory.ModelParts:
        """The model's part of the memory estimate for one micro-batch (``cfg``'s recompute resolved)."""

    @abstractmethod
    def open_data(self, ctx: RunContext) -> Feed:
        """This rank's data and loss."""

    @abstractmethod
    def build_model(self, ctx: RunContext) -> torch.nn.Module:
        """The model on ``ctx.device``, its MoE layers on their expert-parallel groups."""

    def param_groups(self, model: torch.nn.Module) -> Optional[List[Dict]]:
        """The engine's parameter groups (None: the engine's own)."""
        return None

    def export(self, model: torch.nn.Module, ctx: RunContext) -> Dict[str, Any]:
        """At the end of a run, on every rank: write what the run hands on; returns summary entries."""
        return {}

    @abstractmethod
    def report(self, ctx: RunContext, summary: Dict[str, Any], plots: List[Path], saved: Optional[Path],
               late: bool, resume_command: Optional[str]) -> None:
        """The closing lines on rank 0 (not quiet)."""


def check_out_dir(out: Path, cfg: TrainConfig, resume: bool, fixed_model_keys: Sequence[str] = ()) -> Optional[int]:
    """Refuse to overwrite another run, or to resume from a checkpoint that cannot continue this config.

    Returns:
        The step of the checkpoint to resume from (None when not resuming).

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is False.
        FileNotFoundError: ``resume`` and there is no checkpoint.
        CheckpointError: a key that must match (``model.<fixed_model_keys>``, the ``data`` section)
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
    then = GPTConfig.fixed_values(saved.get("model"), fixed_model_keys)
    here = GPTConfig.fixed_values(now["model"], fixed_model_keys)
    pairs = [(f"model.{k}", then[k], here[k]) for k in fixed_model_keys]
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


def run_memory(kind: RunKind, cfg: TrainConfig) -> memory.MemoryEstimate:
    """One process's training memory for a run of ``kind`` with ``cfg``: the kind's parts, the engine's settings."""
    cfg = cfg.with_recompute(kind.default_recompute)
    return memory.training_memory(kind.memory_parts(cfg), **memory.engine_settings(cfg))


def check_memory(kind: RunKind, cfg: TrainConfig, device: torch.device, processes_here: int) -> Optional[str]:
    """Refuse a micro-batch (or model) that cannot fit; returns a warning when it may not fit right now."""
    return memory.check_run(run_memory(kind, cfg), device, processes_here, kind.model_keys)


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


def join_processes(cfg: TrainConfig, env: LaunchEnv) -> Tuple[torch.device, int, int]:
    """This process's device, rank and world size for a run: joins the process group when launched
    with several processes (NCCL on CUDA, gloo on the CPU), or at ``zero_optimization.stage`` 3 on one
    (FSDP2 shards over a mesh: a group of this process alone), and makes a CUDA device the current one."""
    t = cfg.train
    device = resolve_device(t.device, env.local_rank, "train.device")
    rank, world = env.rank, env.world_size
    if world > 1 or cfg.engine.zero_optimization.stage == 3:
        rank, world = moesaic.init_distributed(backend=backend_for(device), timeout_s=t.dist_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, rank, world


def seed_process(seed: int, rank: int) -> None:
    """Seed torch and ``random`` for this rank (each rank its own stream)."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)


def _dropped_fraction(stats: Dict[str, Any]) -> float:
    if not stats:
        return 0.0
    return sum(s["dropped_fraction"] for s in stats.values()) / len(stats)


def _end_processes(world: int, joined_here: bool = False) -> None:
    """Leave the process group: every rank at once (several), or the one-process group this run made."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    elif joined_here and dist.is_initialized():
        dist.destroy_process_group()


def run_training(kind: RunKind, cfg: TrainConfig, out: Path, resume: bool = False, quiet: bool = False,
                 env: Optional[LaunchEnv] = None, resume_command: Optional[str] = None) -> Dict:
    """Train a run of ``kind`` (see module docstring); returns the final summary on rank 0 (an empty dict elsewhere).

    Args:
        kind: the model, data and export.
        cfg: the checked config (``train.recompute = "auto"`` is resolved here to the kind's default).
        out: the run folder.
        resume: continue from ``out/checkpoints``.
        quiet: no progress output.
        env: this process's launch environment (default: read from ``os.environ``).
        resume_command: the command that continues this run, for the messages of a stopped run.

    Raises:
        Stopped: a signal stopped the run; the checkpoint of the last step is saved.
    """
    if not isinstance(kind, RunKind):
        raise TypeError(f"kind must be a RunKind (e.g. moesaic.train.gpt.GPTRun()), got {type(kind).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig (moesaic.train.config.load_train_config), got {type(cfg).__name__}")
    env = LaunchEnv.from_environ() if env is None else env
    cfg = cfg.with_recompute(kind.default_recompute)
    t = cfg.train
    phase("joining the process group")
    joined_here = not (dist.is_available() and dist.is_initialized())
    device, rank, world = join_processes(cfg, env)
    phase("start-up checks")
    # every rank runs the same config, into the same folder (else weights diverge or a collective hangs)
    check_same_on_all_ranks({**cfg.to_dict(), "run": {"out": str(out), "resume": resume, **kind.identity()}},
                            "the training config", device=device)
    if world != t.nproc:
        raise ValueError(f"train.nproc={t.nproc} but {world} processes are running; launch with --nproc {t.nproc}")
    kind.check(cfg)
    note = check_memory(kind, cfg, device, env.local_world_size)
    if note and rank == 0 and not quiet:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    _, micro, accum = cfg.batch()
    seed_process(t.seed, rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))
    saved_step = check_out_dir(out, cfg, resume, kind.fixed_model_keys)  # every rank: a refusal stops all of them
    if resume and saved_step is not None and saved_step >= t.steps:
        if rank == 0 and not quiet:
            print(finished_message(out, saved_step, cfg))
        _end_processes(world, joined_here)
        return {}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()
    progress = Progress(total=t.steps, start=0, enabled=rank == 0 and not quiet)
    ctx = RunContext(cfg, out, rank, world, device, micro, accum, resume, quiet, progress)

    # 2-3. data, model and engine
    phase("opening the data")
    feed = kind.open_data(ctx)
    phase("building the model and engine")
    model = kind.build_model(ctx)
    if t.recompute != "none":
        moesaic.apply_recompute(model, t.recompute)
    log_dir = out / "logs"
    engine = initialize_engine(cfg, rank, quiet, model=model, param_groups=kind.param_groups(model),
                               log_dir=str(log_dir), telemetry_every=t.log_every)

    # 4. resume
    ckpts = out / "checkpoints"
    history: Dict = {"train": [], "val": [], "load": {}, **feed.history()}
    earlier: List[Dict] = []  # the run's segments before this one (see .timing)
    if resume:
        phase("loading the checkpoint")
        _, client = engine.load_checkpoint(ckpts)
        history = client.get("history", history)
        earlier = check_segments(client.get("segments"), f"--resume: the checkpoint in {ckpts}")
        feed.resume(client, engine, ctx)
    elif rank == 0:
        (out / RUN_FILE).write_text(json.dumps({"config": cfg.to_dict(), "world_size": world}, indent=1))
    ctx.history = history

    tokens_per_step = micro * accum * cfg.model.block_size * world
    start_step = engine.global_steps
    progress.start, progress.t0 = start_step, time.monotonic()  # the rate counts this session's steps
    deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else None
    saved: Optional[Path] = None

    def save(step: int) -> Path:
        phase(f"saving checkpoint step{step}")
        client = {**feed.state(), "history": history, "segments": clock.segments(step)}
        return engine.save_checkpoint(ckpts, tag=f"step{step}", client_state=client, model_config=cfg.to_dict(),
                                      keep_last=t.keep_last)

    def on_signal(signum: int) -> None:
        progress.note(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                      "(send it again to abort without saving)")

    # 5. train
    signum, late = None, False
    t0 = time.perf_counter()
    clock = RunClock(earlier, start_step, tokens_per_step, world)  # the whole run's seconds and tokens/s
    with StopRequest(on_first=on_signal) as stop:
        while engine.global_steps < t.steps:
            phase(f"step {engine.global_steps + 1}")
            record = feed.step(engine, model, ctx)
            step = engine.global_steps
            stats = engine.last_metrics.get("moe", {})  # every rank's tokens, every expert
            dropped = _dropped_fraction(stats)
            history["train"].append([step, record.loss, record.aux, dropped])
            for name, figures in stats.items():
                history["load"].setdefault(name, []).append([step] + list(figures["tokens_per_expert"]))
            tps = tokens_per_step * (step - start_step) / max(time.perf_counter() - t0, 1e-9)
            feed.show_step(step, record, dropped, tps, ctx)
            if step % t.eval_every == 0 or step == t.steps:
                phase(f"evaluation after step {step}")
                val = feed.evaluate(engine, model, ctx)
                history["val"].append([step, val])
                engine.log_metrics({"val": feed.val_metrics(val)})
                progress.note(feed.val_line(step, val))
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
        _end_processes(world, joined_here)
        raise Stopped(step, saved, signum, resume_command)

    # 6. export and report
    extras = kind.export(model, ctx)
    summary: Dict = {}
    if rank == 0:
        timing = clock.summary(step)  # every segment of the run: seconds and tokens/s of the whole run
        summary = {"steps": step, "target_steps": t.steps, "complete": step >= t.steps,
                   "val_loss": history["val"][-1][1] if history["val"] else math.nan,
                   "tokens_per_s": timing["tokens_per_s"], "seconds": timing["seconds"], "world_size": world,
                   "segments": timing["segments"], "recompute": t.recompute, **extras, **feed.summary(history, ctx)}
        (out / "history.json").write_text(json.dumps(history))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        from .plots import write_plots

        plots = write_plots(history, out / "plots")
        if not quiet:
            kind.report(ctx, summary, plots, saved, late, resume_command)
    _end_processes(world, joined_here)
    return summary


__all__ = ["Feed", "RunContext", "RunKind", "StepRecord", "check_memory", "check_out_dir", "finished_message",
           "initialize_engine", "join_processes", "run_memory", "run_training", "seed_process"]
