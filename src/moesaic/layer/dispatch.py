"""Index-based token dispatch and combine for the experts held by this process.

``permute`` gathers each kept route's token into expert order with one ``index_select``;
``combine`` multiplies each expert output by its route weight and scatter-adds it back onto its
token. Memory is O(routes x D): no one-hot ``[S, E, C]`` tensor and no padded ``[E, C, D]``
buffer, so experts only ever compute on slots that hold a token.

``combine`` is one autograd Function that works in row chunks, so neither its forward nor its
backward materialises the ``(N, D)`` weighted products that ``y * w`` followed by ``index_add``
would (two extra ``(N, D)`` tensors at the layer's peak).

Shape legend: S = tokens, N = kept routes, D = model dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gating import Routing

_CHUNK_ROWS = 4096  # rows per chunk in combine: large enough for full-speed kernels, small in memory


def permute(x_SD: Tensor, routing: Routing) -> Tensor:
    """Tokens of the kept routes, in expert order: `(N, D)`."""
    return x_SD.index_select(0, routing.token_idx_N)


class _WeightedScatterAdd(torch.autograd.Function):
    """out[token[n]] += w[n] * y[n], accumulated in fp32, returned in y's dtype."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_N: Tensor, token_N: Tensor, num_tokens: int) -> Tensor:
        out_SD = torch.zeros(num_tokens, y_ND.shape[1], dtype=torch.promote_types(y_ND.dtype, weight_N.dtype),
                             device=y_ND.device)
        for start in range(0, y_ND.shape[0], _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            out_SD.index_add_(0, token_N[rows], y_ND[rows] * weight_N[rows, None])
        ctx.save_for_backward(y_ND, weight_N, token_N)
        return out_SD.to(y_ND.dtype)

    @staticmethod
    def backward(ctx, grad_SD: Tensor):
        y_ND, weight_N, token_N = ctx.saved_tensors
        grad_y_ND = grad_w_N = None
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_y or need_w:
            grad_routes_ND = grad_SD.index_select(0, token_N)  # becomes grad_y in place, chunk by chunk
            if need_w:
                grad_w_N = torch.empty_like(weight_N)
            for start in range(0, y_ND.shape[0], _CHUNK_ROWS):
                rows = slice(start, start + _CHUNK_ROWS)
                g = grad_routes_ND[rows]
                if need_w:
                    grad_w_N[rows] = (g.to(weight_N.dtype) * y_ND[rows]).sum(1)
                if need_y:
                    if g.dtype == weight_N.dtype:
                        g.mul_(weight_N[rows, None])
                    else:  # scale in fp32 as the forward did, then round once
                        g.copy_(g.to(weight_N.dtype) * weight_N[rows, None])
            grad_y_ND = grad_routes_ND if need_y else None
        return grad_y_ND, grad_w_N, None, None


def combine(y_ND: Tensor, routing: Routing, num_tokens: int) -> Tensor:
    """Weighted scatter-add of expert outputs back onto their tokens.

    The products and the sum over a token's routes are formed in fp32 (the router weights'
    dtype), as DeepSpeed's decode does, then cast back to the experts' dtype. Tokens whose every
    route was dropped come out as zeros.

    Args:
        y_ND: `(N, D)` expert outputs in routing order.
        routing: the routing that produced the order.
        num_tokens: S.

    Returns:
        `(S, D)` combined output in ``y_ND.dtype``.
    """
    return _WeightedScatterAdd.apply(y_ND, routing.weight_N, routing.token_idx_N, num_tokens)
