"""examples/fsdp_ep.py runs under torchrun: EP 2 + FSDP2, stacked experts, accumulation, finite losses."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_example_trains_under_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           str(ROOT / "examples" / "fsdp_ep.py"), "--ep-size", "2", "--stacked", "--accumulate", "2", "--steps", "2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2, out.stdout
    for line in steps:
        assert math.isfinite(float(line.split()[3])), line
