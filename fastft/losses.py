"""Fused linear cross-entropy: a language model's loss without its ``[N, V]`` logits.

``lm_head(hidden)`` -> logits -> cross-entropy makes the largest tensors of a language-model step:
for SmolLM2-135M (V = 49,152) a batch of 16 x 256 tokens makes 805 MB of fp32 logits and as much
again for their gradient. :func:`linear_cross_entropy` computes the same loss and gradients chunk by
chunk: ATen's GEMM makes a chunk of logits, one fused kernel (``torch.ops.fastft.cross_entropy_rows_``,
C++ on CPU, CUDA on GPU) turns it into per-row losses and, in place, into the gradient of the logits,
and two more GEMMs turn that into the gradients of ``hidden`` and ``weight`` — only those that are
needed (a frozen / tied-and-frozen LM head costs no weight gradient). The idea is Liger-Kernel's
fused linear cross-entropy and Apple's "Cut Your Losses" (Wijmans et al., 2024); this is fastft's own.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops

__all__ = ["linear_cross_entropy"]

#: Floats of fp32 logits in one chunk (64 MB): rows per chunk = max(1, CHUNK_ELEMENTS // V).
CHUNK_ELEMENTS = 1 << 24


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None
                         ) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=..., reduction=...)`` without
    materialising the logits.

    Args:
        hidden: ``[..., H]`` float32 / float16 / bfloat16 / float64 (e.g. a causal LM's last hidden
            states, already shifted to line up with ``labels``: nothing is shifted inside).
        weight: ``[V, H]``, the LM head's (or tied embedding's) weight, same dtype and device.
        labels: int64 ``[...]`` = ``hidden.shape[:-1]``: a class in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` or None.
        ignore_index: label of rows that count for nothing. Default -100.
        reduction: ``"mean"`` (over the non-ignored rows; 0 when every row is ignored, where
            ``F.cross_entropy`` gives NaN), ``"sum"``, or ``"none"`` (per-row losses ``[...]``, 0 at
            ignored rows).
        chunk_size: rows per chunk; default: as many as make 64 MB of fp32 logits.

    Returns:
        the loss, float32 (float64 for float64 inputs): the logits and the soft-max are computed in
        float32 from GEMMs in the input dtype. Gradients flow to ``hidden``, ``weight`` and ``bias``
        as for the unfused form; those of inputs that need none are never computed, and when no input
        needs a gradient (evaluation) nothing is kept for a backward.

    Raises:
        ValueError: mismatched shapes, dtypes or devices, a bad ``reduction`` / ``chunk_size``, or a
            label outside ``[0, V)`` that is not ``ignore_index`` (naming the first one).
    """
    where = "fastft.linear_cross_entropy"
    if reduction not in ops.REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {sorted(ops.REDUCTIONS)}, got {reduction!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden [..., H] and weight [V, H] do not fit: {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"{where}: hidden and weight must share one floating dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"{where}: bias must be [{weight.shape[0]}] of {weight.dtype}, got {tuple(bias.shape)} "
                         f"of {bias.dtype}")
    if labels.shape != hidden.shape[:-1] or labels.dtype != torch.long:
        raise ValueError(f"{where}: labels must be int64 of shape {tuple(hidden.shape[:-1])} (hidden's leading "
                         f"dims), got {labels.dtype} {tuple(labels.shape)}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{where}: hidden, weight, labels and bias must be on one device, got {devices}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{where}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    vocab, lead = weight.shape[0], hidden.shape[:-1]
    flat_labels = labels.reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    grad = torch.is_grad_enabled()
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // max(vocab, 1))
    loss = ops.linear_cross_entropy(flat_hidden, weight, bias, flat_labels.contiguous(), ignore_index,
                                    ops.REDUCTIONS[reduction], None, grad and hidden.requires_grad,
                                    grad and weight.requires_grad, grad and bias is not None and bias.requires_grad,
                                    chunk)[0]
    return loss.reshape(lead) if reduction == "none" else loss
