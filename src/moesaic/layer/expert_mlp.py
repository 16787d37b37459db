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
from torch import Tensor

# the elementwise middle: the input projections' outputs -> the output projection's input
Middle = Callable[..., Tensor]


def _project(xs: Sequence[Tensor], weight: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """Row block i of ``out`` = ``xs[i] @ weight[i].T (+ bias[i])``; returns ``out``."""
    # the per-expert views come from one call each (unbind) rather than an index and a
    # transpose per expert: with 64+ experts the Python loop is a visible part of the layer
    weights_t = weight.transpose(1, 2).unbind(0)
    blocks = out.split([x.shape[0] for x in xs])
    if bias is None:
        for x, w_t, y in zip(xs, weights_t, blocks):
            torch.mm(x, w_t, out=y)
    else:
        for x, w_t, b, y in zip(xs, weights_t, bias.unbind(0), blocks):
            torch.addmm(b, x, w_t, out=y)
    return out


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
        rows = sum(sizes)
        ref = xs[0]
        hs = [_project(xs, w, b, ref.new_empty(rows, w.shape[1])) for w, b in zip(weights[:num_in], biases[:num_in])]
        mid = middle(*hs)
        out_w, out_b = weights[num_in], biases[num_in]
        y = _project(mid.split(sizes), out_w, out_b, ref.new_empty(rows, out_w.shape[1]))
        ctx.middle, ctx.num_in, ctx.sizes = middle, num_in, sizes
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(*weights, *hs, *xs)
        return tuple(y.split(sizes))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        num_in, sizes = ctx.num_in, ctx.sizes
        saved = ctx.saved_tensors
        weights = saved[:num_in + 1]
        hs = saved[num_in + 1:2 * num_in + 1]
        xs = saved[2 * num_in + 1:]
        need = ctx.needs_input_grad[3:]
        need_w = need[:num_in + 1]
        need_b = [n and has for n, has in zip(need[num_in + 1:2 * num_in + 2], ctx.has_bias)]
        need_x = need[2 * num_in + 2:]
        grad_ys = [g if g is not None else x.new_zeros(x.shape[0], weights[num_in].shape[1])
                   for g, x in zip(grads, xs)]
        grad_w: List[Optional[Tensor]] = [torch.empty_like(w) if n else None for w, n in zip(weights, need_w)]
        grad_b: List[Optional[Tensor]] = [w.new_empty(w.shape[:2]) if n else None for w, n in zip(weights, need_b)]

        # the middle again, under autograd, for its output (the output projection's saved input)
        # and its gradient
        inputs = [h.detach().requires_grad_() for h in hs]
        with torch.enable_grad():
            mid = ctx.middle(*inputs)
        mid_pieces = mid.detach().split(sizes)
        out_w = weights[num_in].unbind(0)
        grad_mid = mid.new_empty(mid.shape)
        for i, (g, gm) in enumerate(zip(grad_ys, grad_mid.split(sizes))):
            torch.mm(g, out_w[i], out=gm)
            if grad_w[num_in] is not None:
                torch.mm(g.t(), mid_pieces[i], out=grad_w[num_in][i])
            if grad_b[num_in] is not None:
                torch.sum(g, 0, out=grad_b[num_in][i])
        grad_hs = torch.autograd.grad(mid, inputs, grad_mid)
        del mid, mid_pieces, grad_mid

        # the input projections: weight and bias gradients, and the input gradient summed over
        # the projections
        rows = [x.shape[0] if n else 0 for x, n in zip(xs, need_x)]
        grad_x_buf = xs[0].new_empty(sum(rows), weights[0].shape[2]).split(rows) if any(need_x) else None
        grad_h_t = [g.t().split(sizes, dim=1) for g in grad_hs]  # piece i's gradient, transposed
        grad_h = [g.split(sizes) for g in grad_hs]
        w_in = [w.unbind(0) for w in weights[:num_in]]
        gw_in = [None if g is None else g.unbind(0) for g in grad_w[:num_in]]
        gb_in = [None if g is None else g.unbind(0) for g in grad_b[:num_in]]
        grad_xs: List[Optional[Tensor]] = []
        for i, x in enumerate(xs):
            for p in range(num_in):
                if gw_in[p] is not None:
                    torch.mm(grad_h_t[p][i], x, out=gw_in[p][i])
                if gb_in[p] is not None:
                    torch.sum(grad_h[p][i], 0, out=gb_in[p][i])
            if not need_x[i]:
                grad_xs.append(None)
                continue
            gx = torch.mm(grad_h[0][i], w_in[0][i], out=grad_x_buf[i])
            for p in range(1, num_in):  # accumulated by the matmul: no temporary per expert
                gx.addmm_(grad_h[p][i], w_in[p][i])
            grad_xs.append(gx)
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


__all__ = ["expert_mlp"]
