"""The expert-parallel group registry on one process (no torch.distributed): caching, reset, errors."""

import pytest
import torch.distributed as dist

from moesaic.parallel import GroupRegistry, default_registry, get_expert_parallel_groups, reset_expert_parallel_groups


def test_registry_caches_per_layout_and_resets():
    assert not dist.is_initialized()
    registry = GroupRegistry()
    a = registry.get(1)
    assert registry.get(1) is a and len(registry) == 1
    b = registry.get(1, True)
    assert b is not a and b.data_before_expert and len(registry) == 2
    assert (a.ep_size, a.ep_ranks, a.edp_ranks, a.ep_rank, a.ep_group) == (1, (0,), (0,), 0, None)
    registry.reset()
    assert len(registry) == 0 and registry.get(1) is not a


def test_module_functions_act_on_the_default_registry():
    reset_expert_parallel_groups()
    assert len(default_registry()) == 0
    groups = get_expert_parallel_groups(1)
    assert default_registry().get(1) is groups
    reset_expert_parallel_groups()
    assert len(default_registry()) == 0


def test_registry_errors_name_the_argument():
    registry = GroupRegistry()
    with pytest.raises(RuntimeError, match=r"ep_size=2 needs torch.distributed: call moesaic.init_distributed\(\)"):
        registry.get(2)
    with pytest.raises(ValueError, match="ep_size must be an int >= 1, got 0"):
        registry.get(0)
    with pytest.raises(TypeError, match="use_data_before_expert_parallel_ must be a bool, got int: 1"):
        registry.get(1, 1)
    assert len(registry) == 0
