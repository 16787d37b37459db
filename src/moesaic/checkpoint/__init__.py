"""Per-expert checkpoints: atomic, checksummed, independent of the world size that wrote them."""

from .deepspeed_import import convert_deepspeed_checkpoint
from .store import FORMAT_VERSION, CheckpointError, load, read_manifest, resolve, save

__all__ = ["FORMAT_VERSION", "CheckpointError", "convert_deepspeed_checkpoint", "load", "read_manifest", "resolve",
           "save"]
