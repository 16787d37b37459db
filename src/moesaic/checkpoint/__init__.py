"""Per-expert checkpoints: crash-safe, verified, pickle-free, independent of the world size that wrote them.

See ``docs/checkpoints.md`` for the layout, what is verified and the publication protocol.
"""

from .._checks import moved_names
from .directory import find, resolve
from .errors import CheckpointError
from .manifest import FORMAT_VERSION
from .staging import StagedLoad
from .store import load, prepare, read_manifest, save, verify, writes_optimizer_entry

__all__ = ["FORMAT_VERSION", "CheckpointError", "StagedLoad", "find", "load", "prepare",
           "read_manifest", "resolve", "save", "verify", "writes_optimizer_entry"]

# names that moved to the DeepSpeed bridge say where they live now
__getattr__ = moved_names(__name__, {name: f"moesaic.deepspeed.{name}" for name in (
    "convert_deepspeed_checkpoint",)})
