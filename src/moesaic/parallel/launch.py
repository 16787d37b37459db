"""What the launcher told this process: the one place the torchrun environment is read, and its device.

``torchrun`` (``torch.distributed.run``) starts each process with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment, and
``TORCHELASTIC_ERROR_FILE``: where a failing process writes its error (JSON) for the launcher to
report once. :meth:`LaunchEnv.from_environ` reads them once, checks them, and is passed on from
there; a process started without them is a single process (rank 0 of 1).
:meth:`LaunchEnv.to_environ` writes the same variables for a process that a launcher starts
(``moesaic train --nproc N`` starts its processes itself, as torchrun would). :func:`resolve_device` turns a
``device`` setting (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``) into this process's device,
and :func:`backend_for` names the collective backend that device needs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch

DEVICE_FORM = "'auto', 'cpu', 'cuda' or 'cuda:<index>'"
ERROR_FILE_VAR = "TORCHELASTIC_ERROR_FILE"  # torchrun's name: the launcher reads the error a process wrote


def _env_int(environ: Mapping[str, str], name: str, default: Optional[int], lo: int) -> Optional[int]:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int >= {lo}, got {raw!r}") from None
    if value < lo:
        raise ValueError(f"environment variable {name} must be an int >= {lo}, got {raw!r}")
    return value


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the launch, as torchrun's environment variables give it.

    Attributes:
        launched: True when a launcher set ``RANK`` (this process is one rank of a torchrun job).
        rank, world_size: global rank and number of processes (0 and 1 when not launched).
        local_rank, local_world_size: the same on this node.
        master_addr, master_port: the rendezvous address (None when not launched).
        error_file: where this process reports an error that ends it, for its launcher
            (``TORCHELASTIC_ERROR_FILE``, torchrun's protocol); None: report on stderr.
    """

    launched: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    error_file: Optional[str] = None

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "LaunchEnv":
        """Read and check the launcher's variables.

        Args:
            environ: the environment (default: ``os.environ``).

        Raises:
            ValueError: a variable that is not a valid int, a rank outside ``[0, WORLD_SIZE)``, or a
                launched process missing ``WORLD_SIZE``.
        """
        environ = os.environ if environ is None else environ
        error_file = environ.get(ERROR_FILE_VAR) or None
        if "RANK" not in environ:
            return cls(error_file=error_file)
        rank = _env_int(environ, "RANK", None, 0)
        world = _env_int(environ, "WORLD_SIZE", None, 1)
        if world is None:
            raise ValueError("environment variable RANK is set but WORLD_SIZE is not; start the processes with "
                             "torchrun (or set both)")
        if rank >= world:
            raise ValueError(f"environment variable RANK must be in [0, WORLD_SIZE - 1 = {world - 1}], got {rank}")
        local_world = _env_int(environ, "LOCAL_WORLD_SIZE", world, 1)
        local_rank = _env_int(environ, "LOCAL_RANK", rank % local_world, 0)
        return cls(launched=True, rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=environ.get("MASTER_ADDR"), master_port=_env_int(environ, "MASTER_PORT", None, 1),
                   error_file=error_file)

    def to_environ(self) -> Dict[str, str]:
        """The variables a launcher sets for this process (what :meth:`from_environ` reads back)."""
        if not self.launched:
            raise ValueError("to_environ: this LaunchEnv describes a single process that no launcher started "
                             "(launched=False)")
        if self.master_addr is None or self.master_port is None:
            raise ValueError(f"to_environ needs master_addr and master_port, got {self.master_addr!r}, "
                             f"{self.master_port!r}")
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
               "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
               "MASTER_PORT": str(self.master_port)}
        if self.error_file is not None:
            out[ERROR_FILE_VAR] = self.error_file
        return out


def check_device(value: object, key: str) -> str:
    """Check a ``device`` setting's spelling (not whether the machine has it): one of :data:`DEVICE_FORM`."""
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a str, {DEVICE_FORM}, got {type(value).__name__}: {value!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"{key} must be {DEVICE_FORM}, got {value!r}")
    return value


def resolve_device(setting: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """This process's device for a ``device`` setting.

    Args:
        setting: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` (GPU ``local_rank``:
            one GPU per process on a node) or ``"cuda:<index>"``.
        local_rank: this process's rank on its node.
        key: the setting's key path, for messages.

    Raises:
        ValueError: CUDA asked for on a machine without it, or an index it does not have.
    """
    check_device(setting, key)
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{key}={setting!r} but CUDA is not available on this machine; use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    index = int(setting.split(":")[1]) if ":" in setting else local_rank
    if index >= count:
        raise ValueError(f"{key}={setting!r} gives this process (local rank {local_rank}) GPU {index}, but this "
                         f"machine has {count}; use at most {count} processes per node or 'cpu'")
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on ``device``: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
