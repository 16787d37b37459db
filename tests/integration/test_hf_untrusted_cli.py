"""``moesaic train --hf`` on a folder whose config asks to run its own code, with stdin closed.

transformers would print "Do you wish to run the custom code? [y/N]" and read stdin; moesaic
refuses before that, naming the ``auto_map``, and never imports the folder's files (they would
write a marker). The in-process cases (a "y" on stdin, supported and unsupported model types,
tokenizers) are in tests/unit/test_hf_untrusted.py.
"""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from support.hf_models import build  # noqa: E402

pytestmark = pytest.mark.subprocess


def test_train_hf_on_a_folder_asking_for_custom_code_refuses_without_a_prompt(tmp_path):
    folder = build("mixtral", tmp_path / "m")
    marker = tmp_path / "code-ran"
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evil_moe", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    proc = subprocess.run([sys.executable, "-m", "moesaic", "train", "--hf", str(folder), "--out",
                           str(tmp_path / "out")], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert "unsupported architecture: config.model_type='evil_moe'" in proc.stderr
    assert "its auto_map asks to run the folder's own code" in proc.stderr and "trust_remote_code=False" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
