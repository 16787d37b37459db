"""The DeepSpeed example configs the port test runs (tests/support/ds_configs) are ones DeepSpeed 0.19.8 accepts.

They are the shipped files minus the keys DeepSpeed itself rejects; this pins both halves: DeepSpeed
parses each file as written, and rejects the removed keys (the cifar ``bf16`` section's fp16-style
keys, Megatron-DeepSpeed's legacy top-level ``curriculum_learning``).
"""

import json
from pathlib import Path

import pytest

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed not installed (make parity builds .venv-deepspeed)")
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402

from moesaic.deepspeed import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "support" / "ds_configs"


@pytest.mark.parametrize("name", ["cifar_moe.json", "megatron_gpt_moe.json"])
def test_deepspeed_and_moesaic_accept_the_example_configs(name):
    path = CONFIGS / name
    ds = DeepSpeedConfig(str(path))
    ours = load_config(str(path))
    assert ours.zero_optimization.stage == ds.zero_config.stage
    assert bool(ours.zero_optimization.overlap_comm) == bool(ds.zero_config.overlap_comm)
    assert ours.flops_profiler.enabled == ds.flops_profiler_config.enabled
    assert ours.bf16.enabled == ds.bfloat16_config.enabled


@pytest.mark.parametrize("name, section, key, value, pattern", [
    *[("cifar_moe.json", "bf16", k, v, rf"{k}\s+Extra inputs are not permitted")
      for k, v in (("loss_scale", 0), ("loss_scale_window", 500), ("hysteresis", 2), ("min_loss_scale", 1),
                   ("initial_scale_power", 15))],
    ("megatron_gpt_moe.json", "", "curriculum_learning", {"enabled": False, "curriculum_type": "seqlen"},
     r"Legacy top-level 'curriculum_learning' has been removed"),
])
def test_deepspeed_rejects_the_removed_keys(name, section, key, value, pattern, tmp_path):
    data = json.loads((CONFIGS / name).read_text())
    (data[section] if section else data)[key] = value
    path = tmp_path / name
    path.write_text(json.dumps(data))
    with pytest.raises(Exception, match=pattern):
        DeepSpeedConfig(str(path))
    if section:  # moesaic refuses them too, naming the key
        with pytest.raises(ValueError, match=rf"unknown key 'bf16\.{key}'"):
            load_config(data)
