"""The workers' heartbeat and the launcher's reading of it (issue 21, item 6): a peer that stops answering is
named, with how long and in which phase; one that died by a signal nobody in the run sent is the cause, not
the peer whose collective then failed."""

import json
import os
import signal
import time

import pytest

from moesaic.parallel.comm import CollectiveError
from moesaic.train import heartbeat
from moesaic.train.heartbeat import Heartbeat, Silence, Watchdog, interval_for, read_beat
from moesaic.train.launcher import WorkerResult, describe_failure, process_stopped, root_cause, write_error_file


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _beat(path, n, phase="step 3"):
    path.write_text(json.dumps({"beat": n, "phase": phase, "pid": 1}))


def test_heartbeat_writes_beats_with_the_phase_from_its_thread(tmp_path):
    path = tmp_path / "rank0.beat"
    hb = Heartbeat(str(path), 0.02).start()
    try:
        first = read_beat(str(path))
        assert first["beat"] == 1 and first["phase"] == "start-up" and first["pid"] == os.getpid()
        hb.set_phase("step 7")
        assert read_beat(str(path))["phase"] == "step 7"  # written at once: the launcher sees where it stopped
        seen = read_beat(str(path))["beat"]
        deadline = time.monotonic() + 10
        while read_beat(str(path))["beat"] <= seen + 2:  # the thread keeps beating on its own
            assert time.monotonic() < deadline, "no beat from the thread"
            time.sleep(0.01)
        assert read_beat(str(path))["phase"] == "step 7"
    finally:
        hb.stop()
    stopped_at = read_beat(str(path))["beat"]
    time.sleep(0.1)
    assert read_beat(str(path))["beat"] == stopped_at  # stop() stops it
    assert path.stat().st_size == 512  # one fixed-size record, rewritten in place


def test_heartbeat_checks_its_arguments_and_environment(tmp_path):
    with pytest.raises(ValueError, match="interval_s"):
        Heartbeat(str(tmp_path / "b"), 0)
    with pytest.raises(TypeError, match="path"):
        Heartbeat("", 1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        interval_for(-1)
    assert interval_for(300) == 1.0 and interval_for(5) == 0.5
    assert heartbeat.start_from_environ({}) is None  # no launcher: nothing runs
    heartbeat.phase("step 1")  # and phase() does nothing
    with pytest.raises(ValueError, match=heartbeat.ENV_INTERVAL):
        heartbeat.start_from_environ({heartbeat.ENV_FILE: str(tmp_path / "b"), heartbeat.ENV_INTERVAL: "soon"})
    assert read_beat(str(tmp_path / "missing")) is None
    (tmp_path / "torn").write_text('{"beat": ')
    assert read_beat(str(tmp_path / "torn")) is None


def test_watchdog_names_the_worker_silent_longer_than_the_timeout_while_another_answers(tmp_path):
    clock = Clock()
    paths = [tmp_path / "rank0.beat", tmp_path / "rank1.beat"]
    dog = Watchdog([str(p) for p in paths], timeout_s=10, clock=clock)
    dog.poll()
    clock.now += 60
    assert dog.silent([True, True]) is None  # nobody has beaten: every worker is still starting
    _beat(paths[0], 1)
    dog.poll()
    for n in range(2, 10):
        clock.now += 2
        _beat(paths[0], n)
        dog.poll()
    assert dog.silent([True, True]) is None  # rank 1 is still importing: it is watched from its first beat on
    assert dog.phase_of(1) == "start-up" and dog.silence(1) == 76.0  # (for the message, when it is found stopped)
    _beat(paths[1], 1, phase="saving checkpoint step4")
    dog.poll()
    assert dog.silent([True, True]) is None
    for n in range(4, 10):  # rank 0 keeps answering; rank 1 is silent from now on
        clock.now += 2
        _beat(paths[0], n)
        dog.poll()
    found = dog.silent([True, True])
    assert found.rank == 1 and found.seconds == 12.0 and found.phase == "saving checkpoint step4"
    assert found.describe() == "stopped answering for 12 s during saving checkpoint step4"
    assert dog.silent([True, False]) is None  # rank 1 has ended: nothing to wait for
    assert dog.silent([False, True]).rank == 1  # rank 0 ended (it gave up waiting): rank 1 is still the cause
    clock.now += 20  # now both are silent (the whole machine stalled): nobody is to blame
    assert dog.silent([True, True]) is None


def test_root_cause_prefers_the_silent_worker_and_the_signal_nobody_sent(tmp_path):
    def error(rank, err):
        path = tmp_path / f"rank{rank}.json"
        try:
            raise err
        except Exception as raised:
            write_error_file(str(path), raised, rank, user_error=isinstance(raised, CollectiveError))
        return json.loads(path.read_text())["moesaic"]

    # what a gloo collective raises when the peer is stopped or gone: an echo, like moesaic's CollectiveError
    timeout = error(0, RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 10000ms "
                                    "for send operation to complete"))
    reset = error(0, RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:3251: "
                                  "Connection reset by peer"))
    assert timeout["secondary"] and reset["secondary"]
    assert not error(0, RuntimeError("boom"))["secondary"]

    stopped = Silence(1, 20.4, "step 12", stopped=True)
    results = [WorkerResult(0, 1, timeout), WorkerResult(1, -signal.SIGKILL, killed_by_launcher=True, silence=stopped)]
    cause = root_cause(results)
    assert cause.rank == 1
    assert describe_failure(cause, 2) == ("error (rank 1 of 2): stopped answering for 20 s during step 12 (the "
                                          "process is stopped: SIGSTOP or a debugger); every process of the "
                                          "run was ended")
    # kill -9 of rank 1: rank 0's collective fails; the launcher names rank 1 and its signal
    died = [WorkerResult(0, 2, reset, ended_at=reset["time"] + 0.1), WorkerResult(1, -signal.SIGKILL,
                                                                              ended_at=reset["time"] - 0.5)]
    cause = root_cause(died)
    assert cause.rank == 1 and "error (rank 1 of 2): the process was killed by SIGKILL" in describe_failure(cause, 2)
    # a bug on rank 0 before rank 1 was killed by the launcher: the bug
    bug = error(0, ValueError("bad"))
    bug["secondary"] = False
    assert root_cause([WorkerResult(0, 2, bug), WorkerResult(1, -9, killed_by_launcher=True)]).rank == 0
    # two primaries: the earlier one (rank 2's crash came first, rank 0's error is later)
    later = dict(bug, time=bug["time"] + 5)
    assert root_cause([WorkerResult(0, 2, later), WorkerResult(1, 0),
                       WorkerResult(2, -signal.SIGSEGV, ended_at=bug["time"])]).rank == 2


def test_process_stopped_reads_the_state_of_a_running_process():
    assert process_stopped(os.getpid()) is False
    assert process_stopped(2 ** 22 + 12345) is False  # no such process: cannot tell
