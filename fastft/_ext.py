"""Loads the compiled kernels (``fastft._C``, which registers ``torch.ops.fastft``) once.

``fastft._C`` uses only the LibTorch stable ABI, built for torch :data:`MIN_TORCH`: one binary loads
under that torch and every later one. If it cannot be loaded (a torch older than that, a wheel for
another Python, a broken build), importing fastft still works: one warning says why and what to do,
and every op runs its pure-PyTorch reference from :mod:`fastft._reference` (:mod:`fastft.ops` decides,
per call). If its CUDA kernels were built for another CUDA major version than the running torch's,
the CPU kernels stay and CUDA tensors take the reference, with the same kind of warning.
``FASTFT_DISABLE_EXT=1`` forces the reference everywhere, without a warning.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Optional, Tuple

import torch  # fastft._C needs torch's libraries (libtorch_cpu.so) loaded first

#: The oldest torch the compiled kernels load under: the stable ABI target version they are built with
#: (FASTFT_TORCH_MIN in CMakeLists.txt; tests/test_build.py checks that the two agree).
MIN_TORCH: Tuple[int, int] = (2, 11)

_C = None
LOAD_ERROR: Optional[str] = None
#: Why CUDA tensors do not use the compiled kernels although they were built in (None: they do, or none were).
CUDA_ERROR: Optional[str] = None

_REBUILD = ("build fastft from source against this torch (`pip install --no-build-isolation .` in a fastft "
            "checkout; README: Building)")


def torch_version_tuple(version: str) -> Tuple[int, int]:
    """``(major, minor)`` of a torch version string such as ``"2.13.0+cpu"``."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def cuda_mismatch(built: str, running: Optional[str]) -> Optional[str]:
    """Why CUDA kernels built with CUDA ``built`` (``"13.0"``) cannot serve a torch on CUDA ``running``.

    Returns None when they can: no CUDA kernels (``built == ""``), a CPU torch (``running is None``:
    no CUDA tensor can exist), or the same CUDA major version.
    """
    if not built or running is None or built.split(".")[0] == running.split(".")[0]:
        return None
    major = running.split(".")[0]
    return (f"fastft's CUDA kernels were built with CUDA {built}, but this torch {torch.__version__} uses CUDA "
            f"{running}: CUDA tensors take the pure-PyTorch path (correct but slower; the CPU kernels still run). "
            f"Install the fastft wheel built for CUDA {major} beside this torch, or {_REBUILD}.")


def _warn(message: str) -> None:
    warnings.warn(message + " Set FASTFT_DISABLE_EXT=1 to silence this warning.", RuntimeWarning, stacklevel=3)


if os.environ.get("FASTFT_DISABLE_EXT", "0") not in ("", "0"):
    LOAD_ERROR = "disabled by FASTFT_DISABLE_EXT"
elif torch_version_tuple(torch.__version__) < MIN_TORCH:
    LOAD_ERROR = (f"torch {torch.__version__} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}, the oldest torch whose "
                  "stable ABI fastft's compiled kernels use")
    _warn(f"fastft: {LOAD_ERROR}; using the pure-PyTorch reference implementations instead (correct but slower). "
          f"Upgrade torch: `pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'`.")
else:
    try:
        from . import _C  # noqa: F811  (registers torch.ops.fastft as a side effect)
    except Exception as exc:  # ImportError: a wheel for another Python or platform, a broken build
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        _warn(f"fastft: the compiled kernels could not be loaded ({LOAD_ERROR}); using the pure-PyTorch "
              f"reference implementations instead (correct but slower). A fastft wheel must match this Python "
              f"(cp{sys.version_info.major}{sys.version_info.minor}) and platform, with torch >= "
              f"{MIN_TORCH[0]}.{MIN_TORCH[1]}; otherwise {_REBUILD}.")
        _C = None
    else:
        # getattr: a _C built before the stable-ABI port (no cuda_version) still loads and runs.
        CUDA_ERROR = cuda_mismatch(getattr(_C, "cuda_version", ""), torch.version.cuda)
        if CUDA_ERROR is not None:
            _warn(CUDA_ERROR)

#: Device types whose tensors the compiled kernels accept.
KERNEL_DEVICES = frozenset(
    () if _C is None else (("cpu", "cuda") if _C.cuda and CUDA_ERROR is None else ("cpu",))
)
