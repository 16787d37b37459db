"""The DeepSpeed bridge: DeepSpeed's API and config read into moesaic's core (see docs/architecture.md)."""

from .accessors import safe_get_full_fp32_param
from .accessors import safe_get_full_grad
from .accessors import safe_get_full_optimizer_state
from .checkpoint_import import convert_deepspeed_checkpoint
from .config import load_config
from .initialize import initialize
