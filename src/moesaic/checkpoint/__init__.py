"""Per-expert checkpoints: atomic, checksummed, independent of the world size that wrote them."""

from .store import FORMAT_VERSION, CheckpointError, load, read_manifest, resolve, save

__all__ = ["FORMAT_VERSION", "CheckpointError", "load", "read_manifest", "resolve", "save"]
