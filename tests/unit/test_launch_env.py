"""The launcher's environment, read in one place, and the device a `device` setting gives this process."""

import pytest
import torch

from moesaic.parallel.launch import LaunchEnv, backend_for, check_device, resolve_device

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


def test_not_launched_is_one_process():
    env = LaunchEnv.from_environ({"WORLD_SIZE": "8"})  # no RANK: not started by a launcher
    assert env == LaunchEnv() and not env.launched and (env.rank, env.world_size, env.local_rank) == (0, 1, 0)


def test_torchrun_variables():
    env = LaunchEnv.from_environ(TORCHRUN)
    assert env.launched and (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.master_addr == "127.0.0.1" and env.master_port == 29500
    minimal = LaunchEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2"})
    assert minimal.local_rank == 1 and minimal.local_world_size == 2 and minimal.master_port is None


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"environment variable RANK must be an int >= 0, got 'x'"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"environment variable WORLD_SIZE must be an int >= 1, got '0'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"environment variable RANK must be in \[0, WORLD_SIZE - 1 = 1\], got 2"),
    ({"RANK": "0"}, r"RANK is set but WORLD_SIZE is not"),
    ({**TORCHRUN, "MASTER_PORT": "http"}, r"environment variable MASTER_PORT must be an int >= 1, got 'http'"),
])
def test_bad_variables_are_named(environ, message):
    with pytest.raises(ValueError, match=message):
        LaunchEnv.from_environ(environ)


def test_device_setting_spelling():
    for ok in ("auto", "cpu", "cuda", "cuda:3"):
        assert check_device(ok, "train.device") == ok
    with pytest.raises(ValueError, match=r"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got 'gpu'"):
        check_device("gpu", "train.device")
    with pytest.raises(TypeError, match=r"train.device must be a str"):
        check_device(None, "train.device")


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu", local_rank=3)
    with pytest.raises(ValueError, match=r"train.device='cuda' but CUDA is not available on this machine"):
        resolve_device("cuda", key="train.device")
    assert backend_for(torch.device("cpu")) == "gloo"


def test_resolve_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # one GPU per process on a node
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"gives this process \(local rank 2\) GPU 2, but this machine has 2"):
        resolve_device("cuda", local_rank=2)
    assert backend_for(torch.device("cuda", 0)) == "nccl"


def test_error_file_and_round_trip_for_a_launcher():
    """moesaic's launcher writes the variables torchrun writes; a worker reads them back unchanged."""
    env = LaunchEnv(launched=True, rank=1, world_size=2, local_rank=1, local_world_size=2, master_addr="127.0.0.1",
                    master_port=29501, error_file="/tmp/rank1.json")
    assert env.to_environ()["TORCHELASTIC_ERROR_FILE"] == "/tmp/rank1.json"
    assert LaunchEnv.from_environ(env.to_environ()) == env
    assert LaunchEnv.from_environ({"TORCHELASTIC_ERROR_FILE": "/x"}).error_file == "/x"  # not launched, still reads it
    with pytest.raises(ValueError, match="describes a single process"):
        LaunchEnv().to_environ()
    with pytest.raises(ValueError, match="needs master_addr and master_port"):
        LaunchEnv(launched=True, world_size=2).to_environ()
