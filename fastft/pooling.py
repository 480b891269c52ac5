"""Masked pooling of token states into one vector per sequence: ``pool``, ``masked_mean_pool``, ``Pool``.

The forward and the backward are fused kernels (``torch.ops.fastft.masked_pool`` and
``masked_pool_backward``, reached through :mod:`fastft.ops`, which registers their fake
implementations and autograd), so they work under ``torch.compile(fullgraph=True)`` and pass
``torch.library.opcheck``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from ._reference import POOL_MODES

__all__ = ["POOL_MODES", "pool", "masked_mean_pool", "Pool"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(hidden: Tensor, attention_mask: Optional[Tensor], mode: str) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"fastft.pool: hidden must be a tensor, got {type(hidden).__name__}")
    if mode not in POOL_MODES:
        raise ValueError(f"fastft.pool: unknown mode {mode!r}; expected one of {POOL_MODES}")
    if hidden.dim() != 3:
        raise ValueError(f"fastft.pool: hidden must be [batch, tokens, features], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"fastft.pool: hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"fastft.pool: attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"fastft.pool: attention_mask must be [batch, tokens], got shape {tuple(attention_mask.shape)}")
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"fastft.pool: attention_mask shape {tuple(attention_mask.shape)} does not match hidden's "
                         f"[batch, tokens] = {tuple(hidden.shape[:2])}")
    if attention_mask.device != hidden.device:
        raise ValueError(f"fastft.pool: attention_mask is on {attention_mask.device} but hidden is on {hidden.device}")
    if attention_mask.is_complex():
        raise ValueError(f"fastft.pool: attention_mask must be bool, integer or float, got {attention_mask.dtype}")


def pool(hidden: Tensor, attention_mask: Optional[Tensor] = None, mode: str = "mean") -> Tensor:
    """Pool token states ``hidden`` [B, T, H] into [B, H] over the real tokens of ``attention_mask``.

    Args:
        hidden: float32, float16, bfloat16 or float64, any strides.
        attention_mask: [B, T] of bool, integer or float; nonzero marks a real token. None: all real.
        mode: ``"mean"`` (sum of real tokens / their count, accumulated in fp32 — fp64 for fp64),
            ``"max"`` (maximum over real tokens; the gradient goes to the first arg-max),
            ``"cls"`` (the first real token, so left padding works) or ``"last"`` (the last real
            token, under right or left padding).
    Returns:
        [B, H] in hidden's dtype. A row without a real token gives zeros (never NaN or inf).

    When ``hidden`` needs no gradient (a frozen encoder) no backward work is done and nothing is
    saved; the forward never builds a [B, T, H] temporary.
    """
    _check(hidden, attention_mask, mode)
    return ops.masked_pool(hidden, attention_mask, mode)


def masked_mean_pool(hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean of the real tokens of ``hidden`` [B, T, H] per row: ``pool(hidden, attention_mask, "mean")``."""
    return pool(hidden, attention_mask, "mean")


class Pool(nn.Module):
    """:func:`pool` as a module: ``Pool("mean")(hidden, attention_mask) -> [B, H]``."""

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"fastft.Pool: unknown mode {mode!r}; expected one of {POOL_MODES}")
        self.mode = mode

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return pool(hidden, attention_mask, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

