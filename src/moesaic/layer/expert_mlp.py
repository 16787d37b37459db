"""Two autograd functions for a whole stacked expert MLP (CPU path of :class:`~moesaic.layer.stacked.StackedExperts`).

Running each projection as its own autograd function (or ``nn.Linear`` per expert) makes autograd
keep every intermediate an expert produces: the input piece, the projections' outputs, the
activation's output and the product fed to the down projection, four `(N, F)` tensors for a GLU
and a graph node per expert per op. Here the expert MLP of every local expert is two functions,
the input projections and the rest:

* forward: per expert, the input projections (``mm``/``addmm`` into row blocks of one `(N, F)`
  buffer each); then the elementwise middle (the activation, or the gated unit) on the whole
  buffers and the output projection into row blocks of one `(N, D)` buffer (the combine reads it
  whole);
* saved: the input pieces (which the dispatcher's :class:`~moesaic.layer.ops.SavedPieces` keeps
  as indices) by the first, the input projections' outputs by the second; the middle is recomputed
  in backward, a few elementwise passes against two `(N, F)` tensors less memory;
* backward: per expert, the matmuls autograd runs for ``nn.Linear`` (``g @ W`` for the input,
  ``g.T @ x`` for the weight, ``g.sum(0)`` for the bias) writing straight into slices of the
  stacked gradients, and the middle's gradient by autograd over the recomputed middle (in place
  for SwiGLU). Two functions, so the input pieces are unpacked (rebuilt) only after the middle's
  gradient is formed and the projections' outputs are freed: the `(N, D)` pieces and the `(N, F)`
  temporaries of the middle are never alive together (one function unpacked them all at its start).

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

from .ops import HandedPieces, row_blocks, rows_in_place

# the elementwise middle: the input projections' outputs -> the output projection's input
Middle = Callable[..., Tensor]


def silu_glu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's middle, ``silu(gate) * up``. Passed as ``middle``, its backward runs in place
    (two `(N, F)` buffers fewer at the layer's peak than autograd over the recomputed middle)."""
    return F.silu(gate) * up


def _silu_glu_backward(ops, gate: Tensor, up: Tensor, grad_y: Tensor, out_w: Tensor, weight_grad):
    """The output projection's input gradient and the middle's backward for :func:`silu_glu`, in place.

    The same kernels as autograd over ``silu(gate) * up`` (``mul`` both ways, ``silu_backward``),
    so the same values. ``weight_grad(mid)`` is called with the recomputed middle while it exists;
    the middle is freed before the output projection's input gradient is allocated, and the gate's
    gradient is written over the buffer it is computed from: at most three `(N, F)` temporaries
    live at once. Returns ``(grad_gate, grad_up)``.
    """
    act = F.silu(gate)
    mid = act * up
    weight_grad(mid)
    del mid
    grad_mid = ops.input_grad(grad_y, out_w)
    grad_up = act.mul_(grad_mid)  # d(act * up)/d up = grad * act, in act's buffer
    grad_act = grad_mid.mul_(up)  # d/d act = grad * up, in grad_mid's buffer
    # elementwise, so writing the result over its own input is exact (the out= variant of the same kernel)
    return torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_act), grad_up


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


class _InProjections(torch.autograd.Function):
    """``h_p = in_proj_p(x)`` for each input projection p, every local expert's rows at once.

    Inputs: P, the per-expert matmuls (``_Grouped``/``_Loop``), P weights, P biases (None where
    absent), then the pieces. Outputs: P `(N, F)` tensors. Saved: the weights and the pieces only,
    so its backward, which runs after the output projection's, is the first to ask for the pieces
    (a :class:`~moesaic.layer.ops.SavedPieces` rebuild happens there, not while the middle's
    gradient is formed).
    """

    @staticmethod
    def forward(ctx, num_in: int, ops, *args):
        weights, biases, xs = args[:num_in], args[num_in:2 * num_in], args[2 * num_in:]
        x = _whole(xs)
        hs = tuple(ops.project(x, w, b) for w, b in zip(weights, biases))
        ctx.num_in, ctx.ops = num_in, ops
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(*weights, *xs)
        return hs

    @staticmethod
    def backward(ctx, *grad_hs: Optional[Tensor]):
        num_in, ops = ctx.num_in, ctx.ops
        saved = ctx.saved_tensors
        weights, xs = saved[:num_in], list(saved[num_in:])
        del saved
        need = ctx.needs_input_grad[2:]
        need_w = need[:num_in]
        need_b = [n and has for n, has in zip(need[num_in:2 * num_in], ctx.has_bias)]
        need_xs = need[2 * num_in:]
        grad_hs = [g if g is not None else w.new_zeros(sum(ops.sizes), w.shape[1]) for g, w in zip(grad_hs, weights)]
        grad_w: List[Optional[Tensor]] = [None] * num_in
        grad_b: List[Optional[Tensor]] = [None] * num_in
        # weight and bias gradients, then the input gradient summed over the projections
        x = _whole(xs)
        for p in range(num_in):
            if need_w[p] or need_b[p]:
                grad_w[p], grad_b[p] = ops.weight_grad(grad_hs[p], x, need_b[p])
        num_pieces = len(xs)
        del x, xs  # (N, D) off the peak before the input gradient is allocated
        grad_xs: List[Optional[Tensor]] = [None] * num_pieces
        if any(need_xs):
            grad_x = ops.input_grad(grad_hs[0], weights[0])
            for p in range(1, num_in):
                grad_x = ops.input_grad(grad_hs[p], weights[p], accumulate=grad_x)
            grad_xs = [g if n else None for g, n in zip(grad_x.split(ops.sizes), need_xs)]
        grad_w = [g if n else None for g, n in zip(grad_w, need_w)]
        grad_b = [g if n else None for g, n in zip(grad_b, need_b)]
        return (None, None, *grad_w, *grad_b, *grad_xs)


class _OutProjection(torch.autograd.Function):
    """``y = out_proj(middle(*hs))``, every local expert's rows at once; returns one `(N_i, D)` row
    block per piece. Saved: the output projection's weight and the input projections' outputs
    (the middle is recomputed in backward: a few elementwise passes against two `(N, F)` tensors).
    """

    @staticmethod
    def forward(ctx, middle: Middle, ops, weight: Tensor, bias: Optional[Tensor], *hs: Tensor):
        y = ops.project(middle(*hs), weight, bias)
        ctx.middle, ctx.ops, ctx.has_bias = middle, ops, bias is not None
        ctx.save_for_backward(weight, *hs)
        return tuple(row_blocks(y, ops.sizes))  # not views: FSDP2 hooks the experts' outputs

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        ops = ctx.ops
        weight, *hs = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3] and ctx.has_bias
        need_hs = any(ctx.needs_input_grad[4:])
        grad_y = _whole([g if g is not None else hs[0].new_zeros(n, weight.shape[1])
                         for g, n in zip(grads, ops.sizes)])
        grad_w = grad_b = None

        def weight_grad(mid: Tensor) -> None:
            nonlocal grad_w, grad_b
            if need_w or need_b:
                grad_w, grad_b = ops.weight_grad(grad_y, mid, need_b)

        grad_hs: Sequence[Optional[Tensor]] = [None] * len(hs)
        if ctx.middle is silu_glu and need_hs:
            grad_hs = _silu_glu_backward(ops, *hs, grad_y, weight, weight_grad)
        else:
            # the middle again, under autograd, for its output (the output projection's saved
            # input) and its gradient
            inputs = [h.detach().requires_grad_(need_hs) for h in hs]
            with torch.enable_grad():
                mid = ctx.middle(*inputs)
            weight_grad(mid.detach())
            if need_hs:
                grad_hs = torch.autograd.grad(mid, inputs, ops.input_grad(grad_y, weight))
            del mid
        return (None, None, grad_w if need_w else None, grad_b if need_b else None, *grad_hs)


def expert_mlp(middle: Middle, in_projs: Sequence[Tuple[Tensor, Optional[Tensor]]], out_proj: Tuple[Tensor, Optional[Tensor]],
               xs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """Every local expert's MLP on its piece, in one autograd function (see module docstring).

    Args:
        middle: the elementwise function from the input projections' outputs (one `(N, F)` tensor
            each) to the output projection's input; it runs on all experts' rows at once, so it
            must act row by row.
        in_projs: ``(weight (E, F, D), bias (E, F) or None)`` per input projection (1 or 2).
        out_proj: ``(weight (E, D, F), bias (E, D) or None)``.
        xs: one `(N_i, D)` piece per local expert, all of one dtype and device; a
            :class:`~moesaic.layer.ops.HandedPieces` is emptied once the input projections ran.

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
    num_in = len(in_projs)
    ops = (_Grouped if _grouped_usable(weights, biases) else _Loop)(sizes, xs[0].device)
    hs = _InProjections.apply(num_in, ops, *weights[:num_in], *biases[:num_in], *xs)
    if isinstance(xs, HandedPieces):
        xs.clear()  # the dispatched rows are free before the output projection allocates (ops.HandedPieces)
    return _OutProjection.apply(middle, ops, weights[num_in], biases[num_in], *hs)


__all__ = ["expert_mlp", "silu_glu"]
