"""Fine-tuning steps of ``moesaic train --hf`` on instruction/chat data: rows of a step, its loss, evaluation.

:class:`SFTFeed` is the :class:`~.loop.Feed` of such a run: the rows are tokenized once into
``<out>/data`` (rank 0; the others wait and read the store memory-mapped, :mod:`.sft_data`), each
step takes rows of a best-fit packed stream (:mod:`.packing`; ``data.packing``) with the loss on
the answers only (``data.train_on``), and the data files' hashes are kept in the checkpoints: a
resume on changed data is refused, naming the file.

One optimizer step takes ``R = micro x accumulation x processes`` rows of the row stream
(:class:`moesaic.train.packing.RowStream`); process ``p`` takes the ``p``-th contiguous share and
cuts it into its micro-batches. Every process counts the target tokens of all R rows (from the
store, no communication), and each micro-batch's loss is its summed cross-entropy times
``accumulation x processes / targets of the step``: the engine divides by the one and averages over
the other, so the step's gradient is that of the global batch's mean over target tokens whatever the
split (``tests/unit/test_sft_step.py``, ``tests/distributed/test_sft_dist.py``: 1 process x 4
micro-batches, 2 x 2 and 1 x 1 give the same gradient).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

import moesaic.hf

from . import sft_data
from .loop import Feed, RunContext, StepRecord
from .packing import RowStream, collate


@dataclass
class StepFigures:
    """What one step trained on and how fast (for the progress line and the summary)."""

    loss: float = 0.0  # cross-entropy per target token over the whole step (every process)
    aux: float = 0.0  # the balance loss, averaged over micro-batches (this process)
    targets: int = 0  # target tokens of the step (every process)
    real: int = 0  # tokens that are not padding (this process)
    computed: int = 0  # tokens run through the model, padding included (this process)


def step_batches(stream: RowStream, store, step: int, micro: int, accum: int, world: int, rank: int,
                 packed: bool) -> Tuple[List[Dict], int]:
    """This process's micro-batches of optimizer step ``step`` and the target tokens of the whole step."""
    R = micro * accum * world
    rows = stream.rows(step * R, R)
    denominator = int(sum(int(store.doc_targets[d]) for row in rows for d in row))
    mine = rows[rank * micro * accum:(rank + 1) * micro * accum]
    return [collate(store, mine[m * micro:(m + 1) * micro], packed) for m in range(accum)], denominator


def train_step(engine, stream: RowStream, store, step: int, micro: int, accum: int, world: int, rank: int,
               packed: bool) -> StepFigures:
    """Run the ``accum`` micro-batches of step ``step`` through the engine (backward and step each)."""
    batches, denominator = step_batches(stream, store, step, micro, accum, world, rank, packed)
    f = StepFigures(targets=denominator)
    ce = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        device = next(engine.module.parameters()).device
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        loss, ce_sum, aux = moesaic.hf.answer_loss(engine, batch, denominator=denominator, scale=accum * world)
        engine.backward(loss)
        engine.step()
        ce += ce_sum.double().cpu()
        f.aux += (float(aux) if aux is not None else 0.0) / accum
        f.real += int(batch["token_mask"].sum())
        f.computed += batch["token_mask"].numel()
    if world > 1:
        dist.all_reduce(ce)
    f.loss = float(ce) / denominator
    return f


def evaluate(engine, stream: RowStream, store, batches: int, micro: int, packed: bool) -> float:
    """Cross-entropy per target token of the first ``batches x micro`` validation rows (the same every time)."""
    rows = stream.rows(0, min(batches * micro, stream.rows_per_epoch()))
    device = next(engine.module.parameters()).device
    engine.eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), micro):
            batch = collate(store, rows[i:i + micro], packed)
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            _, ce_sum, _ = moesaic.hf.answer_loss(engine, batch, denominator=1.0)
            total += float(ce_sum)
            targets += batch["targets"]
    engine.train()
    return total / max(targets, 1)


def _prepare(ctx: RunContext, tokenizer) -> Tuple[Any, Any, Dict]:
    """Tokenize the instruction/chat data once (rank 0 first, the others then read it): ``(train, val, files)``."""
    cfg, rank, world = ctx.cfg, ctx.rank, ctx.world
    d = cfg.data
    tok = sft_data.Tokenizing(tokenizer, cfg.model.block_size, train_on=d.train_on, truncate=d.truncate)
    files = sft_data.file_signature(sft_data.data_files(d.path) +
                                    (sft_data.data_files(d.val_path) if d.val_path else []))

    def prepare():
        return sft_data.prepare(d.path, ctx.out / "data", tok, val_path=d.val_path, val_percent=d.val_percent,
                                max_bad_fraction=d.max_bad_fraction, signature=files)

    failed = None
    if rank == 0:
        try:
            train, val = prepare()
        except Exception as e:  # the others must not wait forever for a store that will not come
            failed = e
    if world > 1:
        flag = torch.tensor([failed is not None], dtype=torch.int32)
        dist.broadcast(flag, 0)
        if bool(flag):
            raise failed if failed is not None else RuntimeError("rank 0 could not prepare the data (see its error)")
        if rank != 0:
            train, val = prepare()
    elif failed is not None:
        raise failed
    return train, val, files


class SFTFeed(Feed):
    """Packed (or padded) rows of instruction/chat data, answers-only loss normalised over the whole step."""

    def __init__(self, ctx: RunContext, tokenizer) -> None:
        self.train, self.val, self.files = _prepare(ctx, tokenizer)
        d, block_size, seed = ctx.cfg.data, ctx.cfg.model.block_size, ctx.cfg.train.seed
        self.packing = d.packing
        self.train_rows = RowStream(self.train.lengths, block_size, seed, d.packing)
        self.val_rows = RowStream(self.val.lengths, block_size, seed, d.packing)
        self.last: StepFigures = StepFigures()
        self.seconds = 0.0
        if ctx.show:
            for store in (self.train, self.val):
                print(store.report.line(), flush=True)

    def step(self, engine, model, ctx: RunContext) -> StepRecord:
        t0 = time.perf_counter()
        f = train_step(engine, self.train_rows, self.train, engine.global_steps, ctx.micro, ctx.accum, ctx.world,
                       ctx.rank, self.packing)
        self.last, self.seconds = f, time.perf_counter() - t0
        totals = ctx.history.setdefault("tokens", {"targets": 0, "real": 0, "computed": 0, "seconds": 0.0})
        totals["targets"] += f.targets
        totals["real"] += f.real
        totals["computed"] += f.computed
        totals["seconds"] += self.seconds
        return StepRecord(f.loss, f.aux)

    def evaluate(self, engine, model, ctx: RunContext) -> float:
        return evaluate(engine, self.val_rows, self.val, ctx.cfg.train.eval_batches, ctx.micro, self.packing)

    def state(self) -> Dict[str, Any]:
        return {"data_files": self.files}

    def resume(self, client: Dict[str, Any], engine, ctx: RunContext) -> None:
        sft_data.check_same_data(client.get("data_files", {}), self.files)

    def show_step(self, step: int, record: StepRecord, dropped: float, tokens_per_s: float, ctx: RunContext) -> None:
        f, seconds = self.last, self.seconds
        ctx.progress.note(f"step {step}/{ctx.cfg.train.steps}: loss {f.loss:.4f} aux {f.aux:.4f} | "
                          f"{f.real * ctx.world / seconds:.0f} tok/s, {f.targets / seconds:.0f} answer tok/s, "
                          f"padding efficiency {100 * f.real / max(f.computed, 1):.1f}%")

    def summary(self, history: Dict[str, Any], ctx: RunContext) -> Dict[str, Any]:
        if "tokens" not in history:
            return {}
        figures, world = history["tokens"], ctx.world  # rows are not full: count the real tokens
        return {"answer_tokens_per_s": figures["targets"] / max(figures["seconds"], 1e-9),
                "tokens_per_s": figures["real"] * world / max(figures["seconds"], 1e-9),
                "padding_efficiency": figures["real"] / max(figures["computed"], 1),
                "data": {k: v.report.__dict__ for k, v in (("train", self.train), ("val", self.val))}}
