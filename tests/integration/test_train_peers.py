"""`moesaic train --nproc 2` when a rank stops answering or dies (issue 21, item 6).

``train.dist_timeout_s`` bounds any wait for a stopped or dead peer: SIGSTOP to rank 1 mid-training ends
the run within about ``dist_timeout_s``, naming rank 1 (not rank 0, whose collective noticed); it used
to hang for the 30 minutes torch's expert-parallel groups waited by default. ``kill -9`` of rank 1 ends
it with one line naming rank 1 and SIGKILL instead of rank 0's "Connection reset by peer".

These start real processes (the launcher and 2 ranks); the model is tiny. Linux only (the tests find the
ranks through ``/proc``). Marked ``subprocess``.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.train_runs import TINY, W2, moesaic_cli, corpus, trained_steps  # noqa: F401 (corpus: a fixture)

pytestmark = [pytest.mark.subprocess,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")]


def _children(pid: int):
    """The processes whose parent is ``pid``, with their ``RANK``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rfind(")") + 2:].split()[1]) != pid:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


@pytest.fixture
def training(tmp_path, corpus):
    """Start a 2-rank run; yields a function that waits until it trains and returns ``(launcher, {rank: pid})``.
    At teardown every process of it is continued and killed, whatever the test did."""
    started = []

    def start(timeout_s: float):
        run = tmp_path / "run"
        proc = moesaic_cli(["train", TINY, "--data", str(corpus), *W2, "--set", "train.steps=100000",
                            "--set", f"train.dist_timeout_s={timeout_s}", "--out", str(run)])
        started.append((proc, {}))
        deadline = time.monotonic() + 240  # start-up on a loaded 2-core machine can take a minute
        while trained_steps(run) < 2:  # mid-training
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"the run ended early ({proc.returncode}):\n{out}\n{err}")
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.1)
        ranks = _children(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        started[-1][1].update(ranks)
        return proc, ranks

    yield start
    for proc, ranks in started:
        for pid in ranks.values():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_sigstop_of_rank_1_ends_the_run_within_dist_timeout_naming_rank_1(training):
    timeout_s = 10
    proc, ranks = training(timeout_s)
    os.kill(ranks[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout_s + 90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher still runs {timeout_s + 90} s after rank 1 stopped (dist_timeout_s={timeout_s})")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    # e.g. "stopped answering for 10 s during step 5 (the process is stopped: ...)", or "during the stop
    # agreement after step 4": where rank 1 was when it stopped
    assert re.match(r"moesaic train: error \(rank 1 of 2\): stopped answering for \d+ s during .*step \d+ \(the "
                    r"process is stopped: SIGSTOP or a debugger\); every process of the run was ended$", lines[0]), err
    assert elapsed < timeout_s + 10, f"{elapsed:.1f} s after rank 1 stopped (dist_timeout_s={timeout_s})"
    assert _gone(ranks[0]) and _gone(ranks[1])  # the launcher ended both (the stopped one too)


def test_kill_9_of_rank_1_is_one_line_naming_rank_1_and_sigkill(training):
    proc, ranks = training(60)
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=90)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 128 + signal.SIGKILL, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("moesaic train: error (rank 1 of 2): the process was killed by SIGKILL"), err
    assert "Traceback" not in err and "Connection reset" not in err and "gloo" not in err, err
    assert elapsed < 30, f"{elapsed:.1f} s after rank 1 died"
    assert _gone(ranks[0])
