"""Every code block of the README runs as written (issue 11, item 13).

* ``python`` blocks run, each alone, in a fresh interpreter in an empty folder, and print something a
  reader can check: a ``# prints TEXT`` comment on a line promises TEXT in the block's output;
* ``toml`` blocks are config fragments: they load as a training config;
* ``diff`` blocks (porting a DeepSpeed script) compile on both sides, and the new side is the old
  one with DeepSpeed's names replaced by moesaic's, nothing else;
* ``bash`` blocks run line by line, in order, in a folder holding the checkout's ``configs/`` and
  ``examples/`` and ``.venv`` (the environment running these tests), so ``.venv/bin/moesaic`` is the
  command a reader types, with no virtual environment activated. ``moesaic train`` lines get tiny
  overrides appended (a 2-step run of a 2-layer model, or of the ``--hf`` folder's model with short
  sequences: the command is the README's, the run short);
  ``make`` lines are checked with ``make -n`` (their recipes are the commands tested here, and ``make
  test`` runs this very test).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moesaic._config import _toml
from moesaic.train.config import load_train_config

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
TINY_RUN = ["--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
            "--set", "model.block_size=32", "--set", "engine.train_micro_batch_size_per_gpu=4",
            "--set", "train.steps=2", "--set", "train.eval_batches=1", "--quiet"]
TINY_HF_RUN = ["--set", "model.block_size=16", "--set", "engine.train_micro_batch_size_per_gpu=2",
               "--set", "train.steps=2", "--set", "train.eval_batches=1", "--quiet"]  # of [model], --hf takes these
PROMISE = re.compile(r"#\s*prints\s+(.+?)\s*$")


def _blocks(lang):
    return [body for kind, body in BLOCKS if kind == lang]


def test_readme_has_only_blocks_this_test_runs():
    assert {kind for kind, _ in BLOCKS} <= {"bash", "python", "toml", "diff"}, [kind for kind, _ in BLOCKS]
    assert len(_blocks("python")) >= 2 and _blocks("bash") and _blocks("toml")


@pytest.fixture
def sandbox(tmp_path):
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    venv = Path(sys.executable).parent.parent  # the environment running the tests
    if not (venv / "bin" / "moesaic").exists():
        pytest.skip(f"{venv} has no moesaic console script (pip install -e . into the environment running pytest)")
    (tmp_path / ".venv").symlink_to(venv)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("VIRTUAL_ENV", None)
    return tmp_path, env


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs_as_written(index, sandbox):
    folder, env = sandbox
    block = _blocks("python")[index]
    res = subprocess.run([sys.executable, "-c", block], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), "a README example prints what a reader can check against it"
    for line in block.splitlines():
        promise = PROMISE.search(line)
        if promise:
            assert promise.group(1) in res.stdout, (promise.group(1), res.stdout)


@pytest.mark.parametrize("index", range(len(_blocks("toml"))))
def test_toml_block_is_a_valid_config(index):
    cfg = load_train_config(_toml().loads(_blocks("toml")[index]))
    assert cfg.train.steps >= 1


@pytest.mark.parametrize("index", range(len(_blocks("diff"))))
def test_diff_block_changes_only_deepspeed_names(index):
    lines = _blocks("diff")[index].splitlines()
    old = "\n".join(line[1:] for line in lines if not line.startswith("+"))
    new = "\n".join(line[1:] for line in lines if not line.startswith("-"))
    compile(old, "README diff (old side)", "exec")
    compile(new, "README diff (new side)", "exec")
    ported = old.replace("from deepspeed.moe.layer import MoE", "from moesaic import MoE").replace("deepspeed.", "moesaic.")
    assert ported == new and old != new


def _commands():
    for body in _blocks("bash"):
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                yield words


def test_bash_blocks_run_as_written(sandbox):
    folder, env = sandbox
    ran = []
    for words in _commands():
        if words[0] == "make":
            assert len(words) == 2, words
            res = subprocess.run(["make", "-n", words[1]], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert res.returncode == 0 and res.stdout.strip(), (words, res.stderr)
            ran.append(" ".join(words))
            continue
        assert words[0].startswith(".venv/bin/"), f"{words}: README commands name .venv/bin/..., no activation needed"
        if words[:2] == [".venv/bin/moesaic", "train"]:
            words = words + (TINY_HF_RUN if "--hf" in words else TINY_RUN)
        res = subprocess.run(words, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (words, res.stdout[-2000:], res.stderr[-3000:])
        if words[:2] == [".venv/bin/torchrun", "--nproc-per-node"] and words[-1] == "examples/ep_check.py":
            for rank in range(int(words[2])):
                assert f"rank {rank}/{words[2]} (gloo): expert parallelism matches data parallelism" in res.stdout
        ran.append(words[0])
    assert ".venv/bin/moesaic" in ran and ".venv/bin/torchrun" in ran and "make demo" in ran
    assert (folder / "runs" / "tiny-mixtral-ft" / "hf" / "tokenizer.json").exists()  # train --hf ran and exported
