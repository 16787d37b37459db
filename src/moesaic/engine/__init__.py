"""The training engine (:class:`MoEEngine`, built by :func:`build_engine`) and its config (:class:`EngineConfig`).

DeepSpeed's entry to it (``moesaic.initialize``, its config dict, ``safe_get_full_*``) is the bridge
:mod:`moesaic.deepspeed`.
"""

from .._checks import moved_names
from .config import EngineConfig
from .engine import MoEEngine
from .build import GroupFollower, build_engine

__all__ = ["EngineConfig", "GroupFollower", "MoEEngine", "build_engine"]

# names that moved to the DeepSpeed bridge say where they live now
__getattr__ = moved_names(__name__, {name: f"moesaic.deepspeed.{name}" for name in (
    "initialize", "load_config", "safe_get_full_fp32_param", "safe_get_full_grad", "safe_get_full_optimizer_state")})
