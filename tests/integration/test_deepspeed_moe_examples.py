"""DeepSpeed's own MoE examples run on moesaic after the two-line port, with their configs as shipped.

``tests/support/ds_moe_example.py`` is DeepSpeedExamples' cifar script in MoE mode (argparse with
``--deepspeed --deepspeed_config``, MoE layers from a list of expert counts, ``--moe-param-group``,
``initialize(args=..., model_parameters=..., training_data=...)``). It runs under torchrun with 2
processes and ``--ep-world-size 2`` on:

* ``cifar_moe.json``: DeepSpeedExamples' ``training/cifar/ds_config.json`` (Adam, WarmupLR, bf16,
  ZeRO 0 with ``overlap_comm: true``, bucket sizes, ``contiguous_gradients``, ``cpu_offload: false``)
  minus the five fp16-style keys of its ``bf16`` section that DeepSpeed 0.19.8 itself rejects;
* ``megatron_gpt_moe.json``: Megatron-DeepSpeed's ``examples_deepspeed/MoE/ds_config_gpt_TEMPLATE.json``
  as its MoE scripts fill it (ZeRO 1 with ``elastic_checkpoint``, bf16, ``wall_clock_breakdown``,
  ``flops_profiler`` at step 5), batch sizes scaled to the test, minus its ``curriculum_learning``
  section (off), a legacy top-level key DeepSpeed 0.19.8 itself rejects (moesaic accepts it disabled).

tests/reference/test_example_configs.py checks that DeepSpeed 0.19.8 accepts both files.
"""

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ROOT / "tests" / "support"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(config: str, steps: int) -> str:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(SUPPORT / "ds_moe_example.py"), "--deepspeed", "--deepspeed_config",
           str(SUPPORT / "ds_configs" / config),
           "--moe", "--ep-world-size", "2", "--num-experts", "2", "4", "--top-k", "1", "--noisy-gate-policy", "RSample",
           "--moe-param-group", "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    losses = re.findall(r"rank (\d) first loss ([-\d.naif]+) last loss ([-\d.naif]+)", out)
    assert sorted(r for r, _, _ in losses) == ["0", "1"], out[-4000:]
    assert all(math.isfinite(float(a)) and math.isfinite(float(b)) for _, a, b in losses)
    return out


def test_cifar_moe_config_with_overlap_comm():
    out = _run("cifar_moe.json", steps=6)
    assert "overlap_comm active: True" in out


def test_megatron_moe_template_with_flops_profiler():
    out = _run("megatron_gpt_moe.json", steps=10)
    assert "Profile Summary at step 5:" in out
    assert re.search(r"expert 0: \d+ tokens received", out)
    assert "rank=0 time (ms) | forward:" in out  # wall_clock_breakdown with steps_per_print 10
    assert re.search(r"flops per token: [1-9]", out)
