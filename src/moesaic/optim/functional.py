"""The optimizer math over lists of fp32 tensors, with ``torch._foreach_*`` kernels.

Pure functions: no state of their own, no process groups. The stateful shell
(:mod:`moesaic.optim.mixed_precision`) hands them the master weights, gradients and moments of one
or several consecutive parameter groups at a time; one call over many small groups costs about
the same as one call over one big group, which is how per-expert groups stay cheap.

Each step function can also return the update it applied (as a list of tensors), for the
update/parameter ratio that telemetry reports.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor


def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], *,
              step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
              want_update: bool = False, grads_are_scratch: bool = False) -> Optional[List[Tensor]]:
    """One Adam (``decoupled=False``) or AdamW (``decoupled=True``) step, as ``torch.optim``.

    Args:
        params: fp32 master weights, updated in place.
        grads: fp32 gradients (read; modified in place only for Adam's L2 term).
        exp_avgs / exp_avg_sqs: first and second moments, updated in place.
        step: the step number after this update (1 on the first step), for bias correction.
        lr, beta1, beta2, eps, weight_decay: the hyperparameters.
        decoupled: AdamW's decoupled weight decay instead of Adam's L2 gradient term.
        want_update: also return the applied update ``new - old`` per tensor.
        grads_are_scratch: the caller no longer needs ``grads``; they are overwritten with the
            L2 term and then reused for the denominator, so the step allocates no fp32 temporaries
            beyond the gradients themselves.

    Returns:
        The updates when ``want_update``, else None.
    """
    if not params:
        return [] if want_update else None
    old = [p.clone() for p in params] if want_update else None
    if weight_decay:
        if decoupled:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        elif grads_are_scratch:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    if grads_are_scratch:  # the gradients are spent: their memory holds the denominator
        denom = grads
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bias_correction2))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bias_correction1)
    if want_update:
        return torch._foreach_sub(params, old)
    return None


def sgd_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Optional[Tensor]], *, lr: float,
             momentum: float, dampening: float, weight_decay: float, nesterov: bool,
             want_update: bool = False) -> Optional[List[Tensor]]:
    """One SGD step (with optional momentum, dampening, Nesterov and L2), as ``torch.optim.SGD``.

    ``momentum_buffers`` holds None for tensors without a buffer yet; they are filled in place of
    the list entries on the first step.
    """
    if not params:
        return [] if want_update else None
    old = [p.clone() for p in params] if want_update else None
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum:
        for i, g in enumerate(grads):
            buf = momentum_buffers[i]
            if buf is None:
                momentum_buffers[i] = g.detach().clone()
            else:
                buf.mul_(momentum).add_(g, alpha=1.0 - dampening)
        if nesterov:
            grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum)
        else:
            grads = momentum_buffers
    torch._foreach_add_(params, grads, alpha=-lr)
    if want_update:
        return torch._foreach_sub(params, old)
    return None
