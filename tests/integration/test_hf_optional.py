"""transformers stays optional: importing moesaic.hf does not import it; calls without it say how to install it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess


def test_importing_the_bridge_does_not_import_transformers():
    code = "import sys, moesaic, moesaic.hf; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_calls_without_transformers_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    import moesaic.hf

    for call in (lambda: moesaic.hf.load("somewhere"), lambda: moesaic.hf.upcycle("somewhere", 4, 2),
                 lambda: moesaic.hf.save(object(), "out")):
        with pytest.raises(ImportError, match=r"pip install 'moesaic\[hf\]'"):
            call()
