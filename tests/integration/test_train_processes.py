"""`moesaic train --nproc 2` end to end, as a user runs it: exact resume, clean stops, one error (issue 11, items 6-9).

These start real processes (the launcher and 2 ranks), so each costs seconds: the model is tiny and
every run is a few steps. Marked ``subprocess``.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moesaic import checkpoint
from moesaic.layer.identity import ExpertIndex
from moesaic.models import GPT, GPTConfig
from moesaic.telemetry import read_csv_metrics
from support.train_runs import TINY, W2, moesaic_cli, subprocess_env, corpus, trained_steps  # noqa: F401 (corpus: a fixture)

pytestmark = pytest.mark.subprocess


def moesaic(*args, timeout=240, **kwargs):
    return subprocess.run([sys.executable, "-m", "moesaic", *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), **kwargs)


def weights(run: Path) -> dict:
    """The run's latest checkpoint loaded into one process (every expert), as a state dict."""
    manifest = checkpoint.read_manifest(checkpoint.resolve(run / "checkpoints"))
    model_cfg = dict(manifest["model_config"]["model"], ep_size=1)
    model = GPT(GPTConfig.from_dict(model_cfg))
    checkpoint.load(run / "checkpoints", model, index=ExpertIndex.build(model))
    return model.state_dict()


def _wait_for(predicate, timeout_s, proc):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run made no progress")
        time.sleep(0.1)


def test_w2_ep2_sigterm_stops_at_one_step_resume_is_bitwise_and_a_failure_is_one_line(tmp_path, corpus):
    """2 ranks, ep_size=2, as a user runs them:

    1. SIGTERM to the launcher (as a batch scheduler sends it) stops both ranks after the same step N,
       with a checkpoint, one 'stopped at step N' line and exit code 143 (it used to exit at once, unsaved);
    2. resumed to N + 2, the weights equal an uninterrupted run of N + 2 steps tensor for tensor (they
       were 3e-2 apart: each rank kept the dense weights of its own seed, and a checkpoint stores one copy),
       and metrics.csv holds each step once with the same figures;
    3. a rank that fails (a checkpoint missing one expert's file) shows its error once, as one line.
    """
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    args = ["train", TINY, "--data", str(corpus), *W2]
    proc = moesaic_cli([*args, "--out", str(stopped), "--set", "train.steps=1000"])
    _wait_for(lambda: trained_steps(stopped) >= 2, 180, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    lines = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(lines) == 1, out
    step = int(lines[0].split()[3])
    assert f"(SIGTERM), checkpoint {stopped / 'checkpoints' / f'step{step}'}; resume with: " in lines[0]
    assert "--resume" in lines[0] and "--out" in lines[0]
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    manifest = checkpoint.read_manifest(checkpoint.resolve(stopped / "checkpoints"))
    assert manifest["step"] == step == trained_steps(stopped)  # both ranks stopped after this step and saved it

    res = moesaic(*args, "--out", str(stopped), "--set", f"train.steps={step + 2}", "--resume")
    assert res.returncode == 0, res.stderr
    res = moesaic(*args, "--out", str(whole), "--set", f"train.steps={step + 2}")
    assert res.returncode == 0, res.stderr
    a, b = weights(whole), weights(stopped)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name] - b[name]).abs().max()}"
    want, got = read_csv_metrics(whole / "logs"), read_csv_metrics(stopped / "logs")
    for tag in ("train/loss", "train/grad_norm", "moe/blocks.1.ffn/tokens_per_expert/3"):
        assert got[tag] == want[tag], tag  # steps 1..N+2 once each, the same numbers
    assert [s for s, _ in got["train/loss"]] == list(range(1, step + 3))

    folder = checkpoint.resolve(stopped / "checkpoints")
    victim = sorted((folder / "experts").rglob("*.safetensors"))[0]
    victim.unlink()
    res = moesaic(*args, "--out", str(stopped), "--set", "train.steps=1000", "--resume")
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("moesaic train: error (rank "), res.stderr
    assert "Traceback" not in res.stderr and victim.name in errors[0]


def test_w2_stage3_trains_checkpoints_and_resumes_as_the_uninterrupted_run(tmp_path, corpus):
    """`moesaic train --nproc 2` at engine.zero_optimization.stage=3 (FSDP2; ep_size 1, so every expert is
    sharded over both ranks): two steps, then --resume to three, equals three uninterrupted steps; each rank
    wrote only its rows (format 3) and the per-group telemetry reaches metrics.csv."""
    z3 = [*W2, "--set", "model.ep_size=1", "--set", "engine.zero_optimization.stage=3"]
    base = ["train", TINY, "--data", str(corpus), *z3]
    split, whole = tmp_path / "split", tmp_path / "whole"
    for out, steps, extra in ((split, 2, []), (split, 3, ["--resume"]), (whole, 3, [])):
        done = moesaic(*base, "--out", str(out), "--set", f"train.steps={steps}", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    manifest = checkpoint.read_manifest(checkpoint.resolve(split / "checkpoints"))
    assert manifest["format_version"] == 3 and len(manifest["dense"]["files"]) == 2 and manifest["step"] == 3
    a, b = weights(split), weights(whole)
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    metrics = read_csv_metrics(split / "logs")
    assert [s for s, _ in metrics["train/loss"]] == [1, 2, 3]
    assert any(k.startswith("group/decay/") and k.endswith("/update_ratio") for k in metrics), sorted(metrics)
