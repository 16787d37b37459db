"""Process groups and communication for expert parallelism; no nn.Modules here."""

from .comm import CollectiveError, all_to_all
from .groups import (
    ExpertParallelGroups,
    GroupRegistry,
    default_registry,
    get_expert_parallel_groups,
    layout,
    reset_expert_parallel_groups,
)
from .process_group import init_distributed

__all__ = ["CollectiveError", "ExpertParallelGroups", "GroupRegistry", "all_to_all", "default_registry",
           "get_expert_parallel_groups", "init_distributed", "layout", "reset_expert_parallel_groups"]
