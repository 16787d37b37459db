"""The README's install commands get the torch the Makefile pins, as the CPU build (issue 21): a bare
``pip install torch`` resolved to a multi-GB CUDA build of whatever torch was newest."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _torch_pin() -> str:
    (pin,) = re.findall(r"^TORCH_PIN := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    return pin


def _inline_commands(text: str):
    """Inline code spans (a span may wrap onto the next line), whitespace normalised."""
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text):
        yield " ".join(span.split())


def test_every_readme_torch_install_is_the_pinned_cpu_build():
    pin = _torch_pin()
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", pin), pin
    readme = (ROOT / "README.md").read_text()
    installs = [c for c in _inline_commands(readme) if "pip install" in c]
    torch_installs = [c for c in installs if re.search(r"pip install (\S+ )*torch\b", c)]
    assert torch_installs, installs
    for command in torch_installs:
        assert f"pip install {pin} --index-url {CPU_INDEX}" in command, command
    assert f"PIP_EXTRA_INDEX_URL={CPU_INDEX} make demo" in readme  # make's own install, pointed at the CPU build
