"""Loads the compiled kernels (``fastft._C``, which registers ``torch.ops.fastft``) once.

If ``fastft._C`` cannot be loaded, importing fastft still works: one warning says why, and every op
runs its pure-PyTorch reference from :mod:`fastft._reference` (:mod:`fastft.ops` decides, per call).
``FASTFT_DISABLE_EXT=1`` forces that path without a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch  # noqa: F401  (fastft._C needs torch's libraries loaded first)

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

