"""Experts: one deep copy of the user's expert module per local expert, each parameter tagged.

:class:`ExpertContainer` is what an MoE layer's ``experts`` must be: it computes one output per
piece of tokens, knows the global numbers of its experts, and answers for each of them with its
tensors by their names inside the expert (``expert_state_dict`` / ``load_expert_state_dict``), the
interface :class:`~moesaic.layer.identity.ExpertIndex` and the checkpoint store use. Two
containers implement it: :class:`Experts` (here: per-module experts) and
:class:`~moesaic.layer.stacked.StackedExperts` (``[E_local, ...]`` tensors).

The copies live in ``deepspeed_experts`` (DeepSpeed's attribute name, so ``state_dict`` keys
read ``deepspeed_experts.<i>.*`` as in DeepSpeed). ``Experts`` only computes: it receives one
piece of tokens per local expert from a dispatcher and returns one output per piece.

Every parameter of expert ``i`` on expert-parallel rank ``r`` is tagged (see
:mod:`moesaic.layer.identity`) with the layer's ``expert_group_name`` and the global expert number
``r * num_local_experts + i``: the identity that optimizer groups, telemetry and checkpoints are
built on. The tags are written again whenever the container is unpickled or deep-copied (torch
drops attributes of parameters on ``deepcopy``), so identity survives both.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from typing import Dict, Iterator, List, Optional, Sequence

from torch import Tensor, nn

from .._checks import check_int
from .identity import ExpertKey, tag_expert_param


class ExpertContainer(nn.Module):
    """The local experts of one MoE layer, whatever their storage (see module docstring).

    Subclasses set ``num_local_experts``, ``expert_group_name`` and ``ep_rank`` and implement
    :meth:`tag`, :meth:`expert_state_dict`, :meth:`load_expert_state_dict` and ``forward(pieces)``.
    """

    num_local_experts: int
    expert_group_name: str
    ep_rank: int

    @abstractmethod
    def tag(self, expert_group_name: str, ep_rank: int) -> None:
        """(Re)stamp every parameter with the layer name and the global expert numbers."""

    def _set_identity(self, expert_group_name: str, ep_rank: int) -> None:
        """Check and record the layer name and this rank's place, for :meth:`tag`."""
        if not isinstance(expert_group_name, str) or not expert_group_name:
            raise ValueError(f"expert_group_name must be a non-empty str, got {expert_group_name!r}")
        check_int(ep_rank, "ep_rank", 0)
        self.expert_group_name = expert_group_name
        self.ep_rank = ep_rank

    @abstractmethod
    def expert_state_dict(self, number: int, keep_vars: bool = False) -> Dict[str, Tensor]:
        """Tensors of global expert ``number`` by their names inside the expert."""

    @abstractmethod
    def load_expert_state_dict(self, number: int, tensors: Dict[str, Tensor]) -> None:
        """Copy ``tensors`` (as :meth:`expert_state_dict` returns them) into global expert ``number``."""

    def expert_grads(self, number: int) -> Dict[str, Optional[Tensor]]:
        """Gradients of global expert ``number``'s parameters, by their names inside it (None: no gradient).

        The default reads ``.grad`` of what :meth:`expert_state_dict` returns with ``keep_vars``
        (right for containers whose experts' tensors are parameters, not views).
        """
        return {name: t.grad for name, t in self.expert_state_dict(number, keep_vars=True).items()
                if isinstance(t, nn.Parameter)}

    @property
    def first_expert_number(self) -> int:
        """Global number of local expert 0."""
        return self.ep_rank * self.num_local_experts

    @property
    def local_numbers(self) -> List[int]:
        """Global numbers of the local experts, in local order."""
        return [self.first_expert_number + i for i in range(self.num_local_experts)]

    def _local_index(self, number: int) -> int:
        i = number - self.first_expert_number
        if not 0 <= i < self.num_local_experts:
            raise KeyError(f"expert {number} of layer {self.expert_group_name!r} is not held here (local experts: "
                           f"{self.local_numbers})")
        return i

    def __len__(self) -> int:
        return self.num_local_experts

    def __setstate__(self, state) -> None:
        # pickling keeps parameter attributes but deepcopy does not: stamp them again either way
        super().__setstate__(state)
        self.tag(self.expert_group_name, self.ep_rank)


class Experts(ExpertContainer):
    """The local experts of one MoE layer, one module each.

    Args:
        expert: the module to replicate; it maps `(T, D)` tokens to `(T, D)` outputs (a tuple
            output keeps its first element, as DeepSpeed does).
        num_local_experts: copies held by this rank.
        expert_group_name: the layer's name, stamped on every parameter.
        ep_rank: this rank's index in its expert-parallel group (sets the global numbers).
    """

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: str = "ep_size_1",
                 ep_rank: int = 0) -> None:
        super().__init__()
        if not isinstance(expert, nn.Module):
            raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
        check_int(num_local_experts, "num_local_experts", 1)
        if not any(True for _ in expert.parameters()):
            raise ValueError("expert has no parameters; an MoE expert must own at least one parameter")
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        self.expert_group_name = expert_group_name
        self.ep_rank = 0
        self.tag(expert_group_name, ep_rank)

    def tag(self, expert_group_name: str, ep_rank: int) -> None:
        """(Re)stamp every parameter with the layer name and its global expert number."""
        self._set_identity(expert_group_name, ep_rank)
        for i, expert in enumerate(self.deepspeed_experts):
            key = ExpertKey(expert_group_name, ep_rank * self.num_local_experts + i)
            for name, param in expert.named_parameters():
                tag_expert_param(param, key, name)

    def _local(self, number: int) -> nn.Module:
        return self.deepspeed_experts[self._local_index(number)]

    def expert_state_dict(self, number: int, keep_vars: bool = False) -> Dict[str, Tensor]:
        """Tensors (parameters and buffers) of global expert ``number``, by their names inside it."""
        return self._local(number).state_dict(keep_vars=keep_vars)

    def load_expert_state_dict(self, number: int, tensors: Dict[str, Tensor]) -> None:
        """Copy ``tensors`` (as :meth:`expert_state_dict` returns them) into global expert ``number``."""
        self._local(number).load_state_dict(tensors, strict=True)

    def __getitem__(self, i: int) -> nn.Module:
        return self.deepspeed_experts[i]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.deepspeed_experts)

    def forward(self, xs: Sequence[Tensor]) -> List[Tensor]:
        """Run local expert ``i`` on its piece ``xs[i]`` of tokens.

        Args:
            xs: one `(N_i, D)` piece per local expert, in local-expert order (a single `(N, D)`
                tensor is not accepted: split it, so the caller decides the pieces).

        Returns:
            one `(N_i, D)` output per local expert, in order (not concatenated: the combine
            reads the pieces directly, which saves an `(N, D)` copy).
        """
        if isinstance(xs, Tensor) or len(xs) != self.num_local_experts:
            got = "a Tensor" if isinstance(xs, Tensor) else f"{len(xs)} pieces"
            raise ValueError(f"Experts expects one piece per local expert ({self.num_local_experts}), got {got}")
        outputs: List[Tensor] = []
        for expert, chunk in zip(self.deepspeed_experts, xs):
            # an expert with no tokens still runs (on 0 rows) so its parameters get zero grads,
            # not None, exactly as with DeepSpeed's padded buffers
            out = expert(chunk)
            if isinstance(out, tuple):
                out = out[0]  # DeepSpeed convention: ignore a returned bias
            outputs.append(out)
        return outputs
