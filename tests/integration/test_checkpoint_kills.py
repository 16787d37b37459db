"""Checkpoints survive SIGKILL: bitwise resume after a killed run, and a kill loop during saves.

These tests start and kill processes (marked ``subprocess``); the fast checkpoint tests are in
tests/unit/test_checkpoint.py.
"""

import json
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch

from moesaic import checkpoint
from moesaic.layer.identity import ExpertIndex
from support.checkpoint_net import Net, make_engine, train, transient_files as _transient

pytestmark = pytest.mark.subprocess

# Each training process is a fresh child of a fork server that has imported torch and moesaic once (as
# tests/distributed/launch.py starts its ranks, with the same preload): a child then starts in a fraction of a
# second instead of importing torch again, which was most of this file's time. A killed child is killed
# whatever way it was started; nothing of a process's own state (weights, RNG, files) comes from the server.
mp.set_forkserver_preload(["torch", "torch.distributed", "moesaic"])
START = mp.get_context("forkserver")


def _run(path, steps_before, steps_after, kill_after_save, out, bf16):
    """A training process; writes its losses to ``out`` (JSON) as it goes."""
    try:
        engine = make_engine(bf16)
        if steps_before is None:  # resume
            engine.load_checkpoint(path)
            out.write_text(json.dumps(train(engine, steps_after, bf16)))
            return
        torch.manual_seed(123)
        first = train(engine, steps_before, bf16)
        engine.save_checkpoint(path)
        later = train(engine, steps_after, bf16)
        out.write_text(json.dumps(first + later))
        if kill_after_save:
            os.kill(os.getpid(), signal.SIGKILL)
    except BaseException:
        import traceback
        out.write_text(json.dumps(traceback.format_exc()))
        raise


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_after_sigkill_gives_bitwise_identical_losses(tmp_path, bf16):
    ctx = START
    runs = []
    for i, args in enumerate(((tmp_path / "a", 4, 4, False), (tmp_path / "b", 4, 1, True),
                              (tmp_path / "b", None, 4, False))):
        out = tmp_path / f"losses{i}.json"
        p = ctx.Process(target=_run, args=(*args, out, bf16))
        p.start()
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            raise AssertionError("training process hung")
        result = json.loads(out.read_text())
        assert not isinstance(result, str), result
        assert p.exitcode == (-signal.SIGKILL if args[3] else 0)
        runs.append(result)
    uninterrupted, killed, resumed = runs
    assert killed[:5] == uninterrupted[:5]
    assert resumed == uninterrupted[4:], "a resumed run must continue exactly"


def _saver(root, ready):
    """Save forever (new and re-saved tags, keep_last) until killed."""
    engine = make_engine()
    ready.write_text("started")
    i = 0
    while True:
        train(engine, 1)
        engine.save_checkpoint(root, tag="best" if i % 3 == 0 else None, keep_last=2, client_state={"i": i})
        i += 1


def test_kill_loop_leaves_latest_loadable_and_no_debris(tmp_path):
    ctx = START
    root = tmp_path / "ck"
    rng = random.Random(0)
    for kill in range(6):
        ready = tmp_path / f"ready{kill}"
        p = ctx.Process(target=_saver, args=(root, ready))
        p.start()
        deadline = time.monotonic() + 120
        while not ready.exists() and p.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3 + rng.random() * 1.2)  # some saves complete, the kill lands inside one
        os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=30)
        assert p.exitcode == -signal.SIGKILL, "the saver died on its own"
        if not (root / "latest").exists():
            continue  # killed before its first save published
        fresh = make_engine()
        fresh.load_checkpoint(root)
        checkpoint.verify(root)
        assert len(_transient(root)) <= 3, _transient(root)  # at most the killed save's own
        published = [d for d in root.iterdir() if not d.name.startswith(".")]
        assert len(published) <= 2 + 2 + 1, published  # keep_last, a killed save's new and old, latest
    checkpoint.save(root, m := Net(), tag="final", index=ExpertIndex.build(m))
    assert _transient(root) == []
