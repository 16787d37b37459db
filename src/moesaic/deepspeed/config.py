"""DeepSpeed's config (a dict, or a JSON/TOML file) read into the core's :class:`~moesaic.engine.EngineConfig`.

The engine config uses DeepSpeed's names and nesting for what moesaic implements; what DeepSpeed
has beyond that is this bridge's business: refused keys are refused here with the reason and hint
keys are dropped (``initialize`` notes them; :mod:`moesaic.deepspeed.keys`), DeepSpeed-only keys
are checked against the values describing what moesaic does and dropped
(:mod:`moesaic.deepspeed.accepted`), and the rest is the core's :meth:`EngineConfig.from_dict`,
where any other unknown key is an error naming its path.
``moesaic.initialize`` reads its config through :func:`read_config`; ``moesaic train`` reads its
``[engine]`` section through :func:`engine_section` first, so a DeepSpeed JSON config pasted there
gets the same messages.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple, Union

from .._config import load_source
from ..engine.config import EngineConfig
from .accepted import accept_deepspeed_keys
from .keys import refuse_deepspeed_keys, refuse_deepspeed_names

_WHAT = "a dict, a path to a .json/.toml file or an EngineConfig"


def engine_section(data: Any, path: str = "") -> Any:
    """``data`` (DeepSpeed's config mapping at ``path``) as the core reads it: refused keys raise, hints dropped,
    DeepSpeed-only keys checked and dropped."""
    refuse_deepspeed_names(data, path)
    return accept_deepspeed_keys(refuse_deepspeed_keys(data, path), path)


def read_config(config: Union[Mapping[str, Any], str, os.PathLike]) -> Tuple[EngineConfig, Dict[str, Any]]:
    """The checked engine config and the raw mapping it came from (``initialize`` reads which sections were given)."""
    raw = load_source(config, _WHAT)
    cfg = EngineConfig.from_dict(engine_section(raw, EngineConfig.PATH), EngineConfig.PATH)
    cfg.check_complete()
    return cfg, raw


def load_config(config: Union[Mapping[str, Any], str, os.PathLike, EngineConfig]) -> EngineConfig:
    """Load and check a DeepSpeed-style engine config (``moesaic.initialize``'s ``config``).

    Args:
        config: a mapping with DeepSpeed's keys plus ``moe``, a path (str or PathLike) to a ``.json``
            or ``.toml`` file holding one, or an EngineConfig (returned as is).

    Returns:
        The checked :class:`EngineConfig`, complete enough to run.
    """
    if isinstance(config, EngineConfig):
        config.check_complete()
        return config
    return read_config(config)[0]
