"""`moesaic train` with DeepSpeed-only keys under [engine], and the resume of a run written before they left the
core engine config (its run.json, manifest and engine.json hold every one of them at its value)."""

import json
import zlib
from pathlib import Path

from moesaic import checkpoint
from moesaic.checkpoint.files import encode_json
from moesaic.checkpoint.manifest import seal
from test_train_cli import corpus, train  # noqa: F401 (corpus: the fixture of a small corpus)

ROOT = Path(__file__).resolve().parents[2]
# DeepSpeed's keys that the bridge accepts under [engine], as a DeepSpeed config pasted there writes them
DEEPSPEED_KEYS = ["--set", "engine.prescale_gradients=false", "--set", "engine.communication_data_type='fp32'",
                  "--set", "engine.activation_checkpointing.partition_activations=false",
                  "--set", "engine.zero_optimization.contiguous_gradients=true",
                  "--set", "engine.bf16.check_grad_overflow=true"]
# the engine config as the code before the move wrote it into engine.json (every key, the moved ones included)
OLD_ENGINE = json.loads((ROOT / "tests" / "unit" / "data" / "checkpoint_v2_deepspeed_nesting" / "step3" /
                         "engine.json").read_text())["config"]


def _as_before_the_move(out: Path) -> None:
    """Rewrite the run folder's recorded engine config as the former code wrote it (DeepSpeed-only keys in it)."""
    run = json.loads((out / "run.json").read_text())
    run["config"]["engine"] = OLD_ENGINE
    (out / "run.json").write_text(json.dumps(run, indent=1))
    folder = checkpoint.resolve(out / "checkpoints")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("manifest_crc32")
    manifest["model_config"]["engine"] = OLD_ENGINE
    state = json.loads((folder / "engine.json").read_text())
    state["config"] = OLD_ENGINE
    data = encode_json(state)
    (folder / "engine.json").write_bytes(data)
    manifest["files"]["engine.json"] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (folder / "manifest.json").write_bytes(seal(manifest))


def test_deepspeed_keys_under_engine_train_and_a_run_written_before_the_move_resumes(tmp_path, corpus):
    out = tmp_path / "run"
    assert train(out, corpus, *DEEPSPEED_KEYS, "--set", "train.steps=2") == 0
    saved = json.loads((out / "run.json").read_text())["config"]["engine"]
    assert "prescale_gradients" not in saved and "activation_checkpointing" not in saved  # the core holds none
    _as_before_the_move(out)
    assert train(out, corpus, *DEEPSPEED_KEYS, "--set", "train.steps=3", "--resume") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
