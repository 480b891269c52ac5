"""Trainer callbacks: the ``Callback`` hooks and ``EarlyStopping``."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from ..distributed import restore_weights, snapshot_weights

__all__ = ["Callback", "EarlyStopping"]


class Callback:
    """Hooks the trainer calls; override what you need. ``trainer.should_stop = True`` ends training."""

    def on_setup(self, trainer) -> None:
        """At the end of the trainer's construction (for the callbacks passed to it): check the set-up,
        e.g. warn about a configuration whose numbers would mislead."""

    def on_fit_start(self, trainer) -> None:
        """Before the first step (also after a resume)."""

    def on_epoch_start(self, trainer, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        """After optimizer step ``step`` (1-based, counting optimizer steps)."""

    def on_evaluate(self, trainer, metrics: Dict[str, float]) -> None:
        """After each validation, with the record that also goes to ``result.history``."""

    def on_epoch_end(self, trainer, epoch: int) -> None:
        """After the last step of ``epoch``."""

    def on_fit_end(self, trainer) -> None:
        """After training, before the result is returned."""

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint must keep of this callback."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` evaluations,
    and (``restore_best=True``) put the best weights back into the model at the end.

    Args:
        patience: evaluations without improvement before stopping.
        monitor: a key of the evaluation record, e.g. ``"val_loss"`` or ``"val_accuracy"``.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (min for names containing "loss" or "perplexity").
        min_delta: the smallest change that counts as an improvement.
        restore_best: load the best weights when training ends.
    """

    def __init__(self, patience: int = 3, monitor: str = "val_loss", mode: str = "auto", min_delta: float = 0.0,
                 restore_best: bool = True) -> None:
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"fastft.EarlyStopping: patience must be an int >= 1, got {patience!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"fastft.EarlyStopping: mode must be 'auto', 'min' or 'max', got {mode!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"fastft.EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        self.patience, self.monitor, self.min_delta, self.restore_best = patience, monitor, float(min_delta), restore_best
        if mode == "auto":
            mode = "min" if ("loss" in monitor or "perplexity" in monitor) else "max"
        self.mode = mode
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_step: Optional[int] = None
        self.wait = 0
        self.best_weights: Optional[Dict[str, torch.Tensor]] = None

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_evaluate(self, trainer, metrics: Dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise KeyError(f"fastft.EarlyStopping: monitor {self.monitor!r} is not in the evaluation record "
                           f"{sorted(metrics)}; pick one of those")
        value = float(metrics[self.monitor])
        if math.isfinite(value) and self.improved(value):
            self.best, self.best_epoch, self.best_step, self.wait = value, metrics.get("epoch"), metrics.get("step"), 0
            if self.restore_best:
                self.best_weights = trainer.weights_snapshot()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                trainer.should_stop = True
                trainer.stopped_early = True

    def on_fit_end(self, trainer) -> None:
        if self.restore_best and self.best_weights is not None:
            restore_weights(trainer.model, self.best_weights)

    def state_dict(self) -> Dict[str, Any]:
        return dict(best=self.best, best_epoch=self.best_epoch, best_step=self.best_step, wait=self.wait,
                    best_weights=self.best_weights)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_epoch, self.best_step = state["best"], state["best_epoch"], state["best_step"]
        self.wait, self.best_weights = state["wait"], state["best_weights"]
