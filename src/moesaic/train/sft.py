"""Fine-tuning steps of ``moesaic train --hf`` on instruction/chat data: rows of a step, its loss, evaluation.

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

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

import moesaic.hf

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
