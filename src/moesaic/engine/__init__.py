"""The training engine (:class:`MoEEngine`, built by :func:`build_engine`) and its config (:class:`EngineConfig`).

DeepSpeed's entry to it (``moesaic.initialize``, its config dict, ``safe_get_full_*``) is the bridge
:mod:`moesaic.deepspeed`.
"""

from .config import EngineConfig
from .engine import MoEEngine
from .build import GroupFollower, build_engine

__all__ = ["EngineConfig", "GroupFollower", "MoEEngine", "build_engine"]
