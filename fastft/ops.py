"""The kernels' one front door: per op, its dispatching wrapper, its fake implementation and its autograd.

Each wrapper runs the compiled kernel (``torch.ops.fastft.*``) when :mod:`fastft._ext` loaded it and
it handles the tensors' device, and otherwise the pure-PyTorch reference in
:mod:`fastft._reference` (same semantics). The fake (meta) implementations let ``torch.compile``
trace the ops; they and the autograd registration exist only when the extension is loaded, since
only then are the op schemas defined.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _ext, _reference

__all__ = ["use_kernel", "adamw_l2init_", "sum_of_squares", "masked_pool", "cross_entropy_rows_", "linear_cross_entropy",
           "REDUCTIONS"]


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


@functools.lru_cache(maxsize=None)
def _kernel_takes_importances() -> bool:
    """False for a ``fastft._C`` built before the op took ``importances`` (EWC): its importance-weighted
    steps then run on the reference until the extension is rebuilt."""
    return any(a.name == "importances" for a in torch.ops.fastft.adamw_l2init_.default._schema.arguments)


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
    """One fused AdamW step with L2-to-init (EWC with ``importances``), in place, over tensors of one
    (device, dtype) group.

    The math and every argument are those of :func:`fastft._reference.adamw_l2init_`. Lists are
    parallel (tensor ``i`` of each belongs to ``params[i]``); ``max_exp_avg_sqs`` is empty without
    amsgrad, ``anchors`` is empty without L2-to-init and ``importances`` is empty (F = 1) or holds
    one F per param in its anchor's dtype; ``state_steps`` are one-element float32 tensors,
    incremented here. ``grad_scale`` / ``found_inf`` / ``clip_coef`` are one-element float32
    tensors on the params' device or None.

    The kernel takes the tensors whose parameter is dense and whose gradient, moments and anchor
    share its strides; any other tensor (and every tensor on a device the kernels do not handle)
    is stepped by the reference. Raises RuntimeError from the kernel's argument checks (lists of
    different lengths, mismatched shapes, devices or dtypes).
    """
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, list(importances)]
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, l2_init=l2_init,
                 coupled=coupled, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
                 clip_coef=clip_coef)
    if not params or not use_kernel(params[0].device) or (importances and not _kernel_takes_importances()):
        _reference.adamw_l2init_(*lists, **hyper)
        return
    if not _kernel_takes_importances():
        lists = lists[:7]
    strided_like_param = [lst for lst in (grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, importances) if lst]
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
    def _adamw_l2init_fake(*lists_and_hyper, **hyper):  # an in-place op returns nothing (any schema version)
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


# --- cross_entropy_rows_ and linear_cross_entropy (the fused LM loss) ---------------------------------


def cross_entropy_rows_(logits: Tensor, labels: Tensor, row_scale: Optional[Tensor], scale: float,
                        ignore_index: int, write_grad: bool) -> Tensor:
    """Per-row cross-entropy of a logits chunk [n, V], and its gradient written in place (see
    :func:`fastft._reference.cross_entropy_rows_`). float32 chunks go to the kernel, float64 ones
    (gradcheck) to the reference."""
    if logits.dtype == torch.float32 and use_kernel(logits.device):
        return torch.ops.fastft.cross_entropy_rows_(logits, labels, row_scale, scale, ignore_index, write_grad)
    return _reference.cross_entropy_rows_(logits, labels, row_scale, scale, ignore_index, write_grad)


if _ext._C is not None:

    @torch.library.register_fake("fastft::cross_entropy_rows_")
    def _cross_entropy_rows_fake(logits, labels, row_scale, scale, ignore_index, write_grad):
        return logits.new_empty((logits.shape[0],))


#: reduction name -> the int the op takes
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


@torch.library.custom_op("fastft::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                         reduction: int, row_scale: Optional[Tensor], grad_hidden: bool, grad_weight: bool,
                         grad_bias: bool, chunk_rows: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cross-entropy of ``hidden [N, H] @ weight[V, H].T + bias`` against ``labels [N]`` without the
    ``[N, V]`` logits: rows go in chunks of ``chunk_rows`` through ATen's GEMM, the fused row kernel
    (:func:`cross_entropy_rows_`) and, for the gradients asked for, two more GEMMs. Returns ``(loss,
    d_hidden, d_weight, d_bias)``: the loss (``reduction`` 0 none: ``[N]``; 1 sum, 2 mean over
    non-ignored rows: a scalar) in float32 (float64 for float64 inputs), and the gradients of that
    loss (times ``row_scale`` per row when given) for the flags set, empty otherwise. The inputs are
    checked by :func:`fastft.linear_cross_entropy`."""
    n, h_size = hidden.shape
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))  # the kernel reads logits[r, label]
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"fastft.linear_cross_entropy: labels[{i}] (flattened) is {int(labels[i])}, outside "
                         f"[0, {vocab}) and not ignore_index={ignore_index}")
    opmath = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    write = grad_hidden or grad_weight or grad_bias
    scale = 1.0
    if reduction == 2:
        n_valid = int((labels != ignore_index).sum())
        scale = 1.0 / n_valid if n_valid else 0.0
    losses = hidden.new_empty((n,), dtype=opmath)
    d_hidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty((0,))
    d_weight = weight.new_zeros((vocab, h_size), dtype=opmath) if grad_weight else weight.new_empty((0,))
    d_bias = weight.new_zeros((vocab,), dtype=opmath) if grad_bias else weight.new_empty((0,))
    weight_t = weight.t()
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        h = hidden[r0:r1]
        logits = (h @ weight_t if bias is None else torch.addmm(bias, h, weight_t)).to(opmath).contiguous()
        rows_scale = None if row_scale is None else row_scale[r0:r1].to(opmath).contiguous()
        losses[r0:r1] = cross_entropy_rows_(logits, labels[r0:r1], rows_scale, scale, ignore_index, write)
        if not write:
            continue
        g = logits.to(hidden.dtype)  # d loss / d logits of this chunk, in the GEMMs' dtype
        if grad_hidden:
            torch.mm(g, weight, out=d_hidden[r0:r1])
        if grad_weight:
            if g.dtype == opmath:
                d_weight.addmm_(g.t(), h)
            else:
                d_weight.add_(g.t() @ h)
        if grad_bias:
            d_bias.add_(logits.sum(0))
    loss = losses if reduction == 0 else losses.sum() * scale
    return (loss, d_hidden, d_weight.to(weight.dtype) if grad_weight else d_weight,
            d_bias.to(bias.dtype) if grad_bias else d_bias)


@linear_cross_entropy.register_fake
def _linear_cross_entropy_fake(hidden, weight, bias, labels, ignore_index, reduction, row_scale, grad_hidden,
                               grad_weight, grad_bias, chunk_rows):
    opmath = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty((hidden.shape[0],) if reduction == 0 else (), dtype=opmath)
    return (loss, hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,)),
            weight.new_empty((weight.shape[0],) if grad_bias else (0,),
                             dtype=bias.dtype if bias is not None else weight.dtype))


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, reduction, _row_scale, _gh, _gw, _gb, chunk_rows = inputs
    ctx.reduction, ctx.ignore_index, ctx.chunk_rows = reduction, ignore_index, chunk_rows
    if reduction == 0:  # per-row losses: the backward weighs each row by its incoming gradient and recomputes
        ctx.save_for_backward(hidden, weight, bias, labels)
    else:  # a sum or mean: the forward already computed the gradients; the backward scales them
        ctx.save_for_backward(*output[1:])


def _linear_cross_entropy_backward(ctx, grad_loss, _gh, _gw, _gb):
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if ctx.reduction == 0:
        hidden, weight, bias, labels = ctx.saved_tensors
        _, dh, dw, db = linear_cross_entropy(hidden, weight, bias, labels, ctx.ignore_index, 0, grad_loss,
                                             need_h, need_w, need_b and bias is not None, ctx.chunk_rows)
    else:
        # loss.backward() brings a gradient of exactly 1: the saved gradients are then the answer, handed
        # over as they are (autograd moves them into .grad without a second copy of a [V, H] tensor).
        traced = torch._subclasses.fake_tensor.is_fake(grad_loss) or torch._is_functional_tensor(grad_loss)
        one = not traced and bool(grad_loss == 1)
        dh, dw, db = (t if one or not t.numel() else t * grad_loss.to(t.dtype) for t in ctx.saved_tensors)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None) + (None,) * 8


linear_cross_entropy.register_autograd(_linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup_context)
