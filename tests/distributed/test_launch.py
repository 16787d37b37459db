"""The documented launch paths: two torchrun launchers as two nodes (torchrun on one machine is the README's
own command: tests/unit/test_readme.py runs it and checks its output)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples" / "ep_check.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_two_nodes_simulated_with_c10d_rendezvous():
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = _torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                    "--rdzv-id", "moesaic-test", SCRIPT, "--dropless")
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=150)
            outputs.append(stdout)
            assert node.returncode == 0, stderr[-3000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    joined = "".join(outputs)
    for rank in (0, 1):
        assert f"rank {rank}/2 (gloo): expert parallelism matches data parallelism" in joined


EXIT_SCRIPT = '''
import atexit
import torch
import torch.distributed as dist
import moesaic

# registered before init_distributed, so it runs after moesaic's own exit handler (atexit is LIFO)
atexit.register(lambda: print(f"rank {RANK} process group alive at exit: {dist.is_initialized()}", flush=True))
RANK, _ = moesaic.init_distributed()
t = torch.ones(3)
work = dist.all_reduce(t, async_op=True)  # gloo work objects, as a script's last steps leave them
work.wait()
'''


def test_gloo_group_destroyed_at_exit_without_the_script_asking(tmp_path):
    """A script that never calls destroy_process_group (DeepSpeed's examples) must not leave gloo to
    interpreter finalization, where it sometimes aborts (SIGABRT) after the last line ran."""
    script = tmp_path / "no_destroy.py"
    script.write_text(EXIT_SCRIPT)
    cmd = _torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} process group alive at exit: False" in done.stdout, done.stdout + done.stderr[-2000:]
