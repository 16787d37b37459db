"""Helpers of the tests that run ``moesaic train`` end to end (the CLI in this process, or its processes)."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from moesaic.telemetry import read_csv_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.toml")
# 2 ranks, ep_size 2, a tiny model: each run of these costs seconds
W2 = ["--nproc", "2", "--device", "cpu", "--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
      "--set", "model.block_size=32", "--set", "model.ep_size=2", "--set", "engine.train_micro_batch_size_per_gpu=4",
      "--set", "train.eval_every=100000", "--set", "train.eval_batches=1", "--set", "train.log_every=1",
      "--set", "train.checkpoint_every=0", "--set", "engine.scheduler.params.total_num_steps=1000", "--quiet"]


def write_corpus(folder: Path) -> Path:
    """A small corpus of Python files in ``folder`` (30 files, about 50 KB)."""
    for i in range(30):
        (folder / f"f{i:02d}.py").write_text(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A module's corpus (:func:`write_corpus`); a test module imports this fixture to use it."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def subprocess_env() -> Dict[str, str]:
    """The environment of a ``python -m moesaic`` child: this checkout's ``src`` first on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def moesaic_cli(args: List[str], **kwargs) -> subprocess.Popen:
    """Start ``python -m moesaic ARGS`` (stdout and stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", "moesaic", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), **kwargs)


def trained_steps(run: Path) -> int:
    """Steps the run in ``run`` has logged to metrics.csv so far (0 before its first)."""
    try:
        return len(read_csv_metrics(run / "logs").get("train/loss", []))
    except (OSError, ValueError):
        return 0


def hf_train_args(folder, data, out, steps: int, settings: Dict[str, object], *extra: str) -> List[str]:
    """``train --hf FOLDER --data DATA --out OUT --quiet`` with ``train.steps`` and a ``--set`` per setting."""
    sets = [a for key, value in {"train.steps": steps, **settings}.items() for a in ("--set", f"{key}={value}")]
    return ["train", "--hf", str(folder), "--data", str(data), "--out", str(out), "--quiet", *sets, *extra]


def exported_tensors(folder: Path) -> Dict:
    """The tensors of an exported Hugging Face folder's ``model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
