"""Pure-PyTorch versions of every fastft kernel.

They have the same signatures and semantics as the ``torch.ops.fastft`` ops. They are the fallback
when the compiled extension is missing (or ``FASTFT_DISABLE_EXT=1``) and the oracle the tests check
the kernels against, so they are written to be plainly right, one tensor at a time, not fast.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["adamw_l2init_", "sum_of_squares", "pool", "masked_pool", "masked_pool_backward", "cross_entropy_rows_"]


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
    importances: Sequence[Tensor] = (),
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
    """One AdamW step with L2-to-init (EWC when ``importances`` are given), in place, on every tensor
    of the lists.

    For each parameter ``p`` with gradient ``g``, anchor ``p0`` and importance ``F`` (``F = 1`` when
    ``importances`` is empty; math in float32, float64 for float64 tensors), with the pull
    ``w = F * (p - p0)``:

    * ``g <- g / grad_scale``, written back to the gradient when ``grad_scale`` is given;
    * ``g <- g * clip_coef``, negated when ``maximize``; coupled mode adds ``2 * l2_init * w``;
    * ``step += 1``; ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g^2`` (``vmax <- max(vmax, v)``
      with amsgrad, used in place of ``v``);
    * ``p <- p (1 - lr wd) - lr l2_init w [decoupled mode only] - lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps)``.

    ``importances`` is empty or holds one tensor per parameter, shaped like it (any float dtype).
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
        if use_anchor and len(importances):
            drift = importances[i].to(dt) * drift
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


# --- masked pooling -------------------------------------------------------------------------------

POOL_MODES = ("mean", "max", "cls", "last")


def _real_tokens(hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
    """[B, T] bool: True for the tokens that count."""
    if mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return mask != 0


def _chosen_token(real: Tensor, mode: str) -> Tensor:
    """First (cls) or last (last) real token per row, -1 where a row has none."""
    B, T = real.shape
    any_real = real.any(dim=1)
    if T == 0:
        return torch.full((B,), -1, dtype=torch.long, device=real.device)
    if mode == "cls":
        idx = real.to(torch.uint8).argmax(dim=1)
    else:
        idx = T - 1 - real.flip(1).to(torch.uint8).argmax(dim=1)
    return torch.where(any_real, idx, torch.full_like(idx, -1))


def pool(hidden: Tensor, mask: Optional[Tensor], mode: str) -> Tensor:
    """Differentiable masked pooling of ``hidden`` [B, T, H] over the real tokens of ``mask`` [B, T].

    mean: sum of real tokens / their count (accumulated in fp32, fp64 for fp64); max: maximum over
    real tokens (gradient to the first arg-max); cls / last: the first / last real token. A row
    without a real token gives zeros. Returns [B, H] in hidden's dtype.
    """
    B, T, H = hidden.shape
    real = _real_tokens(hidden, mask)
    acc = _opmath(hidden.dtype)
    if mode == "mean":
        w = real.to(acc)
        count = w.sum(dim=1, keepdim=True)
        total = torch.einsum("bt,bth->bh", w, hidden.to(acc))
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).to(hidden.dtype)
    if mode == "max":
        if T == 0:
            return hidden.new_zeros(B, H)
        idx = masked_pool(hidden.detach(), mask, "max")[1]
        picked = hidden.gather(1, idx.clamp(min=0)[:, None, :]).squeeze(1)
        return torch.where(idx >= 0, picked, torch.zeros_like(picked))
    if mode in ("cls", "last"):
        idx = _chosen_token(real, mode)
        picked = hidden[torch.arange(B, device=hidden.device), idx.clamp(min=0)] if T > 0 else hidden.new_zeros(B, H)
        return torch.where((idx >= 0)[:, None], picked, torch.zeros_like(picked))
    raise ValueError(f"fastft.pool: unknown mode {mode!r}; expected one of {POOL_MODES}")


@torch.no_grad()
def masked_pool(hidden: Tensor, mask: Optional[Tensor], mode: str) -> Tuple[Tensor, Tensor]:
    """The forward op: (pooled [B, H], index). index: first arg-max token per feature [B, H] for max,
    the chosen token [B] for cls / last (-1 for a row without a real token), empty for mean."""
    B, T, H = hidden.shape
    real = _real_tokens(hidden, mask)
    empty_index = torch.empty(0, dtype=torch.long, device=hidden.device)
    if mode == "max":
        acc = _opmath(hidden.dtype)
        if T == 0:
            return hidden.new_zeros(B, H), torch.full((B, H), -1, dtype=torch.long, device=hidden.device)
        vals = hidden.to(acc).masked_fill(~real[:, :, None], float("-inf"))
        # First maximum on ties; a NaN wins, as in torch.max.
        vals = torch.where(vals.isnan(), torch.full_like(vals, float("inf")), vals)
        top = vals.max(dim=1, keepdim=True).values
        first = (vals == top).to(torch.uint8).argmax(dim=1)
        idx = torch.where(real.any(dim=1)[:, None], first, torch.full_like(first, -1))
        picked = hidden.gather(1, idx.clamp(min=0)[:, None, :]).squeeze(1)
        return torch.where(idx >= 0, picked, torch.zeros_like(picked)), idx
    if mode in ("cls", "last"):
        return pool(hidden, mask, mode), _chosen_token(real, mode)
    return pool(hidden, mask, mode), empty_index


def masked_pool_backward(grad: Tensor, mask: Optional[Tensor], index: Tensor, mode: str, tokens: int) -> Tensor:
    """The backward op: d hidden [B, tokens, H] from d pooled [B, H] (see :func:`masked_pool`)."""
    B, H = grad.shape
    t = torch.arange(tokens, device=grad.device)
    if mode == "mean":
        real = torch.ones(B, tokens, dtype=torch.bool, device=grad.device) if mask is None else mask != 0
        acc = _opmath(grad.dtype)
        count = real.sum(dim=1, keepdim=True).to(acc)
        w = torch.where(count > 0, real.to(acc) / count.clamp(min=1), torch.zeros_like(count))
        return (w[:, :, None] * grad.to(acc)[:, None, :]).to(grad.dtype)
    if mode == "max":
        hit = index[:, None, :] == t[None, :, None]
    else:
        hit = (index[:, None] == t[None, :])[:, :, None]
    return torch.where(hit, grad[:, None, :], torch.zeros((), dtype=grad.dtype, device=grad.device))


def cross_entropy_rows_(logits: Tensor, labels: Tensor, row_scale: Optional[Tensor], scale: float,
                        ignore_index: int, write_grad: bool) -> Tensor:
    """Per-row cross-entropy of ``logits`` [n, V] (float32 / float64) against ``labels`` [n]: returns the
    loss [n] (0 where the label is ``ignore_index``); with ``write_grad`` overwrites ``logits`` with
    ``(softmax - onehot) * w_r``, ``w_r = scale * row_scale[r]`` (``row_scale`` None: ``scale``), 0 at
    ignored rows."""
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    lse = torch.logsumexp(logits, dim=1)
    loss = (lse - logits.gather(1, safe[:, None])[:, 0]).masked_fill(ignored, 0.0)
    if write_grad:
        w = torch.full_like(lse, scale) if row_scale is None else scale * row_scale.to(logits.dtype)
        w = w.masked_fill(ignored, 0.0)
        grad = torch.exp(logits - lse[:, None]) * w[:, None]
        grad.scatter_add_(1, safe[:, None], -w[:, None])
        logits.copy_(grad)
    return loss
