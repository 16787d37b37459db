"""Process groups and communication for expert parallelism; no nn.Modules here."""

from .comm import CollectiveError, all_to_all
from .groups import (
    ExpertParallelGroups,
    get_expert_parallel_groups,
    init_distributed,
    layout,
    reset_expert_parallel_groups,
)

__all__ = ["CollectiveError", "ExpertParallelGroups", "all_to_all", "get_expert_parallel_groups", "init_distributed",
           "layout", "reset_expert_parallel_groups"]
