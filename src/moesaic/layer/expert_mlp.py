"""One autograd function for a whole stacked expert MLP (CPU path of :class:`~moesaic.layer.stacked.StackedExperts`).

Running each projection as its own autograd function (or ``nn.Linear`` per expert) makes autograd
keep every intermediate an expert produces: the input piece, the projections' outputs, the
activation's output and the product fed to the down projection, four `(N, F)` tensors for a GLU
and a graph node per expert per op. This function computes the expert MLP of every local expert
in one forward and one backward:

* forward: per expert, the input projections (``mm``/``addmm`` into row blocks of one `(N, F)`
  buffer each), the elementwise middle (the activation, or the gated unit) on the whole buffers,
  and the output projection into row blocks of one `(N, D)` buffer (the combine reads it whole);
* saved: the input pieces (which the dispatcher's :class:`~moesaic.layer.ops.SavedPieces` keeps
  as indices) and the input projections' outputs; the middle is recomputed in backward, a few
  elementwise passes against two `(N, F)` tensors less memory;
* backward: per expert, the matmuls autograd runs for ``nn.Linear`` (``g @ W`` for the input,
  ``g.T @ x`` for the weight, ``g.sum(0)`` for the bias) writing straight into slices of the
  stacked gradients, and the middle's gradient by autograd over the recomputed middle.

The matmuls are the kernels ``nn.Linear`` runs on the same values. The middle runs over all
experts' rows at once instead of expert by expert: its vectorised kernels then group elements
differently (a piece's last few elements take the scalar path when computed alone), so results
agree with per-module experts to fp32 round-off, a few ulp, not bit for bit
(tests/unit/test_stacked_experts.py). Running it per expert costs ~7 ms of a 63 ms layer
(64 experts, fp32 CPU), measured against this.

Shape legend: E = local experts, N = routed rows, D = model dim, F = expert hidden.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import rows_in_place

# the elementwise middle: the input projections' outputs -> the output projection's input
Middle = Callable[..., Tensor]


def silu_glu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's middle, ``silu(gate) * up``. Passed as ``middle``, its backward runs in place
    (two `(N, F)` buffers fewer at the layer's peak than autograd over the recomputed middle)."""
    return F.silu(gate) * up


def _silu_glu_backward(ops, gate: Tensor, up: Tensor, grad_y: Tensor, out_w: Tensor, weight_grad):
    """The output projection's input gradient and the middle's backward for :func:`silu_glu`, in place.

    The same kernels as autograd over ``silu(gate) * up`` (``mul`` both ways, ``silu_backward``),
    so the same values. ``weight_grad(mid)`` is called with the recomputed middle while it exists.
    Returns ``(grad_gate, grad_up)``.
    """
    act = F.silu(gate)
    mid = act * up
    weight_grad(mid)
    grad_mid = ops.input_grad(grad_y, out_w)
    del mid
    grad_up = act.mul_(grad_mid)  # d(act * up)/d up = grad * act, in act's buffer
    grad_act = grad_mid.mul_(up)  # d/d act = grad * up, in grad_mid's buffer
    return torch.ops.aten.silu_backward(grad_act, gate), grad_up


def _whole(pieces: Sequence[Tensor]) -> Tensor:
    """The pieces as one `(N, X)` tensor: read in place when they are row blocks of one, else concatenated."""
    whole = rows_in_place(pieces) if len(pieces) > 1 else (pieces[0] if pieces[0].is_contiguous() else None)
    return whole if whole is not None else torch.cat(list(pieces))


class _Grouped:
    """The per-expert matmuls as ``torch._grouped_mm`` calls (a loop over the experts in C++).

    Used on the CPU where every operand's rows are 16-byte aligned (the kernel's requirement) and
    there are no biases: the same ``mm`` per expert as the Python loop (bitwise equal), without
    64+ Python calls per matmul.
    """

    def __init__(self, sizes: List[int], device) -> None:
        self.sizes = sizes
        self.offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)

    def project(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """Row block i = ``x_i @ weight[i].T`` (no bias: see _grouped_usable)."""
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=self.offs)

    def input_grad(self, g: Tensor, weight: Tensor, accumulate: Optional[Tensor] = None) -> Tensor:
        """Row block i = ``g_i @ weight[i]`` (added onto ``accumulate`` when given).

        Accumulating runs the loop's ``addmm_`` into ``accumulate``: ``_grouped_mm`` has no ``out=``,
        and its result would be an `(N, D)` temporary at the layer's peak.
        """
        if accumulate is None:
            return torch._grouped_mm(g, weight, offs=self.offs)
        return _Loop(self.sizes, g.device).input_grad(g, weight, accumulate)

    def weight_grad(self, g: Tensor, x: Tensor, bias_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``(g_i.T @ x_i`` stacked, ``None``): the loop handles biases."""
        return torch._grouped_mm(g.t(), x, offs=self.offs), None


class _Loop:
    """The per-expert matmuls as a Python loop of ``mm``/``addmm`` into slices (any shape, biases)."""

    def __init__(self, sizes: List[int], device) -> None:
        self.sizes = sizes

    def project(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        out = x.new_empty(x.shape[0], weight.shape[1])
        # per-expert views from one call each (unbind, split) rather than an index and a
        # transpose per expert: with 64+ experts the loop's Python is a visible cost
        weights_t = weight.transpose(1, 2).unbind(0)
        rows = zip(x.split(self.sizes), out.split(self.sizes))
        if bias is None:
            for (xi, yi), w_t in zip(rows, weights_t):
                torch.mm(xi, w_t, out=yi)
        else:
            for (xi, yi), w_t, b in zip(rows, weights_t, bias.unbind(0)):
                torch.addmm(b, xi, w_t, out=yi)
        return out

    def input_grad(self, g: Tensor, weight: Tensor, accumulate: Optional[Tensor] = None) -> Tensor:
        out = g.new_empty(g.shape[0], weight.shape[2]) if accumulate is None else accumulate
        for gi, w, oi in zip(g.split(self.sizes), weight.unbind(0), out.split(self.sizes)):
            if accumulate is None:
                torch.mm(gi, w, out=oi)
            else:
                oi.addmm_(gi, w)
        return out

    def weight_grad(self, g: Tensor, x: Tensor, bias_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
        E = len(self.sizes)
        grad_w = g.new_empty(E, g.shape[1], x.shape[1])
        grad_b = g.new_empty(E, g.shape[1]) if bias_grad else None
        g_t = g.t().split(self.sizes, dim=1)
        for i, (gi, xi) in enumerate(zip(g_t, x.split(self.sizes))):
            torch.mm(gi, xi, out=grad_w[i])
            if grad_b is not None:
                torch.sum(gi, 1, out=grad_b[i])
        return grad_w, grad_b


def _grouped_usable(tensors: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> bool:
    ref = tensors[0]
    if not hasattr(torch, "_grouped_mm") or ref.device.type != "cpu" or any(b is not None for b in biases):
        return False
    align = 16 // ref.element_size()
    return all(t.shape[-1] % align == 0 and t.shape[-2] % align == 0 for t in tensors)


class _ExpertMLP(torch.autograd.Function):
    """``y_i = out_proj_i(middle(in_proj_i(x_i) for each input projection))`` for every local expert i.

    Inputs: the middle function, the number of input projections P (1 for an FFN, 2 for a GLU),
    the piece sizes, then P + 1 weights, P + 1 biases (None where absent), then the pieces.
    Outputs: one `(N_i, D)` tensor per piece, row blocks of one buffer.
    """

    @staticmethod
    def forward(ctx, middle: Middle, num_in: int, sizes: List[int], *args):
        weights = args[:num_in + 1]
        biases = args[num_in + 1:2 * num_in + 2]
        xs = args[2 * num_in + 2:]
        x = _whole(xs)
        ops = (_Grouped if _grouped_usable(weights, biases) else _Loop)(sizes, x.device)
        hs = [ops.project(x, w, b) for w, b in zip(weights[:num_in], biases[:num_in])]
        mid = middle(*hs)
        y = ops.project(mid, weights[num_in], biases[num_in])
        ctx.middle, ctx.num_in, ctx.sizes, ctx.ops = middle, num_in, sizes, ops
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(*weights, *hs, *xs)
        return tuple(y.split(sizes))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        num_in, sizes, ops = ctx.num_in, ctx.sizes, ctx.ops
        saved = ctx.saved_tensors
        weights = saved[:num_in + 1]
        hs = saved[num_in + 1:2 * num_in + 1]
        xs = list(saved[2 * num_in + 1:])
        del saved  # the rebuilt input pieces are freed below, once the weight gradients are done
        need = ctx.needs_input_grad[3:]
        need_w = need[:num_in + 1]
        need_b = [n and has for n, has in zip(need[num_in + 1:2 * num_in + 2], ctx.has_bias)]
        need_x = any(need[2 * num_in + 2:])
        grad_y = _whole([g if g is not None else x.new_zeros(x.shape[0], weights[num_in].shape[1])
                         for g, x in zip(grads, xs)])
        grad_w: List[Optional[Tensor]] = [None] * (num_in + 1)
        grad_b: List[Optional[Tensor]] = [None] * (num_in + 1)

        def out_weight_grad(mid: Tensor, grad_y: Tensor = grad_y) -> None:
            if need_w[num_in] or need_b[num_in]:
                grad_w[num_in], grad_b[num_in] = ops.weight_grad(grad_y, mid, need_b[num_in])

        if ctx.middle is silu_glu:
            grad_hs = _silu_glu_backward(ops, *hs, grad_y, weights[num_in], out_weight_grad)
        else:
            # the middle again, under autograd, for its output (the output projection's saved
            # input) and its gradient
            inputs = [h.detach().requires_grad_() for h in hs]
            with torch.enable_grad():
                mid = ctx.middle(*inputs)
            out_weight_grad(mid.detach())
            grad_hs = torch.autograd.grad(mid, inputs, ops.input_grad(grad_y, weights[num_in]))
            del mid
        del grad_y

        # the input projections: weight and bias gradients, and the input gradient summed over
        # the projections
        x = _whole(xs)
        for p in range(num_in):
            if need_w[p] or need_b[p]:
                grad_w[p], grad_b[p] = ops.weight_grad(grad_hs[p], x, need_b[p])
        num_pieces = len(xs)
        del x, xs  # (N, D) off the peak before the input gradient is allocated
        grad_xs: List[Optional[Tensor]] = [None] * num_pieces
        if need_x:
            grad_x = ops.input_grad(grad_hs[0], weights[0])
            for p in range(1, num_in):
                grad_x = ops.input_grad(grad_hs[p], weights[p], accumulate=grad_x)
            grad_xs = [g if n else None for g, n in zip(grad_x.split(sizes), need[2 * num_in + 2:])]
        grad_w = [g if n else None for g, n in zip(grad_w, need_w)]
        return (None, None, None, *grad_w, *grad_b, *grad_xs)


def expert_mlp(middle: Middle, in_projs: Sequence[Tuple[Tensor, Optional[Tensor]]], out_proj: Tuple[Tensor, Optional[Tensor]],
               xs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """Every local expert's MLP on its piece, in one autograd function (see module docstring).

    Args:
        middle: the elementwise function from the input projections' outputs (one `(N, F)` tensor
            each) to the output projection's input; it runs on all experts' rows at once, so it
            must act row by row.
        in_projs: ``(weight (E, F, D), bias (E, F) or None)`` per input projection (1 or 2).
        out_proj: ``(weight (E, D, F), bias (E, D) or None)``.
        xs: one `(N_i, D)` piece per local expert, all of one dtype and device.

    Returns:
        One `(N_i, D)` output per piece, row blocks of one tensor.
    """
    if not xs:
        raise ValueError("expert_mlp needs at least one piece")
    if len(in_projs) not in (1, 2):
        raise ValueError(f"in_projs must hold 1 (FFN) or 2 (GLU) projections, got {len(in_projs)}")
    projs = [*in_projs, out_proj]
    weights = [w for w, _ in projs]
    biases = [b for _, b in projs]
    sizes = [x.shape[0] for x in xs]
    return _ExpertMLP.apply(middle, len(in_projs), sizes, *weights, *biases, *xs)


__all__ = ["expert_mlp", "silu_glu"]
