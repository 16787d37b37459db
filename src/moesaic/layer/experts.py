"""Experts: one deep copy of the user's expert module per local expert, each parameter tagged.

:class:`ExpertContainer` is what an MoE layer's ``experts`` must be: it computes one output per
piece of tokens, knows the global numbers of its experts, and answers for each of them with its
tensors by their names inside the expert (``expert_state_dict`` / ``load_expert_state_dict``), the
interface :class:`~moesaic.layer.identity.ExpertIndex` and the checkpoint store use. Two
containers implement it: :class:`Experts` (here: per-module experts) and
:class:`~moesaic.layer.stacked.StackedExperts` (``[E_local, ...]`` tensors).

The copies live in the ``nn.ModuleList`` named by the class's ``EXPERT_LIST`` (``local_experts``,
so ``state_dict`` keys read ``local_experts.<i>.*``; the DeepSpeed bridge's container names it
``deepspeed_experts`` as DeepSpeed does). ``Experts`` only computes: it receives one piece of
tokens per local expert from a dispatcher and returns one output per piece.

Every parameter of expert ``i`` on expert-parallel rank ``r`` is tagged (see
:mod:`moesaic.layer.identity`) with the layer's ``expert_group_name`` and the global expert number
``r * num_local_experts + i``: the identity that optimizer groups, telemetry and checkpoints are
built on. The tags are written again whenever the container is unpickled or deep-copied (torch
drops attributes of parameters on ``deepcopy``), so identity survives both.

An expert maps `(T, D)` tokens to `(T, D)`. :func:`check_expert_width` reads the widths an expert
takes and gives from its structure where that says them (an ``nn.Linear``, moesaic's FFN/GLU
experts, an ``nn.Sequential`` of those with activations, norms and dropout between), so a wrong
width is refused when the layer is built; for any other module the first Linear an expert runs is
checked at the first forward, and the output width at every forward.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_int
from .ffn import FFNExpert, GLUExpert
from .identity import ExpertKey, tag_expert_param


# modules that keep the width of what passes through them (skipped when reading a Sequential's ends)
_WIDTH_KEEPING = (nn.Identity, nn.Dropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU,
                  nn.ELU, nn.Softplus)


def expert_width(module: nn.Module, end: str, path: str = "") -> Optional[Tuple[int, str]]:
    """The width ``module`` takes (``end="in"``) or gives (``end="out"``) and the submodule that fixes it,
    where its structure says so; None where only running it would tell."""
    if isinstance(module, nn.Linear):
        attr = "in_features" if end == "in" else "out_features"
        return getattr(module, attr), (f"{attr} of its Linear {path!r}" if path else f"its {attr}")
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0], (f"its LayerNorm {path!r}" if path else "its normalized_shape")
    named = {GLUExpert: ("gate_proj", "down_proj"), FFNExpert: ("fc1", "fc2")}.get(type(module))
    if named is not None:
        name = named[0] if end == "in" else named[1]
        return expert_width(getattr(module, name), end, f"{path}.{name}" if path else name)
    if type(module) is nn.Sequential:
        children = list(module.named_children())
        for name, child in (children if end == "in" else reversed(children)):
            if not isinstance(child, _WIDTH_KEEPING):
                return expert_width(child, end, f"{path}.{name}" if path else name)
    return None


def check_expert_width(module: nn.Module, hidden_size: int, what: str, layer: str) -> None:
    """Refuse an expert (or shared expert) that does not take and give ``hidden_size`` wide tokens,
    as far as its structure says (see module docstring)."""
    for end, verb in (("in", "takes inputs"), ("out", "gives outputs")):
        found = expert_width(module, end)
        if found is not None and found[0] != hidden_size:
            raise ValueError(f"MoE layer {layer!r}: the {what} ({type(module).__name__}) {verb} of width {found[0]} "
                             f"({found[1]}), but the layer's hidden_size is {hidden_size}; an expert maps "
                             f"(tokens, hidden_size) to (tokens, hidden_size)")


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

    The copies are the ``nn.ModuleList`` called ``EXPERT_LIST`` (``self.copies`` whatever its name).
    """

    #: the attribute (and ``state_dict`` key) of the list of copies
    EXPERT_LIST = "local_experts"

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: str = "ep_size_1",
                 ep_rank: int = 0, hidden_size: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(expert, nn.Module):
            raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
        check_int(num_local_experts, "num_local_experts", 1)
        if hidden_size is not None:
            check_int(hidden_size, "hidden_size", 1)
            check_expert_width(expert, hidden_size, "expert", expert_group_name)
        if not any(True for _ in expert.parameters()):
            raise ValueError("expert has no parameters; an MoE expert must own at least one parameter")
        self.hidden_size = hidden_size
        # the first forward checks the width the expert's first Linear takes (what its structure did not say)
        self._widths_checked = hidden_size is None or expert_width(expert, "in") is not None
        self.add_module(self.EXPERT_LIST, nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)]))
        self.num_local_experts = num_local_experts
        self.expert_group_name = expert_group_name
        self.ep_rank = 0
        self.tag(expert_group_name, ep_rank)

    def tag(self, expert_group_name: str, ep_rank: int) -> None:
        """(Re)stamp every parameter with the layer name and its global expert number."""
        self._set_identity(expert_group_name, ep_rank)
        for i, expert in enumerate(self.copies):
            key = ExpertKey(expert_group_name, ep_rank * self.num_local_experts + i)
            for name, param in expert.named_parameters():
                tag_expert_param(param, key, name)

    @property
    def copies(self) -> nn.ModuleList:
        """The local experts' modules, in local order."""
        return self._modules[self.EXPERT_LIST]

    def _local(self, number: int) -> nn.Module:
        return self.copies[self._local_index(number)]

    def expert_state_dict(self, number: int, keep_vars: bool = False) -> Dict[str, Tensor]:
        """Tensors (parameters and buffers) of global expert ``number``, by their names inside it."""
        return self._local(number).state_dict(keep_vars=keep_vars)

    def load_expert_state_dict(self, number: int, tensors: Dict[str, Tensor]) -> None:
        """Copy ``tensors`` (as :meth:`expert_state_dict` returns them) into global expert ``number``."""
        self._local(number).load_state_dict(tensors, strict=True)

    def __getitem__(self, i: int) -> nn.Module:
        return self.copies[i]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.copies)

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
        D = getattr(self, "hidden_size", None)  # (containers pickled before it was recorded lack both)
        for i, (expert, chunk) in enumerate(zip(self.copies, xs)):
            # an expert with no tokens still runs (on 0 rows) so its parameters get zero grads,
            # not None, exactly as with DeepSpeed's padded buffers
            if not getattr(self, "_widths_checked", True) and not torch.compiler.is_compiling():
                out = self._first_call(expert, chunk)
                self._widths_checked = True
            else:
                out = expert(chunk)
            if isinstance(out, tuple):
                out = out[0]  # DeepSpeed convention: ignore a returned bias
            if D is not None and (out.dim() < 1 or out.shape[-1] != D):
                raise ValueError(f"MoE layer {self.expert_group_name!r}: expert {self.first_expert_number + i} "
                                 f"({type(expert).__name__}) gave outputs of shape {tuple(out.shape)} for inputs of "
                                 f"shape {tuple(chunk.shape)}; an expert must give hidden_size={D} wide outputs")
            outputs.append(out)
        return outputs

    def _first_call(self, expert: nn.Module, chunk: Tensor):
        """Run ``expert`` once, refusing (before torch's bare matmul error) a first Linear that does not
        take the width it is given."""
        seen: List[bool] = []

        def check(name: str, linear: nn.Linear, args) -> None:
            if seen:
                return
            seen.append(True)
            x = args[0] if args else None
            if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] != linear.in_features:
                raise ValueError(f"MoE layer {self.expert_group_name!r}: the expert ({type(expert).__name__}) takes "
                                 f"inputs of width {linear.in_features} (its first Linear {name!r}), but it is given "
                                 f"tokens of width {x.shape[-1]} (the layer's hidden_size is {self.hidden_size}); an "
                                 "expert maps (tokens, hidden_size) to (tokens, hidden_size)")

        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: check(name, mod, args))
                   for name, m in expert.named_modules() if isinstance(m, nn.Linear)]
        try:
            return expert(chunk)
        finally:
            for h in handles:
                h.remove()
