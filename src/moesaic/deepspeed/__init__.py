"""The DeepSpeed bridge: DeepSpeed's API and config read into moesaic's core (see docs/architecture.md)."""

from .moe import MoE
