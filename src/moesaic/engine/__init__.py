"""The training engine (``moesaic.initialize``, :class:`MoEEngine`) and its config (:class:`EngineConfig`)."""

from .config import EngineConfig, load_config
from .engine import MoEEngine
from .initialize import initialize

__all__ = ["EngineConfig", "MoEEngine", "initialize", "load_config"]
