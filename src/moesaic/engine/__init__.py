"""The training engine (``moesaic.initialize``, :class:`MoEEngine`) and its config (:class:`EngineConfig`)."""

from .config import EngineConfig, load_config
from .engine import MoEEngine
from ..deepspeed.initialize import initialize
from ..deepspeed.accessors import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state

__all__ = ["EngineConfig", "MoEEngine", "initialize", "load_config", "safe_get_full_fp32_param", "safe_get_full_grad",
           "safe_get_full_optimizer_state"]
