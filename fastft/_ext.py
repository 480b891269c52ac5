"""Loads the compiled kernels (``fastft._C``) once, and picks the kernel or the reference per device.

If ``fastft._C`` cannot be loaded, importing fastft still works: one warning says why, and every op
runs its pure-PyTorch reference from :mod:`fastft._reference`. ``FASTFT_DISABLE_EXT=1`` forces that
path without a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from . import _reference

_C = None
LOAD_ERROR: Optional[str] = None

if os.environ.get("FASTFT_DISABLE_EXT", "0") not in ("", "0"):
    LOAD_ERROR = "disabled by FASTFT_DISABLE_EXT"
else:
    try:
        from . import _C  # noqa: F811  (registers torch.ops.fastft as a side effect)
    except Exception as exc:  # ImportError, or an undefined symbol from a torch it was not built for
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"fastft: the compiled kernels could not be loaded ({LOAD_ERROR}); using the pure-PyTorch "
            "reference implementations instead (correct but slower). Rebuild with "
            "`pip install --no-build-isolation -e .` against the installed torch, or set "
            "FASTFT_DISABLE_EXT=1 to silence this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
        _C = None

#: Device types whose tensors the compiled kernels accept.
KERNEL_DEVICES = frozenset(
    () if _C is None else (("cpu", "cuda") if _C.cuda else ("cpu",))
)


def use_kernel(device: torch.device) -> bool:
    """True when the compiled kernels handle tensors on ``device``."""
    return device.type in KERNEL_DEVICES


def adamw_l2init_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, **kwargs) -> None:
    """The fused AdamW + L2-to-init step (see :func:`fastft._reference.adamw_l2init_`), kernel when available."""
    if params and use_kernel(params[0].device):
        torch.ops.fastft.adamw_l2init_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                       anchors, **kwargs)
    else:
        _reference.adamw_l2init_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
                                 **kwargs)


def sum_of_squares(tensors) -> torch.Tensor:
    """Sum of squares of all elements of ``tensors`` (one device and dtype), kernel when available."""
    if tensors and use_kernel(tensors[0].device):
        return torch.ops.fastft.sum_of_squares(tensors)
    return _reference.sum_of_squares(tensors)
