"""docs/config-reference.md is generated from the config dataclasses and must not go stale."""

from pathlib import Path

from moesaic import config_reference
from moesaic.train.config import TrainConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"


def test_the_committed_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == config_reference.render(), (
        f"{DOC} is stale; regenerate it with `{config_reference.COMMAND}`")


def test_every_key_is_documented_once_per_variant():
    rows = TrainConfig.describe()
    assert all(r.doc.strip() and r.type for r in rows), [r.path for r in rows if not r.doc.strip()]
    keys = [(r.path, r.variant) for r in rows]
    assert len(keys) == len(set(keys))
    text = config_reference.render()
    for path in ("train.device", "engine.zero_optimization.stage", "engine.optimizer.params.nesterov",
                 "engine.scheduler.params.total_num_steps", "model.ep_size", "data.suffixes"):
        assert f"| `{path}` |" in text


def test_check_mode(tmp_path, capsys):
    stale = tmp_path / "ref.md"
    stale.write_text("old\n")
    assert config_reference.main(["--check", str(stale)]) == 1
    assert "is stale; regenerate it with" in capsys.readouterr().err
    assert config_reference.main(["--out", str(stale)]) == 0
    assert config_reference.main(["--check", str(stale)]) == 0
