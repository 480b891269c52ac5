"""The kernels' one front door: per op, its dispatching wrapper, its fake implementation and its autograd.

Each wrapper runs the compiled kernel (``torch.ops.fastft.*``) when :mod:`fastft._ext` loaded it and
it handles the tensors' device, and otherwise the pure-PyTorch reference in
:mod:`fastft._reference` (same semantics). The fake (meta) implementations let ``torch.compile``
trace the ops; they and the autograd registration exist only when the extension is loaded, since
only then are the op schemas defined.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _ext, _reference

__all__ = ["use_kernel", "adamw_l2init_", "sum_of_squares", "masked_pool"]


def use_kernel(device: torch.device) -> bool:
    """True when the compiled kernels handle tensors on ``device`` (a ``torch.device``)."""
    return device.type in _ext.KERNEL_DEVICES


# --- adamw_l2init_ ----------------------------------------------------------------------------------


def _is_dense(t: Tensor) -> bool:
    """True when ``t`` covers its memory exactly once (contiguous up to a permutation of its dims)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


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
    """One fused AdamW step with L2-to-init, in place, over tensors of one (device, dtype) group.

    The math and every argument are those of :func:`fastft._reference.adamw_l2init_`. Lists are
    parallel (tensor ``i`` of each belongs to ``params[i]``); ``max_exp_avg_sqs`` is empty without
    amsgrad and ``anchors`` is empty without L2-to-init; ``state_steps`` are one-element float32
    tensors, incremented here. ``grad_scale`` / ``found_inf`` / ``clip_coef`` are one-element float32
    tensors on the params' device or None.

    The kernel takes the tensors whose parameter is dense and whose gradient, moments and anchor
    share its strides; any other tensor (and every tensor on a device the kernels do not handle)
    is stepped by the reference. Raises RuntimeError from the kernel's argument checks (lists of
    different lengths, mismatched shapes, devices or dtypes).
    """
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors]
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, l2_init=l2_init,
                 coupled=coupled, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
                 clip_coef=clip_coef)
    if not params or not use_kernel(params[0].device):
        _reference.adamw_l2init_(*lists, **hyper)
        return
    strided_like_param = [lst for lst in (grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors) if lst]
    odd = []
    if all(len(lst) == len(params) for lst in strided_like_param):  # else the kernel names the mismatch
        odd = [i for i, p in enumerate(params)
               if not (_is_dense(p) and all(lst[i].stride() == p.stride() for lst in strided_like_param))]
    if not odd:
        torch.ops.fastft.adamw_l2init_(*lists, **hyper)
        return
    odd_set = set(odd)
    usual = [i for i in range(len(params)) if i not in odd_set]
    if usual:
        torch.ops.fastft.adamw_l2init_(*[[lst[i] for i in usual] if lst else [] for lst in lists], **hyper)
    _reference.adamw_l2init_(*[[lst[i] for i in odd] if lst else [] for lst in lists], **hyper)


if _ext._C is not None:

    @torch.library.register_fake("fastft::adamw_l2init_")
    def _adamw_l2init_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, *,
                           lr, beta1, beta2, weight_decay, eps, l2_init, coupled, amsgrad, maximize,
                           grad_scale=None, found_inf=None, clip_coef=None):
        return None


# --- sum_of_squares ---------------------------------------------------------------------------------


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of the squares of all elements of ``tensors`` (at least one; one device and one dtype; any strides).

    Returns a 0-dim tensor on their device: float32 for float32 / float16 / bfloat16 tensors (the
    accumulation type), float64 for float64. Raises ValueError for an empty list; the kernel raises
    RuntimeError for mixed devices or dtypes.
    """
    if tensors and use_kernel(tensors[0].device):
        # The kernel reads dense memory; a strided view (a hand-set .grad, say) is copied first.
        return torch.ops.fastft.sum_of_squares([t if _is_dense(t) else t.contiguous() for t in tensors])
    return _reference.sum_of_squares(tensors)


if _ext._C is not None:

    @torch.library.register_fake("fastft::sum_of_squares")
    def _sum_of_squares_fake(tensors):
        torch._check(len(tensors) > 0, lambda: "fastft.sum_of_squares: needs at least one tensor")
        dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        return tensors[0].new_empty((), dtype=dtype)


# --- masked_pool (+ masked_pool_backward, its gradient) -----------------------------------------------


def masked_pool(hidden: Tensor, mask: Optional[Tensor], mode: str) -> Tensor:
    """Differentiable masked pooling of ``hidden`` [B, T, H] over the real tokens of ``mask`` [B, T].

    ``mode`` is one of ``"mean"``, ``"max"``, ``"cls"``, ``"last"`` (see :func:`fastft.pool`, which
    checks the inputs; this does not). Returns the pooled [B, H] in hidden's dtype. The op's second
    output (the arg-max / chosen token index) feeds only its backward and is not returned.
    """
    if use_kernel(hidden.device):
        return torch.ops.fastft.masked_pool(hidden, mask, mode)[0]
    return _reference.pool(hidden, mask, mode)


if _ext._C is not None:

    @torch.library.register_fake("fastft::masked_pool")
    def _masked_pool_fake(hidden, mask, mode):
        B, _, H = hidden.shape
        index_shape = {"max": (B, H), "mean": (0,)}.get(mode, (B,))
        return hidden.new_empty((B, H)), hidden.new_empty(index_shape, dtype=torch.long)

    @torch.library.register_fake("fastft::masked_pool_backward")
    def _masked_pool_backward_fake(grad, mask, index, mode, tokens):
        return grad.new_empty((grad.shape[0], tokens, grad.shape[1]))

    def _masked_pool_setup_context(ctx, inputs, output):
        hidden, mask, mode = inputs
        # Only what the backward reads: the mask (mean), the index (max, cls, last).
        ctx.save_for_backward(mask, output[1])
        ctx.mode = mode
        ctx.tokens = hidden.shape[1]

    def _masked_pool_backward(ctx, grad, _grad_index):
        mask, index = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return torch.ops.fastft.masked_pool_backward(grad, mask, index, ctx.mode, ctx.tokens), None, None

    torch.library.register_autograd("fastft::masked_pool", _masked_pool_backward,
                                    setup_context=_masked_pool_setup_context)
