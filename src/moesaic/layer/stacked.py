"""Stacked experts: the local experts of a standard FFN/GLU shape as ``[E_local, ...]`` tensors.

torchtitan, Megatron and Hugging Face keep all experts of a layer in one stacked weight so a
grouped GEMM can run them at once. :class:`StackedExperts` does the same and keeps what moesaic is
built on, the identity of every expert:

* each stacked parameter is tagged with :func:`~moesaic.layer.identity.tag_stacked_param`, so
  :class:`~moesaic.layer.identity.ExpertIndex` answers "which tensors are expert n" with views
  ``w[n - first]`` (``ParamRef(index=...)``): optimizer groups per expert, group-by-group
  stepping, gradient sync and ZeRO ownership work on those views exactly as on per-module
  experts;
* the tensors of one expert are named as the per-module expert names them (``"gate_proj.weight"``,
  ``"0.bias"``), in :meth:`StackedExperts.expert_state_dict`, so per-expert checkpoint files move
  between the two layouts, and optimizer state (keyed ``"<layer>/<n>/<name>"``) too;
* ``weight[i]`` is exactly the ``nn.Linear`` weight of expert i (`(out, in)`), and the CPU path
  runs the same matmul kernels on the same values as per-module experts; the elementwise middle
  (activation, gated unit) runs over all experts' rows at once, so results agree with per-module
  experts to fp32 round-off, a few ulp (``tests/unit/test_stacked_experts.py``).

Compute: on CUDA with bf16 weights and compute capability 9.0 or more (where
``torch.nn.functional.grouped_mm`` has fast kernels) one grouped matmul per projection over all
experts' rows; elsewhere a loop over the experts inside one autograd function for the whole
expert MLP (:mod:`~moesaic.layer.expert_mlp`), whose backward writes each expert's weight
gradient straight into its slice of one stacked gradient (autograd through ``w[i]`` views would
instead build an `[E, ...]` gradient per expert).

Shape legend: E = local experts, N = routed rows, D = model dim, F = expert hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .experts import ExpertContainer
from .expert_mlp import expert_mlp, silu_glu
from .ffn import ACTIVATIONS, FFNExpert, GLUExpert, activation_fn, glu
from .identity import tag_stacked_param
from .ops import HandedPieces, split_rows

# activation modules an nn.Sequential FFN expert may hold, and the name of the same function
_ACT_MODULES: Dict[type, Callable[[nn.Module], Optional[str]]] = {
    nn.GELU: lambda m: {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate),
    nn.ReLU: lambda m: "relu",
    nn.SiLU: lambda m: "silu",
}


@dataclass(frozen=True)
class ExpertShape:
    """What a standard expert computes, read from a template module.

    Attributes:
        kind: ``"ffn"`` (two projections and an activation) or ``"glu"`` (gate, up, down).
        names: the projections' names inside the expert, in computation order.
        activation: the activation's name (:data:`~moesaic.layer.ffn.ACTIVATIONS`).
        bias: whether the projections have biases.
        swiglu_limit / swiglu_alpha: GPT-OSS's clamped SwiGLU (``glu`` only; None: plain).
    """

    kind: str
    names: Tuple[str, ...]
    activation: str
    bias: bool
    swiglu_limit: Optional[float] = None
    swiglu_alpha: float = 1.702


def _shape_error(expert: nn.Module, why: str) -> ValueError:
    return ValueError(f"stacked experts need an expert of a standard FFN/GLU shape: moesaic.FFNExpert, "
                      f"moesaic.GLUExpert or nn.Sequential(nn.Linear(D, F), <nn.GELU | nn.ReLU | nn.SiLU>, nn.Linear(F, D)); got "
                      f"{type(expert).__name__} ({why})")


def expert_shape(expert: nn.Module, hidden_size: Optional[int] = None) -> Tuple[ExpertShape, List[nn.Linear]]:
    """Recognise a standard expert; returns its shape and its projections (in ``names`` order).

    Raises a ValueError naming what is allowed for any other module.
    """
    if isinstance(expert, GLUExpert):
        shape = ExpertShape("glu", ("gate_proj", "up_proj", "down_proj"), expert.activation,
                            expert.gate_proj.bias is not None, expert.swiglu_limit, expert.swiglu_alpha)
        linears = [expert.gate_proj, expert.up_proj, expert.down_proj]
    elif isinstance(expert, FFNExpert):
        shape = ExpertShape("ffn", ("fc1", "fc2"), expert.activation, expert.fc1.bias is not None)
        linears = [expert.fc1, expert.fc2]
    elif isinstance(expert, nn.Sequential):
        mods = list(expert)
        if len(mods) != 3 or not isinstance(mods[0], nn.Linear) or not isinstance(mods[2], nn.Linear):
            raise _shape_error(expert, f"a Sequential of {[type(m).__name__ for m in mods]}")
        act = _ACT_MODULES.get(type(mods[1]), lambda m: None)(mods[1])
        if act is None:
            raise _shape_error(expert, f"activation {mods[1]!r} is not one of GELU, ReLU, SiLU")
        if (mods[0].bias is None) != (mods[2].bias is None):
            raise _shape_error(expert, "one Linear has a bias and the other has not")
        names = tuple(name for name, _ in expert.named_children())
        shape = ExpertShape("ffn", (names[0], names[2]), act, mods[0].bias is not None)
        linears = [mods[0], mods[2]]
    else:
        raise _shape_error(expert, "another module type")
    if type(expert) not in (GLUExpert, FFNExpert, nn.Sequential):
        raise _shape_error(expert, f"a subclass {type(expert).__name__} may compute something else")
    if any(True for _ in expert.buffers()):
        raise _shape_error(expert, "it holds buffers")
    D = linears[0].in_features
    F_ = linears[0].out_features
    want = [(D, F_)] * (len(linears) - 1) + [(F_, D)]
    got = [(lin.in_features, lin.out_features) for lin in linears]
    if got != want or (hidden_size is not None and D != hidden_size):
        raise _shape_error(expert, f"its (in, out) features are {got}; they must map hidden_size="
                                   f"{hidden_size if hidden_size is not None else D} to F and back")
    return shape, linears


class StackedLinear(nn.Module):
    """``E`` linear layers of one shape: ``weight`` `(E, out, in)`, ``bias`` `(E, out)` or None."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def copies_of(cls, linear: nn.Linear, num_experts: int) -> "StackedLinear":
        """``num_experts`` copies of ``linear`` (every expert starts from the template, as deep copies do)."""
        out = cls(num_experts, linear.in_features, linear.out_features, linear.bias is not None)
        out.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight.detach().expand_as(out.weight))
            if out.bias is not None:
                out.bias.copy_(linear.bias.detach().expand_as(out.bias))
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.weight.shape[0]}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


def _grouped_mm_usable(weight: Tensor) -> bool:
    """Whether ``F.grouped_mm`` has a fast kernel for these weights (CUDA, bf16, sm90+, aligned)."""
    if not hasattr(F, "grouped_mm") or not weight.is_cuda or weight.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(weight.device) < (9, 0):
        return False
    return weight.shape[1] % 8 == 0 and weight.shape[2] % 8 == 0  # 16-byte aligned rows


class StackedExperts(ExpertContainer):
    """The local experts of one MoE layer as stacked tensors (see module docstring).

    Args:
        expert: a template of a standard shape (:func:`expert_shape`): its weights initialise every
            expert, as the per-module container's deep copies do.
        num_local_experts: experts held by this rank.
        expert_group_name: the layer's name, stamped on every parameter.
        ep_rank: this rank's index in its expert-parallel group (sets the global numbers).
        hidden_size: D, checked against the template when given.

    Attributes:
        use_grouped_mm: None picks the grouped matmul where it is fast (see module docstring);
            True/False forces one path (True raises where ``grouped_mm`` cannot run).
    """

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: str = "ep_size_1",
                 ep_rank: int = 0, hidden_size: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(expert, nn.Module):
            raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
        check_int(num_local_experts, "num_local_experts", 1)
        try:
            shape, linears = expert_shape(expert, hidden_size)
        except ValueError as e:
            raise ValueError(f"MoE layer {expert_group_name!r}: {e}") from None
        self.shape = shape
        for name, linear in zip(shape.names, linears):
            self.add_module(name, StackedLinear.copies_of(linear, num_local_experts))
        self.num_local_experts = num_local_experts
        self.expert_group_name = expert_group_name
        self.ep_rank = 0
        self.use_grouped_mm: Optional[bool] = None
        # the whole MLP takes all pieces as one batch, never modifies them in place, and its
        # backward asks for every saved piece at once: dispatchers may hand them (and rebuild
        # them) as row blocks of one gather
        self.pieces_together = True
        self.tag(expert_group_name, ep_rank)

    # --- identity -------------------------------------------------------------------------------
    def projections(self) -> List[StackedLinear]:
        """The stacked projections in computation order."""
        return [getattr(self, name) for name in self.shape.names]

    def _named_stacked(self):
        for name in self.shape.names:
            proj = getattr(self, name)
            yield f"{name}.weight", proj.weight
            if proj.bias is not None:
                yield f"{name}.bias", proj.bias

    def tag(self, expert_group_name: str, ep_rank: int) -> None:
        """(Re)stamp every stacked parameter: slice i is expert ``ep_rank * L + i`` of the layer."""
        self._set_identity(expert_group_name, ep_rank)
        for name, param in self._named_stacked():
            tag_stacked_param(param, expert_group_name, ep_rank * self.num_local_experts, name)

    def expert_state_dict(self, number: int, keep_vars: bool = False) -> Dict[str, Tensor]:
        """Expert ``number``'s slices (views), named as the per-module expert names its tensors."""
        i = self._local_index(number)
        return {name: (p if keep_vars else p.detach())[i] for name, p in self._named_stacked()}

    def expert_grads(self, number: int) -> Dict[str, Optional[Tensor]]:
        """Expert ``number``'s slices of the stacked gradients (views; None: no gradient), named as its tensors."""
        i = self._local_index(number)
        return {name: None if p.grad is None else p.grad[i] for name, p in self._named_stacked()}

    def load_expert_state_dict(self, number: int, tensors: Dict[str, Tensor]) -> None:
        """Copy ``tensors`` into expert ``number``'s slices (strict: same names and shapes)."""
        i = self._local_index(number)
        own = dict(self._named_stacked())
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise KeyError(f"expert {number} of layer {self.expert_group_name!r}: tensors do not match (missing "
                           f"{missing}, unexpected {extra})")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(own[name].shape[1:]):
                raise ValueError(f"expert {number} of layer {self.expert_group_name!r}: {name!r} has shape "
                                 f"{tuple(value.shape)}, the expert's is {tuple(own[name].shape[1:])}")
        with torch.no_grad():
            for name, value in tensors.items():
                own[name][i].copy_(value)

    # --- compute --------------------------------------------------------------------------------
    def _grouped(self) -> bool:
        weight = self.projections()[0].weight
        usable = _grouped_mm_usable(weight)
        if self.use_grouped_mm is None:
            return usable
        if self.use_grouped_mm and not usable:
            raise RuntimeError("use_grouped_mm=True but torch.nn.functional.grouped_mm has no kernel here (it needs "
                               "CUDA, bf16 weights, compute capability >= 9.0 and dims that are multiples of 8)")
        return self.use_grouped_mm

    def forward(self, xs: Sequence[Tensor]) -> List[Tensor]:
        """Run local expert ``i`` on its piece ``xs[i]`` (one `(N_i, D)` piece per local expert).

        Returns one `(N_i, D)` output per local expert, as :class:`~moesaic.layer.experts.Experts` does.
        """
        if isinstance(xs, Tensor) or len(xs) != self.num_local_experts:
            got = "a Tensor" if isinstance(xs, Tensor) else f"{len(xs)} pieces"
            raise ValueError(f"StackedExperts expects one piece per local expert ({self.num_local_experts}), got {got}")
        if self._grouped():
            return self._forward_grouped(xs if isinstance(xs, list) else list(xs))
        return list(self._forward_loop(xs))

    def _middle(self) -> Callable[..., Tensor]:
        """The elementwise function between the input projections and the output projection."""
        s = self.shape
        if s.kind == "ffn":
            return activation_fn(s.activation)
        if s.activation == "silu" and s.swiglu_limit is None:
            return silu_glu  # the same function; its backward runs in place (expert_mlp)
        return partial(glu, activation=s.activation, swiglu_limit=s.swiglu_limit, swiglu_alpha=s.swiglu_alpha)

    def _forward_loop(self, xs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        # one autograd function for the whole MLP (layer/expert_mlp.py), with nn.Linear's autocast
        # behaviour: under autocast the weights, biases and pieces are cast to the autocast dtype
        # here, outside the function (autograd casts the gradients back), so it sees one dtype
        projs = [(p.weight, p.bias) for p in self.projections()]
        device_type = projs[0][0].device.type
        if not torch.is_autocast_enabled(device_type):
            return expert_mlp(self._middle(), projs[:-1], projs[-1], xs)
        dtype = torch.get_autocast_dtype(device_type)
        projs = [(w.to(dtype), None if b is None else b.to(dtype)) for w, b in projs]
        handed, xs = xs, HandedPieces(x.to(dtype) for x in xs)
        if isinstance(handed, HandedPieces):
            handed.clear()  # the uncast rows are free once cast (ops.HandedPieces)
        with torch.autocast(device_type, enabled=False):
            return expert_mlp(self._middle(), projs[:-1], projs[-1], xs)

    def _forward_grouped(self, xs: List[Tensor]) -> List[Tensor]:
        # 1. one (N, D) tensor and the group offsets  2. one grouped matmul per projection (biases
        # added per row)  3. split the output back into pieces
        sizes = [x.shape[0] for x in xs]
        x_ND = torch.cat(xs)
        if isinstance(xs, HandedPieces):
            xs.clear()  # the dispatched rows are free once concatenated (ops.HandedPieces)
        sizes_E = torch.tensor(sizes, device=x_ND.device)
        offs = torch.cumsum(sizes_E, 0).to(torch.int32)

        def project(t: Tensor, proj: StackedLinear) -> Tensor:
            y = F.grouped_mm(t, proj.weight.transpose(-2, -1), offs=offs)
            if proj.bias is not None:
                y = y + proj.bias.repeat_interleave(sizes_E, dim=0, output_size=t.shape[0])
            return y

        projs = self.projections()
        if self.shape.kind == "ffn":
            h = self._middle()(project(x_ND, projs[0]))
        else:
            h = self._middle()(project(x_ND, projs[0]), project(x_ND, projs[1]))
        return split_rows(project(h, projs[-1]), sizes)  # row blocks, not views (ops.row_blocks)

    def extra_repr(self) -> str:
        s = self.shape
        clamp = f", swiglu_limit={s.swiglu_limit}, swiglu_alpha={s.swiglu_alpha}" if s.swiglu_limit else ""
        return f"kind={s.kind!r}, activation={s.activation!r}, num_local_experts={self.num_local_experts}{clamp}"


__all__ = ["ExpertShape", "StackedExperts", "StackedLinear", "expert_shape", "ACTIVATIONS"]
