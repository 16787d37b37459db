"""A fine-tuning step's gradient does not depend on how its rows are split into micro-batches."""

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import moesaic  # noqa: E402
import moesaic.hf  # noqa: E402
from moesaic.train.packing import RowStream  # noqa: E402
from moesaic.train.sft import step_batches, train_step  # noqa: E402
from support.hf_models import V, randomise, tiny_config  # noqa: E402


class RandomStore:
    """Documents of random tokens; the first ``prompt`` tokens of each are not targets."""

    def __init__(self, n=24, seed=0):
        g = np.random.default_rng(seed)
        self.docs = [g.integers(0, V, g.integers(3, 12)) for _ in range(n)]
        self.marks = [np.r_[np.zeros(len(d) // 2), np.ones(len(d) - len(d) // 2)].astype(np.uint8) for d in self.docs]
        self.lengths = np.array([len(d) for d in self.docs])
        self.doc_targets = np.array([m[1:].sum() for m in self.marks])

    def document(self, i):
        return self.docs[i], self.marks[i]


def tiny_olmoe(aux=0.0):
    cfg = tiny_config("olmoe")
    cfg.router_aux_loss_coef = aux
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomise(model)
    return moesaic.hf.load(model)


def reference_gradient(model, store, stream, step, rows):
    """The gradient of the step's rows as one micro-batch, plain autograd, mean over target tokens."""
    model.zero_grad(set_to_none=True)
    (batch,), denominator = step_batches(stream, store, step, rows, 1, 1, 0, True)
    loss, _, _ = moesaic.hf.answer_loss(model, batch, denominator=denominator)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def engine_gradient(model, store, stream, step, micro, accum, world=1, rank=0):
    """The engine's gradient after the step's last backward (before the optimizer moves anything)."""
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}, "moe": {"split_by": "expert"}}
    engine, *_ = moesaic.initialize(model=model, config=config)
    grads = {}
    real_step = engine.step

    def capture():
        if engine.is_gradient_accumulation_boundary():
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        real_step()

    engine.step = capture
    figures = train_step(engine, stream, store, step, micro, accum, world, rank, True)
    return grads, figures


def test_the_step_gradient_is_the_same_for_4_micro_batches_and_one_of_everything():
    store = RandomStore()
    stream = RowStream(store.lengths, 16, seed=1)
    model = tiny_olmoe()
    ref = reference_gradient(copy.deepcopy(model), store, stream, 1, 4)
    one, f1 = engine_gradient(copy.deepcopy(model), store, stream, 1, 4, 1)
    four, f4 = engine_gradient(copy.deepcopy(model), store, stream, 1, 1, 4)
    assert set(ref) == set(one) == set(four) and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(one[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(four[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)
    assert f1.targets == f4.targets > 0 and abs(f1.loss - f4.loss) < 1e-6
    assert f4.real <= f4.computed and f1.real == f4.real


def test_a_per_micro_batch_mean_would_differ():
    # the accumulation bug this normalisation avoids: averaging per-micro-batch means weighs the
    # targets of a short micro-batch more
    store = RandomStore()
    stream = RowStream(store.lengths, 16, seed=1)
    batches, den = step_batches(stream, store, 1, 1, 4, 1, 0, True)
    counts = [b["targets"] for b in batches]
    assert sum(counts) == den and len(set(counts)) > 1


def test_fine_tuning_runs_recompute_block_by_default_with_the_same_loss_and_an_explicit_policy_wins(tmp_path):
    # issue 25 item 4: train.recompute = "auto" is "block" for train --hf, "none" for the byte-level GPT
    from moesaic.train.config import load_train_config
    from moesaic.train.gpt import GPTRun
    from moesaic.train.hf import HF_DEFAULTS, HFRun
    from moesaic.train.loop import run_memory
    from support.hf_models import build

    folder = build("olmoe", tmp_path / "olmoe")
    cfg = load_train_config(copy.deepcopy(HF_DEFAULTS), {"model.block_size": 8})
    assert cfg.train.recompute == "auto"
    assert cfg.with_recompute(HFRun.default_recompute).train.recompute == "block"
    assert cfg.with_recompute(GPTRun.default_recompute).train.recompute == "none"
    explicit = load_train_config(copy.deepcopy(HF_DEFAULTS), {"model.block_size": 8, "train.recompute": "none"})
    assert explicit.with_recompute(HFRun.default_recompute).train.recompute == "none"
    with pytest.raises(ValueError, match="auto must be one of"):
        cfg.with_recompute("auto")
    # the up-front memory estimate counts the resolved policy
    auto, none = run_memory(HFRun(folder), cfg), run_memory(HFRun(folder), explicit)
    block = run_memory(HFRun(folder), load_train_config(copy.deepcopy(HF_DEFAULTS),
                                                        {"model.block_size": 8, "train.recompute": "block"}))
    assert auto == block and auto.activations < none.activations and auto.params == none.params

    # a fine-tuning step under "block" has the loss and gradient of the same step without recompute
    store = RandomStore()
    stream = RowStream(store.lengths, 16, seed=1)
    model = tiny_olmoe(aux=0.01)
    plain, f_plain = engine_gradient(copy.deepcopy(model).train(), store, stream, 1, 2, 2)
    recomputed = copy.deepcopy(model).train()
    assert moesaic.apply_recompute(recomputed, "block")["blocks"] == 2
    grads, f_block = engine_gradient(recomputed, store, stream, 1, 2, 2)
    assert abs(f_block.loss - f_plain.loss) <= 1e-6 * max(1.0, abs(f_plain.loss))
    assert set(grads) == set(plain) and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
