"""`moesaic train / generate / bench`: a two-step smoke run, resume, and every refusal before training starts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moesaic import checkpoint
from moesaic.checkpoint.manifest import seal
from moesaic.layer.identity import ExpertIndex
from moesaic.models import GPT, GPTConfig
from moesaic.train.cli import find_benchmarks, main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.toml")
SMALL = ["--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
         "--set", "model.block_size=32", "--set", "model.ep_size=1", "--set", "train.nproc=1",
         "--set", "engine.train_micro_batch_size_per_gpu=4", "--set", "train.eval_every=1",
         "--set", "train.eval_batches=2", "--set", "train.checkpoint_every=1", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(30):  # enough files for a train and a validation split
        (folder / f"f{i:02d}.py").write_text(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    return folder


def train(out, corpus, *extra):
    return main(["train", TINY, "--out", str(out), "--data", str(corpus), *SMALL, *extra])


@pytest.fixture(scope="module")
def two_steps(corpus, tmp_path_factory):
    """One finished 2-step run of the module's corpus, trained once: tests that only read it share it, tests that
    resume or edit it take a copy (:func:`run_copy`), as if each had trained it."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    assert train(out, corpus, "--set", "train.steps=2") == 0
    return out


@pytest.fixture
def run_copy(two_steps, tmp_path):
    """A copy of the 2-step run in this test's folder (``tmp_path / "run"``)."""
    return Path(shutil.copytree(two_steps, tmp_path / "run", symlinks=True))


def test_two_steps_then_checkpoint_loads_bitwise(two_steps):
    out = two_steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["val_loss"] == summary["val_loss"]  # finite, not nan
    assert summary["val_loss"] < 10
    assert summary["recompute"] == "none"  # train.recompute = "auto" for the byte-level GPT
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert (out / "plots" / "load_blocks.1.ffn.png").exists()
    assert list((out / "logs").glob("events.out.tfevents.*")) and (out / "logs" / "metrics.csv").exists()
    # the saved checkpoint loads into a fresh model bit for bit
    manifest = checkpoint.read_manifest(checkpoint.resolve(out / "checkpoints"))
    cfg = GPTConfig.from_dict(manifest["model_config"]["model"])
    a, b = GPT(cfg), GPT(cfg)
    checkpoint.load(out / "checkpoints", a, index=ExpertIndex.build(a))
    checkpoint.load(out / "checkpoints", b, index=ExpertIndex.build(b))
    from safetensors.torch import load_file
    saved = load_file(checkpoint.resolve(out / "checkpoints") / "dense.safetensors")
    for name, p in a.named_parameters():
        if name in saved:
            assert torch.equal(p, saved[name]), name
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_resume_continues_refuses_to_overwrite_and_names_the_key_that_must_match(run_copy, corpus, capsys):
    out = run_copy
    before = (out / "summary.json").read_text()
    assert train(out, corpus, "--set", "train.steps=3") == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before, "the existing run must be left alone"
    # only the keys that fix the tensors must match: ep_size, capacity, the loop and the engine may change
    assert train(out, corpus, "--set", "train.steps=3", "--set", "model.moe.capacity_factor=2.0",
                 "--set", "engine.optimizer.params.lr=1e-3", "--resume") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert train(out, corpus, "--set", "train.steps=4", "--set", "model.n_embd=64", "--resume") == 2
    err = capsys.readouterr().err
    assert "--resume: model.n_embd is 64 here but the checkpoint in" in err and "was written with 32" in err
    assert err.count("\n") == 1, "one line naming the key, not two config dicts"
    assert train(out, corpus, "--set", "train.steps=4", "--set", "data.val_percent=10", "--resume") == 2
    assert "--resume: data.val_percent is 10 here" in capsys.readouterr().err
    # a finished run: said so, nothing rewritten (it reported 0 bytes/s and overwrote summary.json)
    before = {name: (out / name).read_bytes() for name in ("summary.json", "history.json")}
    capsys.readouterr()
    assert train(out, corpus, "--set", "train.steps=3", "--resume") == 0
    said = capsys.readouterr().out
    assert "the run already finished at step 3 (train.steps=3); nothing to train" in said
    assert "--set train.steps=6" in said and "bytes/s" not in said
    assert {name: (out / name).read_bytes() for name in before} == before


def test_summary_of_a_stopped_and_resumed_run_is_the_whole_run_with_its_segments(tmp_path, corpus, monkeypatch,
                                                                                  capsys):
    # issue 21: summary.json of a resumed run reported the last segment's seconds and tokens/s only
    import os
    import signal
    import time

    real, calls = GPT.objective, []

    def slow_then_signal(self, loss, aux):  # the first segment takes >= 1.2 s; SIGTERM during step 3
        calls.append(1)
        time.sleep(0.4)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, loss, aux)

    out = tmp_path / "run"
    monkeypatch.setattr(GPT, "objective", slow_then_signal)
    assert train(out, corpus, "--set", "train.steps=5", "--set", "train.checkpoint_every=0") == 143
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(GPT, "objective", real)
    assert train(out, corpus, "--set", "train.steps=5", "--resume") == 0
    summary = json.loads((out / "summary.json").read_text())
    first, second = summary["segments"]
    assert [(s["first_step"], s["last_step"], s["steps"]) for s in (first, second)] == [(1, 3, 3), (4, 5, 2)]
    assert first["seconds"] >= 1.2 and summary["seconds"] == pytest.approx(first["seconds"] + second["seconds"])
    bytes_per_step = 4 * 32  # micro-batch 4 x block 32 x 1 process
    assert first["tokens"] == 3 * bytes_per_step and second["tokens"] == 2 * bytes_per_step
    assert summary["tokens_per_s"] == pytest.approx(5 * bytes_per_step / summary["seconds"])
    assert first["tokens_per_s"] == pytest.approx(first["tokens"] / first["seconds"])
    # the checkpoint of step 3 carried the first segment (the resumed run read it); the final one carries both
    manifest = checkpoint.read_manifest(checkpoint.resolve(out / "checkpoints"))
    model = GPT(GPTConfig.from_dict(manifest["model_config"]["model"]))
    _, client, _ = checkpoint.load(out / "checkpoints", model, index=ExpertIndex.build(model))
    assert client["segments"][0] == first and client["segments"][1]["last_step"] == 5
    assert client["segments"][1]["seconds"] <= second["seconds"]  # saved before the run ended


def test_impossible_micro_batch_is_refused_with_the_estimate_before_anything_runs(tmp_path, capsys):
    import time

    start = time.perf_counter()
    code = main(["train", TINY, "--out", str(tmp_path / "run"), "--set",
                 "engine.train_micro_batch_size_per_gpu=100000000"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 10
    assert "engine.train_micro_batch_size_per_gpu is too large for this machine: a training step needs about" in err
    assert "activations" in err and ("this machine's memory is" in err or "memory limit is" in err)
    assert not (tmp_path / "run").exists()


def test_without_tensorboard_and_matplotlib_the_run_writes_csv_with_one_warning_each(tmp_path, corpus, monkeypatch,
                                                                                    capsys):
    """`pip install moesaic` without extras: training works, metrics.csv only, no plots, one warning per package."""
    import warnings

    import moesaic.telemetry.writer as writer

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    writer._warn_no_tensorboard_once.cache_clear()
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["train", TINY, "--out", str(out), "--data", str(corpus), *SMALL[:-1], "--set", "train.steps=2"])
    assert code == 0
    texts = [str(w.message) for w in caught]
    assert sum("tensorboard package is not installed" in t for t in texts) == 1, texts
    assert sum("matplotlib is not installed" in t for t in texts) == 1, texts
    assert (out / "logs" / "metrics.csv").exists() and not list((out / "logs").glob("events.out.tfevents.*"))
    captured = capsys.readouterr()
    said = captured.out
    assert "(metrics.csv)" in said and "plots: none (matplotlib is not installed" in said
    # issue 21: 2 steps under tiny.toml's 20 warmup steps: one line naming the keys, not the schedule's UserWarning
    assert not [t for t in texts if "warmup_num_steps" in t], texts
    assert captured.err.count("moesaic train: warning: engine.scheduler.params.warmup_num_steps=20 is more than the "
                              "schedule's 2 steps (train.steps=2)") == 1, captured.err


def test_keep_last_prunes_the_run_s_checkpoints(tmp_path, corpus):
    """train.keep_last reaches engine.save_checkpoint(keep_last=N): a 3-step run saving every step keeps 2."""
    out = tmp_path / "run"
    assert train(out, corpus, "--set", "train.steps=3", "--set", "train.keep_last=2") == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("step"))
    assert kept == ["step2", "step3"]
    assert checkpoint.resolve(out / "checkpoints").name == "step3"


def test_dist_timeout_reaches_init_distributed(tmp_path, monkeypatch):
    """train.dist_timeout_s bounds the wait for a stopped or dead peer (it was a hard-coded 300 s)."""
    import moesaic
    from moesaic.parallel.launch import LaunchEnv
    from moesaic.train.config import load_train_config
    from moesaic.train.gpt import run

    class Joined(Exception):
        pass

    def init_distributed(backend=None, timeout_s=300.0):
        raise Joined(timeout_s)

    monkeypatch.setattr(moesaic, "init_distributed", init_distributed)
    cfg = load_train_config(TINY, {"train.dist_timeout_s": 7.5, "train.device": "cpu"})
    with pytest.raises(Joined) as joined:
        run(cfg, tmp_path / "run", env=LaunchEnv(launched=True, rank=0, world_size=2, local_world_size=2,
                                                  master_addr="127.0.0.1", master_port=1))
    assert joined.value.args == (7.5,)
    assert load_train_config(TINY).train.dist_timeout_s == 300.0  # the default of before


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/path"], "does not exist"),
    (["--set", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["--set", "engine.optimizer.params.lrr=1"], "unknown key 'engine.optimizer.params.lrr'; allowed keys under "
                                                 "engine.optimizer.params: adam_w_mode, amsgrad, betas"),
    (["--set", "engine.optimizer.params.lr=0"], "engine.optimizer.params.lr must be a finite number in (0, inf)"),
    (["--set", "optim.lr=0.1"], "optim.lr -> engine.optimizer.params.lr"),
    (["--device", "cuda"], "train.device='cuda' but CUDA is not available"),
    (["--device", "tpu"], "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
    (["--set", "model.moe.num_experts=3", "--set", "model.ep_size=2"], "num_experts"),
    (["--nproc", "3", "--set", "model.ep_size=2"], "nproc"),
    (["--set", "model.moe.k=9"], "model.moe.k must be an int in [1, model.moe.num_experts=4], got 9"),
    (["--set", "model.top_k=3"], "model.top_k = 3 is now model.moe.k"),
    (["--set", "model.moe.score_func=tanh"], "Unknown model.moe.score_func 'tanh'; choose one of ['softmax', 'sigmoid']"),
    (["--set", "train.dist_timeout_s=0"], "train.dist_timeout_s must be a finite number in (0, inf)"),
    (["--set", "train.keep_last=0"], "train.keep_last must be an int >= 1, got 0"),
])
def test_bad_input_stops_before_training(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    out = tmp_path / "run"
    code = main(["train", TINY, "--out", str(out), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def test_empty_and_binary_data_are_refused(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    assert main(["train", TINY, "--out", str(tmp_path / "run"), "--data", str(folder)]) == 2
    assert "nothing to train on" in capsys.readouterr().err
    (folder / "a.txt").write_bytes(b"\x00\x01" * 100)  # binary only
    assert main(["train", TINY, "--out", str(tmp_path / "run"), "--data", str(folder)]) == 2
    assert "nothing to train on" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.subprocess
def test_generate_from_a_run(two_steps):
    out = two_steps
    res = subprocess.run([sys.executable, "-m", "moesaic", "generate", "--checkpoint", str(out), "--prompt", "def ",
                          "--max-new-tokens", "20", "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def ") and len(res.stdout.encode()) >= 20


@pytest.mark.subprocess
def test_help_is_complete(capsys):
    # the command itself (python -m moesaic) once; `train --help` is the same parser's, asked in this process
    res = subprocess.run([sys.executable, "-m", "moesaic", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for command in ("train", "generate", "bench"):
        assert command in res.stdout
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    said = capsys.readouterr().out
    for flag in ("--config", "--nproc", "--device", "--out", "--resume", "--data", "--set"):
        assert flag in said


def test_set_reaches_every_section_and_the_run_records_it(tmp_path, corpus):
    out = tmp_path / "run"
    assert train(out, corpus, "--set", "train.steps=2", "--device", "cpu", "--set", "engine.optimizer.params.lr=0.01",
                 "--set", "engine.gradient_clipping=0.5", "--set", "engine.moe.split_by=layer",
                 "--set", "engine.scheduler.params.warmup_num_steps=1") == 0
    saved = json.loads((out / "run.json").read_text())["config"]
    assert saved["train"]["device"] == "cpu" and saved["engine"]["optimizer"]["params"]["lr"] == 0.01
    assert saved["engine"]["gradient_clipping"] == 0.5 and saved["engine"]["moe"]["split_by"] == "layer"
    assert saved["engine"]["scheduler"]["params"]["total_num_steps"] is None  # follows train.steps in the run
    groups = checkpoint.read_manifest(checkpoint.resolve(out / "checkpoints"))["model_config"]
    assert groups == saved  # the manifest carries the same tree


def test_resume_of_a_checkpoint_written_by_the_former_layout(run_copy, corpus):
    """A checkpoint's manifest written before the config tree was unified (sections model, data, optim, train,
    moe) still resumes: --resume compares the model and data sections only, which kept their keys."""
    out = run_copy
    folder = checkpoint.resolve(out / "checkpoints")
    manifest = json.loads((folder / "manifest.json").read_text())
    new = manifest["model_config"]
    manifest["model_config"] = {  # the former TrainConfig.to_dict() layout
        "model": new["model"], "data": new["data"],
        "optim": {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 20, "grad_clip": 1.0,
                  "min_lr_ratio": 0.1},
        "train": {"steps": 2, "batch_size": 4, "grad_accum": 1, "eval_every": 1, "eval_batches": 2,
                  "checkpoint_every": 1, "log_every": 10, "seed": 1337, "bf16": False, "nproc": 1,
                  "max_minutes": 4.5},
        "moe": {"split_by": "expert", "max_group_size": None}}
    manifest.pop("manifest_crc32")
    (folder / "manifest.json").write_bytes(seal(manifest))  # a manifest as that code would have sealed it
    assert train(out, corpus, "--set", "train.steps=3", "--resume") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_bench_finds_benchmarks_from_the_working_directory(tmp_path, monkeypatch, capsys):
    assert find_benchmarks(ROOT / "src" / "moesaic") == ROOT / "benchmarks"  # from inside the checkout
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "layer"]) == 2
    err = capsys.readouterr().err
    assert f"no benchmarks/ folder of a moesaic checkout in {tmp_path} or above it" in err
