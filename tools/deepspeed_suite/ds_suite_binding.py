"""Run DeepSpeed's own MoE unit tests on DeepSpeed or on moesaic, on a CPU without fp16 kernels.

``install(target)`` applies, in the process that calls it:

* the **bf16 switch** (both targets): this CPU has no fp16 kernels, so every fp16 request of
  the tests becomes bf16. The accelerator reports fp16 as supported (so the tests' "fp16 is not
  supported" guards do not skip them); ``unit.common.preferred_dtype()`` answers bf16; functions
  of ``unit.simple_model`` and ``unit.checkpoint.common`` given ``dtype=torch.float16`` get
  ``torch.bfloat16``; and ``deepspeed.initialize`` sees ``"bf16": {"enabled": true}`` wherever
  the config said ``"fp16": {"enabled": true, ...}`` (the fp16-only loss-scale keys have no bf16
  meaning and are dropped).
* the **two bindings** (target ``moesaic`` only): ``deepspeed.moe.layer.MoE`` and the helpers
  of ``deepspeed.moe.utils`` become moesaic's, and ``deepspeed.initialize`` becomes
  ``moesaic.initialize``. Nothing else of DeepSpeed is replaced: the tests still use
  ``deepspeed.comm``, ``deepspeed.utils.safe_get_full_grad``, the accelerator and DeepSpeed's
  own gating functions.

Test bodies stay byte-for-byte DeepSpeed's.
"""

from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import sys
import tempfile

TARGETS = ("deepspeed", "moesaic")
_MOE_UTILS = ("split_params_into_different_moe_groups_for_optimizer", "is_moe_param", "is_moe_param_group",
              "split_params_into_shared_and_expert_params", "split_params_grads_into_shared_and_expert_params",
              "has_moe_layers", "configure_moe_param_groups")


# --- the bf16 switch --------------------------------------------------------------------------

def fp16_to_bf16(config):
    """A copy of a DeepSpeed config dict with an enabled ``fp16`` section turned into ``bf16``."""
    if not isinstance(config, dict):
        return config
    fp16 = config.get("fp16")
    if not (isinstance(fp16, dict) and fp16.get("enabled")):
        return config
    out = copy.deepcopy(config)
    del out["fp16"]
    out["bf16"] = {"enabled": True}
    return out


def _switch_args(args):
    """``args.deepspeed_config`` (a JSON file) rewritten the same way, into a new file."""
    path = getattr(args, "deepspeed_config", None)
    if not isinstance(path, str) or not os.path.isfile(path):
        return args
    with open(path) as f:
        config = json.load(f)
    new = fp16_to_bf16(config)
    if new is config:
        return args
    fd, new_path = tempfile.mkstemp(suffix=".json", prefix="ds_suite_bf16_")
    with os.fdopen(fd, "w") as f:
        json.dump(new, f)
    args = copy.copy(args)
    args.deepspeed_config = new_path
    return args


def _with_bf16_config(initialize):
    @functools.wraps(initialize)
    def wrapper(*args, **kwargs):
        for key in ("config", "config_params"):
            if key in kwargs:
                kwargs[key] = fp16_to_bf16(kwargs[key])
        if kwargs.get("args") is not None:
            kwargs["args"] = _switch_args(kwargs["args"])
        elif args:
            args = (_switch_args(args[0]),) + tuple(args[1:])
        return initialize(*args, **kwargs)

    wrapper.__wrapped_by_ds_suite__ = True
    return wrapper


def _bf16_instead_of_fp16(fn):
    import torch

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("dtype") is torch.float16:
            kwargs["dtype"] = torch.bfloat16
        return fn(*args, **kwargs)

    return wrapper


def _patch_unit_module(module):
    """Post-import patch of the test helpers (see module docstring)."""
    import torch

    name = module.__name__
    if name == "unit.common":
        module.preferred_dtype = lambda: torch.bfloat16
        return
    for attr, value in list(vars(module).items()):
        if (inspect.isfunction(value) and value.__module__ == name
                and "dtype" in inspect.signature(value).parameters):
            setattr(module, attr, _bf16_instead_of_fp16(value))


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs ``_patch_unit_module`` right after the named test-helper modules are executed."""

    NAMES = ("unit.common", "unit.simple_model", "unit.checkpoint.common")

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.NAMES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch_unit_module(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _install_bf16_switch():
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = type(get_accelerator())
    accel.is_fp16_supported = lambda self: True
    base_dtypes = accel.supported_dtypes

    def supported_dtypes(self):
        dtypes = list(base_dtypes(self))
        return dtypes if torch.float16 in dtypes else dtypes + [torch.float16]

    accel.supported_dtypes = supported_dtypes
    sys.meta_path.insert(0, _PostImportHook())


# --- the bindings -----------------------------------------------------------------------------

def _bind_moesaic():
    import deepspeed
    import deepspeed.moe.layer
    import deepspeed.moe.utils
    import moesaic
    from moesaic.optim import param_groups

    deepspeed.moe.layer.MoE = moesaic.MoE
    for name in _MOE_UTILS:
        setattr(deepspeed.moe.utils, name, getattr(param_groups, name))
    deepspeed.initialize = moesaic.initialize


def install(target: str) -> None:
    """Apply the bf16 switch, and for ``target == "moesaic"`` the two bindings."""
    if target not in TARGETS:
        raise ValueError(f"MOESAIC_DS_SUITE must be one of {TARGETS}, got {target!r}")
    import deepspeed

    _install_bf16_switch()
    if target == "moesaic":
        _bind_moesaic()
    deepspeed.initialize = _with_bf16_config(deepspeed.initialize)
