"""Task metrics, computed by scikit-learn (not by hand)."""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import torch

__all__ = ["CLASSIFICATION_METRICS", "compute_metrics", "check_metric_names"]

#: Metric names the trainer knows: classification ones read logits and labels; ``perplexity`` is
#: exp(validation loss) for language modelling.
CLASSIFICATION_METRICS = ("accuracy", "f1", "f1_macro", "f1_micro", "auc")
KNOWN = CLASSIFICATION_METRICS + ("perplexity",)


def check_metric_names(names: Sequence[str]) -> None:
    """Raise ValueError for a metric name fastft does not know."""
    for name in names:
        if name not in KNOWN:
            raise ValueError(f"fastft.Trainer: unknown metric {name!r}; known: {KNOWN}")


def compute_metrics(names: Sequence[str], logits: torch.Tensor, labels: torch.Tensor, loss: float) -> Dict[str, float]:
    """The requested metrics for classification logits [N, C] and integer labels [N].

    ``f1`` is binary F1 (positive class 1) for two classes and macro F1 otherwise; ``auc`` is ROC AUC
    (one-vs-rest, macro, for more than two classes).
    """
    from sklearn import metrics as skm

    out: Dict[str, float] = {}
    wanted = [n for n in names if n in CLASSIFICATION_METRICS]
    if wanted and logits is not None and logits.dim() == 2 and logits.shape[1] > 1:
        y = labels.cpu().numpy()
        scores = logits.float().cpu()
        pred = scores.argmax(-1).numpy()
        n_classes = scores.shape[1]
        for name in wanted:
            if name == "accuracy":
                out[name] = float(skm.accuracy_score(y, pred))
            elif name == "f1":
                avg = "binary" if n_classes == 2 else "macro"
                out[name] = float(skm.f1_score(y, pred, average=avg, zero_division=0))
            elif name in ("f1_macro", "f1_micro"):
                out[name] = float(skm.f1_score(y, pred, average=name[3:], zero_division=0))
            elif name == "auc":
                prob = torch.softmax(scores, -1).numpy()
                try:
                    out[name] = float(skm.roc_auc_score(y, prob[:, 1]) if n_classes == 2 else
                                      skm.roc_auc_score(y, prob, multi_class="ovr", labels=np.arange(n_classes)))
                except ValueError:  # a single class in this split: AUC is undefined
                    out[name] = float("nan")
    if "perplexity" in names:
        out["perplexity"] = math.exp(loss) if loss < 700 else float("inf")
    return out
