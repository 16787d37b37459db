"""The trainer's activation estimate against a forward measured in a fresh process (issue 11, item 10)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moesaic.models import GPTConfig
from moesaic.train import memory

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.subprocess


MEASURE = """
import gc, json, sys, torch
from moesaic.models import GPT, GPTConfig
torch.set_num_threads(1)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
for kw in json.loads(sys.argv[1]):
    cfg = GPTConfig.from_dict(kw)
    model = GPT(cfg).train()
    x = torch.randint(0, 256, (48, cfg.block_size))
    model(x[:1], x[:1])[1].backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = rss()
    logits, loss, aux = model(x, x)
    print(rss() - before)
    del model, logits, loss, aux, x  # the graph (the saved activations) goes with them
    gc.collect()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures RSS through /proc")
def test_activation_estimate_is_within_25_percent_of_a_measured_forward():
    """What a forward adds to a fresh process (the activations autograd keeps) against the estimate: dense + MoE
    (the default) and MoE everywhere, dropless, top-4."""
    shapes = [{}, {"moe_every": 1, "moe": {"num_experts": 8, "k": 4, "drop_tokens": False}}]
    # glibc returns every freed block of 64 KiB or more to the system: RSS follows the live tensors (as in
    # benchmarks/bench_layer.py's memory column), and the second shape does not reuse the first one's heap
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
    res = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(shapes)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    for kw, measured in zip(shapes, map(int, res.stdout.split())):
        estimated = memory.estimate(GPTConfig.from_dict(kw), 48).activations
        assert 0.8 < estimated / measured < 1.25, (kw, estimated, measured)
