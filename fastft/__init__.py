"""fastft: fast, forgetting-aware fine-tuning of pretrained PyTorch models.

Fused C++/CUDA kernels (registered as ``torch.ops.fastft``) under a thin Python API.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _pkg_version

from . import _ext, distributed
from .optim import AdamW
from .code_eval import evaluate_code, evaluate_completions, pass_at_k
from .forgetting import ForgettingMonitor, continue_pretraining, estimate_fisher, interpolate, wise_ft_sweep
from .freezing import FreezePlan, GradualUnfreezing, freeze_layers
from .generation import generate
from .heads import ClassificationHead, ClassifierOutput, SequenceClassifier
from .layers import RequiresGradAttributeError, find_layers
from .losses import linear_cross_entropy
from .param_groups import layerwise_lr_groups
from .pooling import POOL_MODES, Pool, masked_mean_pool, pool
from .prompting import evaluate_generation_prompting, evaluate_prompting, few_shot_prompt
from .train import Callback, EarlyStopping, FitResult, MultiTaskModel, MultiTaskTrainer, Replay, Task, Trainer

try:
    __version__ = _pkg_version("fastft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "distributed",
    "AdamW",
    "Callback",
    "ClassificationHead",
    "ClassifierOutput",
    "EarlyStopping",
    "FitResult",
    "ForgettingMonitor",
    "FreezePlan",
    "GradualUnfreezing",
    "MultiTaskModel",
    "MultiTaskTrainer",
    "POOL_MODES",
    "Pool",
    "Replay",
    "RequiresGradAttributeError",
    "SequenceClassifier",
    "Task",
    "Trainer",
    "build_info",
    "continue_pretraining",
    "estimate_fisher",
    "evaluate_code",
    "evaluate_completions",
    "evaluate_generation_prompting",
    "evaluate_prompting",
    "few_shot_prompt",
    "find_layers",
    "freeze_layers",
    "generate",
    "interpolate",
    "layerwise_lr_groups",
    "linear_cross_entropy",
    "masked_mean_pool",
    "pass_at_k",
    "pool",
    "wise_ft_sweep",
    "__version__",
]


def build_info() -> dict:
    """What this fastft is and what it runs on.

    Returns a dict with ``version`` (fastft), ``torch`` (the torch imported now), ``extension``
    (True when the compiled kernels are loaded; False means the pure-PyTorch reference runs),
    ``cuda`` (True when CUDA kernels were compiled in), ``cuda_archs`` (what they were compiled to,
    e.g. ``"sm_80,sm_90,compute_90"``: SASS per ``sm_``, PTX for ``compute_``), ``cuda_version`` (the
    CUDA toolkit they were built with, ``""`` without CUDA kernels), ``built_with_torch`` (the torch
    the extension was compiled against, or None), ``min_torch`` (the oldest torch it loads under: its
    stable ABI target), ``kernel_devices`` (device types the kernels handle), ``load_error`` (why the
    extension is not loaded, or None) and ``cuda_error`` (why CUDA tensors do not use the compiled
    CUDA kernels although they are built in, or None).
    """
    import torch

    c = _ext._C
    return {
        "version": __version__,
        "torch": torch.__version__,
        "extension": c is not None,
        "cuda": bool(c is not None and c.cuda),
        "cuda_archs": c.cuda_archs if c is not None else "",
        "cuda_version": getattr(c, "cuda_version", ""),
        "built_with_torch": c.torch_version if c is not None else None,
        "min_torch": "{}.{}".format(*_ext.MIN_TORCH),
        "kernel_devices": sorted(_ext.KERNEL_DEVICES),
        "load_error": _ext.LOAD_ERROR,
        "cuda_error": _ext.CUDA_ERROR,
    }
