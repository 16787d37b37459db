"""The DeepSpeed bridge (``moesaic.deepspeed``) sits above the core: the core never imports it, and
``moesaic.initialize`` is a translation into the core's ``build_engine``, nothing more."""

import ast
from pathlib import Path

import pytest
import torch

import moesaic
from moesaic.deepspeed import load_config
from moesaic.engine import EngineConfig, build_engine
from support.checkpoint_net import CONFIG, Net, train

SRC = Path(moesaic.__file__).parent
CORE = ("parallel", "layer", "optim", "checkpoint", "telemetry", "engine", "models", "hf")


def _imports(path: Path):
    """The modules ``path`` imports, absolute (``moesaic.x.y``), function-local imports included."""
    package = ".".join(("moesaic",) + path.relative_to(SRC).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)


@pytest.mark.parametrize("room", CORE)
def test_no_core_room_imports_the_bridge(room):
    found = [f"{p.relative_to(SRC)} imports {m}" for p in sorted((SRC / room).rglob("*.py"))
             for m in _imports(p) if m == "moesaic.deepspeed" or m.startswith("moesaic.deepspeed.")]
    assert not found, found


def test_imports_of_the_scan_are_resolved():
    """The scan above sees the bridge's own imports of the core (so it would see the reverse)."""
    found = set(_imports(SRC / "deepspeed" / "initialize.py"))
    assert "moesaic.engine.build" in found and "moesaic.deepspeed.keys" in found


def test_initialize_is_build_engine_translated():
    """The same model and config through the bridge and through the core train to the same bits."""
    torch.manual_seed(0)
    ours, *_ = moesaic.initialize(model=Net(), config=CONFIG)
    core = build_engine(Net(), load_config(CONFIG))
    torch.manual_seed(1)
    a = train(ours, 3)
    torch.manual_seed(1)
    b = train(core, 3)
    assert a == b
    for (n, p), (m, q) in zip(ours.module.named_parameters(), core.module.named_parameters()):
        assert n == m and torch.equal(p, q), n


def test_core_config_knows_no_deepspeed_tables():
    """A DeepSpeed key moesaic refuses gets its reason from the bridge; the core reports an unknown key."""
    with pytest.raises(ValueError, match=r"pipeline is a DeepSpeed key that moesaic does not support: moesaic has no "
                                         r"tensor, pipeline or sequence parallelism"):
        load_config({"pipeline": {"stages": 2}})
    with pytest.raises(ValueError, match=r"pipeline"):
        EngineConfig.from_dict({"pipeline": {"stages": 2}})


def test_build_engine_checks_its_arguments():
    cfg = load_config(CONFIG)
    with pytest.raises(TypeError, match=r"config must be an EngineConfig, got dict"):
        build_engine(Net(), CONFIG)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        build_engine("net", cfg)
    with pytest.raises(TypeError, match=r"follow must be None or a callable .*, got int"):
        build_engine(Net(), cfg, follow=3)
    with pytest.raises(ValueError, match=r"telemetry_every must be .*>= 1.*got 0"):
        build_engine(Net(), cfg, telemetry_every=0)


@pytest.mark.parametrize("module, name", [("moesaic.engine", "initialize"), ("moesaic.engine", "load_config"),
                                          ("moesaic.engine", "safe_get_full_grad"),
                                          ("moesaic.checkpoint", "convert_deepspeed_checkpoint")])
def test_a_moved_name_says_where_it_lives(module, name):
    import importlib

    with pytest.raises(AttributeError, match=rf"^{module}\.{name} moved: use moesaic\.deepspeed\.{name}$"):
        getattr(importlib.import_module(module), name)
    assert callable(getattr(moesaic.deepspeed, name))
    with pytest.raises(AttributeError, match=rf"module '{module}' has no attribute 'nothing_here'"):
        getattr(importlib.import_module(module), "nothing_here")
