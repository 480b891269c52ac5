"""Pure-PyTorch versions of every fastft kernel.

They have the same signatures and semantics as the ``torch.ops.fastft`` ops. They are the fallback
when the compiled extension is missing (or ``FASTFT_DISABLE_EXT=1``) and the oracle the tests check
the kernels against, so they are written to be plainly right, one tensor at a time, not fast.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["adamw_l2init_", "sum_of_squares"]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def adamw_l2init_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    anchors: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    l2_init: float,
    coupled: bool,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    clip_coef: Optional[Tensor] = None,
) -> None:
    """One AdamW step with L2-to-init, in place, on every tensor of the lists.

    For each parameter ``p`` with gradient ``g`` and anchor ``p0`` (math in float32, float64 for
    float64 tensors):

    * ``g <- g / grad_scale``, written back to the gradient when ``grad_scale`` is given;
    * ``g <- g * clip_coef``, negated when ``maximize``; coupled mode adds ``2 * l2_init * (p - p0)``;
    * ``step += 1``; ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g^2`` (``vmax <- max(vmax, v)``
      with amsgrad, used in place of ``v``);
    * ``p <- p (1 - lr wd) - lr l2_init (p - p0) [decoupled mode only] - lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps)``.

    Nothing changes, steps included, when ``found_inf`` is nonzero.
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return
    inv_scale = 1.0 / float(grad_scale) if grad_scale is not None else 1.0
    grad_mul = float(clip_coef) if clip_coef is not None else 1.0
    if maximize:
        grad_mul = -grad_mul
    use_anchor = l2_init != 0.0
    for i, p in enumerate(params):
        dt = _opmath(p.dtype)
        state_steps[i].add_(1)
        step = float(state_steps[i])
        g = grads[i].to(dt) * inv_scale
        if grad_scale is not None:
            grads[i].copy_(g)
        g = g * grad_mul
        param = p.to(dt)
        drift = param - anchors[i].to(dt) if use_anchor else torch.zeros_like(param)
        if coupled:
            g = g + 2.0 * l2_init * drift
        m = exp_avgs[i].to(dt)
        m = m + (1.0 - beta1) * (g - m)
        v = exp_avg_sqs[i].to(dt) * beta2 + (1.0 - beta2) * g * g
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if amsgrad:
            v = torch.maximum(max_exp_avg_sqs[i].to(dt), v)
            max_exp_avg_sqs[i].copy_(v)
        step_size = lr / (1.0 - beta1**step)
        bc2_sqrt = math.sqrt(1.0 - beta2**step)
        denom = v.sqrt() / bc2_sqrt + eps
        new = param * (1.0 - lr * weight_decay) - step_size * (m / denom)
        if not coupled:
            new = new - lr * l2_init * drift
        p.copy_(new)


@torch.no_grad()
def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of the squares of all elements of all tensors, as a 0-dim float32 tensor (float64 for float64)."""
    if len(tensors) == 0:
        raise ValueError("fastft.sum_of_squares: needs at least one tensor")
    dt = _opmath(tensors[0].dtype)
    total = torch.zeros((), dtype=dt, device=tensors[0].device)
    for t in tensors:
        total += t.to(dt).square().sum()
    return total
