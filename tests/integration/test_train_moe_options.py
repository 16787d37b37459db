"""``moesaic train`` trains every router the layer supports, set through ``[model.moe]`` / ``--set model.moe...``."""

import json

import pytest

from moesaic.train.cli import main

TINY = "configs/tiny.toml"
SMALL = ["--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
         "--set", "model.block_size=32", "--set", "model.ep_size=1", "--set", "train.nproc=1",
         "--set", "train.steps=3", "--set", "train.eval_every=3", "--set", "train.eval_batches=1",
         "--set", "train.checkpoint_every=3", "--set", "engine.train_micro_batch_size_per_gpu=2",
         "--set", "engine.gradient_accumulation_steps=1", "--set", "engine.train_batch_size=2"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 200)
    return path


# DeepSeek-V3's router: sigmoid scores, group-limited top-k, the aux-loss-free bias, normalised and scaled
# weights, the sequence-level loss, a gated shared expert; dropless (one run: each CLI run takes seconds; the
# other routers' options are checked layer by layer in tests/unit/test_router_options.py)
OPTIONS = ["score_func=\"sigmoid\"", "top2_2nd_expert_sampling=false", "n_group=2", "topk_group=1",
           "enable_expert_bias=true", "norm_topk_prob=true", "routed_scaling_factor=2.5", "seq_aux_loss_coef=0.001",
           "shared_experts=1", "shared_expert_gate=true", "drop_tokens=false", "z_loss_coef=0.001"]


def test_a_modern_router_trains_from_the_command_line(tmp_path, corpus):
    options = OPTIONS
    out = tmp_path / "run"
    sets = [arg for o in options for arg in ("--set", f"model.moe.{o}")]
    assert main(["train", TINY, "--out", str(out), "--data", str(corpus), *SMALL, *sets]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val_loss"] < 10
    stored = json.loads((out / "run.json").read_text())
    moe = stored["config"]["model"]["moe"]
    for o in options:
        key, value = o.split("=", 1)
        assert moe[key] == json.loads(value), key
