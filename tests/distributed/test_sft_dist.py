"""Two processes x 2 micro-batches give a fine-tuning step the gradient of 1 process x 1 micro-batch of everything."""

import copy
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # support.* in spawned ranks
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))
from launch import run_ranks  # noqa: E402


def _rank(rank, world_size, out_dir):
    from moesaic.train.packing import RowStream
    from test_sft_step import RandomStore, engine_gradient, reference_gradient, tiny_olmoe

    store = RandomStore()
    stream = RowStream(store.lengths, 16, seed=1)
    model = tiny_olmoe()  # the same weights on both ranks (seeded)
    ref = reference_gradient(copy.deepcopy(model), store, stream, 1, 4)
    grads, figures = engine_gradient(model, store, stream, 1, 1, 2, world_size, rank)  # 1 row x 2 x 2
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m} ratio {float(grads[name].norm() / ref[name].norm())}")
    torch.save({"loss": figures.loss, "targets": figures.targets}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_of_two_micro_batches_give_the_whole_batch_gradient(tmp_path):
    run_ranks(_rank, 2, str(tmp_path), timeout_s=300)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a == b and a["targets"] > 0  # every rank reports the step's loss over all targets
