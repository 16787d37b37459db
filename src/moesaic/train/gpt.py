"""``moesaic train CONFIG``: the byte-level MoE GPT as a kind of run of :mod:`.loop`.

* the model: :class:`moesaic.models.GPT` from ``[model]`` (or a factory's, e.g. the benchmark's
  DeepSpeed layer), its MoE layers on their expert-parallel groups; weight decay on matrices only;
* the data: the bytes of ``data.path`` (the standard library's sources by default), this rank's
  shuffled stream of ``block_size`` windows (:class:`.data.BatchStream`), whose position is kept in
  the checkpoints; resumed under another layout (processes x micro-batch) the weights, optimizer and
  schedule continue exactly and the data order restarts with a new shuffle;
* the loss: the model's cross-entropy plus its MoE losses (``GPT.objective``); validation against
  the unigram baseline of the training bytes;
* no export: the checkpoints are the result (``moesaic generate`` reads them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import moesaic
from moesaic.models import GPT, unigram_baseline_loss
from moesaic.parallel.launch import LaunchEnv
from moesaic.telemetry.writer import tensorboard_available

from . import memory
from .config import TrainConfig
from .data import BatchStream, byte_counts, load_corpus, validation_batches
from .loop import Feed, RunContext, RunKind, StepRecord, run_training, seed_process

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


def _restart_seed(seed: int, step: int) -> int:
    """A data/RNG seed for a run resumed at ``step`` under another layout (not the start's stream again)."""
    return (seed + 1_000_003 * step) % (2 ** 63)


class ByteFeed(Feed):
    """This rank's byte windows of the corpus, the GPT's loss, validation against the unigram baseline."""

    def __init__(self, ctx: RunContext) -> None:
        cfg = ctx.cfg
        self.block_size, self.seed = cfg.model.block_size, cfg.train.seed
        self.split = load_corpus(cfg.data.path, cfg.data.val_percent, cfg.data.suffixes)
        self.stream = self._stream(ctx, self.seed)
        self.val = validation_batches(self.split.val, self.block_size, ctx.micro, cfg.train.eval_batches)
        self.baseline = unigram_baseline_loss(byte_counts(self.split.train, max_bytes=4 << 20))

    def _stream(self, ctx: RunContext, seed: int) -> BatchStream:
        return BatchStream(self.split.train, self.block_size, ctx.micro, seed=seed, rank=ctx.rank,
                           world_size=ctx.world)

    def step(self, engine, model, ctx: RunContext) -> StepRecord:
        record = StepRecord(0.0, 0.0)
        for _ in range(ctx.accum):
            x, y = next(self.stream)
            _, loss, aux = engine(x.to(ctx.device), y.to(ctx.device))
            engine.backward(model.objective(loss, aux))
            engine.step()
            record.loss += float(loss.detach()) / ctx.accum
            record.aux += float(aux.detach()) / ctx.accum
        return record

    def evaluate(self, engine, model, ctx: RunContext) -> float:
        engine.eval()
        total = 0.0
        with torch.no_grad():
            for x, y in self.val:
                _, loss, _ = model(x.to(ctx.device), y.to(ctx.device))
                total += float(loss)
        engine.train()
        return total / max(len(self.val), 1)

    def history(self) -> Dict[str, Any]:
        return {"unigram_baseline": self.baseline}

    def state(self) -> Dict[str, Any]:
        return {"data": self.stream.state_dict()}

    def resume(self, client: Dict[str, Any], engine, ctx: RunContext) -> None:
        data_state = client.get("data") or {}
        if data_state.get("world_size") == ctx.world and data_state.get("batch_size") == ctx.micro:
            if data_state.get("seed") != self.stream.seed:  # the stream was restarted by an earlier resume (below)
                self.stream = self._stream(ctx, int(data_state["seed"]))
            self.stream.load_state_dict(data_state)
            return
        # another layout: the position of each former rank's stream has no counterpart here
        step = engine.global_steps
        self.stream = self._stream(ctx, _restart_seed(self.seed, step))
        seed_process(_restart_seed(self.seed, step), ctx.rank)
        ctx.progress.note(f"resuming at step {step} with {ctx.world} process(es) x {ctx.micro} sequences instead of "
                          f"{data_state.get('world_size')} x {data_state.get('batch_size')}: weights, optimizer and "
                          "schedule continue exactly; the data order restarts (a new shuffle)")

    def val_metrics(self, val: float) -> Dict[str, float]:
        return {"loss": val, "unigram_baseline": self.baseline}

    def val_line(self, step: int, val: float) -> str:
        return f"step {step}: val loss {val:.3f} (unigram baseline {self.baseline:.3f})"

    def summary(self, history: Dict[str, Any], ctx: RunContext) -> Dict[str, Any]:
        return {"unigram_baseline": self.baseline}


class GPTRun(RunKind):
    """The byte-level GPT of ``[model]`` (``model_factory(cfg.model)`` replaces ``GPT(cfg.model)``)."""

    default_recompute = "none"
    fixed_model_keys = MODEL_KEYS_FIXED
    model_keys = "model.n_layer, model.n_embd, model.num_experts"

    def __init__(self, model_factory=None) -> None:
        self.model_factory = model_factory

    def memory_parts(self, cfg: TrainConfig) -> memory.ModelParts:
        return memory.gpt_parts(cfg.model, cfg.batch()[1], cfg.train.recompute)

    def open_data(self, ctx: RunContext) -> Feed:
        return ByteFeed(ctx)

    def build_model(self, ctx: RunContext) -> torch.nn.Module:
        cfg = ctx.cfg.model
        model = self.model_factory(cfg) if self.model_factory is not None else GPT(cfg)
        model.to(ctx.device)
        if ctx.world > 1:
            moesaic.setup_expert_parallel(model)
        return model

    def param_groups(self, model: torch.nn.Module) -> Optional[List[Dict]]:
        return _param_groups(model)

    def report(self, ctx: RunContext, summary: Dict[str, Any], plots: List[Path], saved: Optional[Path],
               late: bool, resume_command: Optional[str]) -> None:
        t, step, segments = ctx.cfg.train, summary["steps"], summary["segments"]
        parts = f" in {len(segments)} segments" if len(segments) > 1 else ""
        print(f"\nvalidation loss {summary['val_loss']:.3f} nats/byte vs unigram baseline "
              f"{summary['unigram_baseline']:.3f} ({step} steps{parts}, {summary['tokens_per_s']:.0f} bytes/s, "
              f"{summary['seconds']:.0f} s)")
        if late:
            print(f"stopped early: train.max_minutes={t.max_minutes} ran out at step {step} of {t.steps}; figures "
                  f"of a full run need all {t.steps} steps. Finish with: "
                  f"{resume_command or 'moesaic train ... --resume'}")
        print(f"checkpoint: {saved if saved is not None else ctx.out / 'checkpoints'}\n"
              f"logs: {ctx.out / 'logs'} (metrics.csv{', TensorBoard' if tensorboard_available() else ''})")
        print("plots: " + (", ".join(str(p) for p in plots) if plots else
                           "none (matplotlib is not installed: pip install 'moesaic[train]')"))


def run(cfg: TrainConfig, out: Path, resume: bool = False, quiet: bool = False, model_factory=None,
        env: Optional[LaunchEnv] = None, resume_command: Optional[str] = None) -> Dict:
    """Train the byte-level GPT (:func:`.loop.run_training` with :class:`GPTRun`); the summary on rank 0.

    Args:
        model_factory: ``model_factory(cfg.model)`` replaces ``GPT(cfg.model)`` (the benchmark swaps in
            DeepSpeed's layer).
        others: see :func:`.loop.run_training`.

    Raises:
        Stopped: a signal stopped the run; the checkpoint of the last step is saved.
    """
    return run_training(GPTRun(model_factory), cfg, out, resume=resume, quiet=quiet, env=env,
                        resume_command=resume_command)


__all__ = ["ByteFeed", "GPTRun", "MODEL_KEYS_FIXED", "run"]
