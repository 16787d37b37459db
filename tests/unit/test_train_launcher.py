"""The launcher's report (issue 11, item 7): one root cause, shown once; error files torchrun can read too."""

import json
import signal
import time

import pytest

from moesaic.parallel.comm import CollectiveError
from moesaic.train.launcher import WorkerResult, describe_failure, root_cause, write_error_file
from moesaic.train.stop import Aborted, Stopped, StopRequest


def _error(tmp_path, rank, err, user_error):
    path = tmp_path / f"rank{rank}.json"
    try:
        raise err
    except Exception as raised:
        write_error_file(str(path), raised, rank, user_error=user_error)
    return json.loads(path.read_text())


def test_error_file_is_torchruns_format(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    data = _error(tmp_path, 1, ValueError("train.steps differs"), user_error=True)
    assert data["moesaic"]["rank"] == 1 and data["moesaic"]["text"] == "train.steps differs"
    assert data["moesaic"]["user_error"] and not data["moesaic"]["secondary"]
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=2, error_file=str(tmp_path / "rank1.json"))
    assert failure.message["message"] == "ValueError: train.steps differs"  # what torchrun's summary shows
    assert failure.timestamp == int(data["message"]["extraInfo"]["timestamp"])
    assert "Traceback" in data["message"]["extraInfo"]["py_callstack"]


def test_root_cause_is_the_first_error_that_is_not_an_echo(tmp_path):
    echo = _error(tmp_path, 0, CollectiveError("all-to-all failed: connection closed by peer"), True)["moesaic"]
    time.sleep(0.01)
    cause = _error(tmp_path, 1, RuntimeError("boom in rank 1"), False)["moesaic"]
    results = [WorkerResult(0, 2, echo), WorkerResult(1, 1, cause), WorkerResult(2, -9)]
    assert root_cause(results).rank == 1  # the collective failed on rank 0 because rank 1 had died
    # rank 1 killed by the launcher after rank 0 failed: the echo is all there is to show
    assert root_cause([WorkerResult(0, 2, echo), WorkerResult(1, -9, killed_by_launcher=True)]).rank == 0
    # rank 1 killed by someone else (kill -9, the OOM killer): it is the cause, rank 0 only noticed (issue 21, item 6)
    assert root_cause([WorkerResult(0, 2, echo), WorkerResult(1, -9)]).rank == 1
    assert root_cause([WorkerResult(0, 0), WorkerResult(1, -9)]).rank == 1
    assert root_cause([WorkerResult(0, 0), WorkerResult(1, 0)]) is None


def test_failure_messages():
    user = WorkerResult(1, 2, {"text": "--resume: model.n_embd is 64 here", "user_error": True})
    assert describe_failure(user, 2) == "error (rank 1 of 2): --resume: model.n_embd is 64 here"
    bug = WorkerResult(0, 1, {"text": "boom", "type": "RuntimeError", "user_error": False,
                              "traceback": "Traceback (most recent call last):\n  ...\n"})
    assert describe_failure(bug, 1).endswith("error: RuntimeError: boom") and "Traceback" in describe_failure(bug, 1)
    assert "killed by SIGKILL (out of memory?" in describe_failure(WorkerResult(1, -signal.SIGKILL), 2)
    assert describe_failure(WorkerResult(1, 3), 2) == "error (rank 1 of 2): the process exited with code 3"


def test_stop_request_turns_the_first_signal_into_a_flag_and_the_second_into_abort():
    seen = []
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest(on_first=seen.append) as stop:
        assert stop.agree() == (None, False)
        signal.raise_signal(signal.SIGTERM)  # the handler runs: the process is still here
        assert stop.signum == signal.SIGTERM and seen == [signal.SIGTERM]
        assert stop.agree(out_of_time=True) == (signal.SIGTERM, True)
        with pytest.raises(Aborted) as aborted:
            signal.raise_signal(signal.SIGINT)
        assert aborted.value.exit_code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    stopped = Stopped(7, "runs/x/checkpoints/step7", signal.SIGINT, "moesaic train c.toml --out runs/x --resume")
    assert stopped.exit_code == 130
    assert stopped.line() == ("stopped at step 7 (SIGINT), checkpoint runs/x/checkpoints/step7; resume with: "
                              "moesaic train c.toml --out runs/x --resume")
